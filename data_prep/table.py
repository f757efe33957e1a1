"""One organisation's own table keyed by customer id -> its prepared arrays (`vfl prep table`).

Input: CSV or TSV with a header row (`data_prep.csv_table`) or Parquet (`data_prep.parquet_table`), one row
per customer. Columns are found by name: the id column (`schema.id_column`), the party's columns, and for the
label party the label column (`schema.label`; its values by task, `data_prep.labels`). Other columns are
ignored. Customer ids must be unique and non-empty.

Semantics are those of `data_prep.encode` (ids, vocabulary) and `data_prep.scaling` (numeric values),
fitted on this party's rows only, each column by its kind in the schema. Two streaming passes: count
(`data_prep.fit`: vocabulary, scales, classes, ids), then encode. Memory is bounded by a batch except for the
duplicate-id check, which keeps 8 bytes per row (a 64-bit hash of each id; equal hashes are confirmed on the
real ids by re-reading, on the error path only).

With `vocab_from` (scoring new customers with a trained model's encoding) nothing is fitted: pass 1 reads
only the id column (rows, id width, duplicates), pass 2 encodes with the directory's vocab.json,
dense_max.json and classes (unseen values -> OOV id; numeric values scaled as that directory's were, whatever
the job's `data.dense` says; a multiclass label outside its classes is an error); the label is optional then.

Output, `<data.dir>/tables/<role>/` by default, written to a staging directory and renamed into place only when
complete (the format is drawn in `data_prep.store`):

    meta.json          TableMeta: role, fields, kinds, has_labels, task, classes, vocab_size, field_offsets,
                       threshold, source, rows, id_column, id_width, sha256 per file, digests, vocab_from
    ids.npy            int32   [N, F]   vals.npy  float32 [N, F]   labels.npy  float32 [N] (leader, if labelled)
    sample_ids.npy     int64   [N]      0-based data row in the input file (header and blank lines not counted)
    customer_ids.npy   S<w>    [N]      the ids, UTF-8, NUL-padded to the longest id's w bytes
    vocab.json, dense_max.json          as `vfl prep criteo` writes them

There is no train/test split here: that follows the order both parties agree on after the PSI.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.csv_table import CsvTable
from data_prep.encode import PartyVocab
from data_prep.errors import DataError
from data_prep.fit import count_pass
from data_prep.parquet_table import ParquetTable, is_parquet
from data_prep.passes import PassStats, peak_rss_mb
from data_prep.reader import BLOCK_SIZE, ProgressFn
from data_prep.schema import Kind, PartySchema
from data_prep.source import ID, Labels, TableSource
from data_prep.store import ArrayWriter, SplitWriter, TableMeta, publish, remove_dirs, staging_dir


def open_source(
    path: Path,
    schema: PartySchema,
    columns: Sequence[tuple[str, Kind]],
    labels: Labels,
    classes: tuple[str, ...] | None = None,
    delimiter: str | None = None,
    on_progress: ProgressFn | None = None,
    block_size: int = BLOCK_SIZE,
) -> TableSource:
    """The table at `path` as a source of `columns` (and the label, as `labels` asks): Parquet by its name or
    magic bytes, else CSV/TSV."""
    if path.is_file() and is_parquet(path):
        if delimiter is not None:
            raise DataError(f"{path}: a Parquet file; --delimiter is for CSV and TSV")
        return ParquetTable(path, schema, columns, labels, classes, on_progress)
    return CsvTable(path, schema, columns, labels, classes, delimiter, on_progress, block_size)


class IdTally:
    """Pass 1's view of the customer ids: the longest id in bytes, and a 64-bit hash per row for duplicates."""

    def __init__(self) -> None:
        self.width = 1
        self.hashes: list[np.ndarray] = []

    def __call__(self, first_row: int, batch: pa.RecordBatch) -> None:
        ids = batch.column(ID)
        if len(ids):
            self.width = max(self.width, int(pc.max(pc.binary_length(ids)).as_py()))
            self.hashes.append(np.fromiter(map(hash, ids.to_pylist()), dtype=np.int64, count=len(ids)))

    def check_unique(self, source: TableSource) -> None:
        """DataError naming one duplicated id and two of its lines (rows); equal hashes are confirmed on the ids."""
        if not self.hashes:
            return
        hashes = np.concatenate(self.hashes)
        order = np.argsort(hashes, kind="stable")
        same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
        if not len(same):
            return
        candidates = set(order[same].tolist()) | set(order[same + 1].tolist())
        first_seen: dict[str, int] = {}
        for _, position, customer in source.ids_at(candidates):
            if customer in first_seen:
                raise DataError(
                    f"{source.path}: customer id {customer!r} appears more than once "
                    f"({source.unit}s {first_seen[customer]} and {position}); ids must be unique"
                )
            first_seen[customer] = position


@dataclass(frozen=True)
class TableResult:
    out: Path
    rows: int
    vocab_size: int
    has_labels: bool
    label_rate: float | None  # binary labels: the share of 1s
    id_width: int
    passes: tuple[PassStats, ...]
    task: str | None = None  # of the labels written; None without
    classes: tuple[str, ...] = ()  # multiclass

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(sum(p.seconds for p in self.passes), 1e-9)


def prepare_table(
    path: Path,
    schema: PartySchema,
    out: Path,
    delimiter: str | None = None,
    vocab_from: Path | None = None,
    on_progress: ProgressFn | None = None,
    block_size: int = BLOCK_SIZE,
) -> TableResult:
    """Prepare the table at `path`, `schema.role`'s own, into the directory `out`, replacing it only when
    complete. With `vocab_from`, encode with that prepared directory's vocabulary, scales and classes."""
    loaded = None  # (vocabulary, its threshold) when encoding with an existing vocabulary
    if vocab_from is not None:
        loaded = PartyVocab.load(vocab_from, schema), _threshold_of(vocab_from / "meta.json")
    labels: Labels = (None if vocab_from is not None else True) if schema.label is not None else False
    classes = loaded[0].classes if loaded is not None and schema.task == "multiclass" else None
    reader = open_source(path, schema, schema.columns, labels, classes, delimiter, on_progress, block_size)
    if classes == () and reader.with_label:
        raise DataError(f"{vocab_from}: records no classes (prepared without multiclass labels), so it cannot "
                        f"encode the labels of {path}")
    tally = IdTally()
    passes: list[PassStats] = []
    started = time.perf_counter()
    if loaded is None:
        counts = count_pass(reader, [schema], seed=0, test_fraction=0.0, on_batch=tally)
        rows = counts.rows
        vocab = PartyVocab.build(schema, counts)
        threshold = schema.threshold
        passes.append(PassStats("count", rows, time.perf_counter() - started, peak_rss_mb()))
    else:
        vocab, threshold = loaded
        ids_only = open_source(path, schema, (), False, None, delimiter, on_progress, block_size)
        rows = 0
        for first_row, batch in ids_only.batches("ids"):
            tally(first_row, batch)
            rows = first_row + batch.num_rows
        if rows == 0:
            raise DataError(f"{path}: empty input, no rows")
        passes.append(PassStats("ids", rows, time.perf_counter() - started, peak_rss_mb()))
    tally.check_unique(reader)

    task = vocab.task if reader.with_label else None
    try:
        staging = staging_dir(out.parent, out.name)
    except OSError as exc:
        raise DataError(f"{out}: cannot write the output directory: {exc.strerror or exc}") from exc
    try:
        started = time.perf_counter()
        encoded = _encode(reader, vocab, staging, rows, tally.width)
        meta = TableMeta(
            role=schema.role,
            fields=vocab.fields,
            has_labels=reader.with_label,
            vocab_size=vocab.size,
            field_offsets=vocab.offsets,
            threshold=threshold,
            source=path.name,
            rows=rows,
            id_column=schema.id_column,
            id_width=tally.width,
            sha256=encoded.sha256,
            sample_ids_digest=encoded.sample_ids_digest,
            customer_ids_digest=encoded.customer_ids_digest,
            vocab_from=str(vocab_from) if vocab_from is not None else None,
            kinds=vocab.kinds,
            task=task,
            # the encoding's classes, with or without labels: a model scoring these rows needs their number
            classes=vocab.classes if vocab.task == "multiclass" else (),
        )
        (staging / "meta.json").write_text(meta.to_json() + "\n")
        (staging / "vocab.json").write_text(vocab.to_json() + "\n")
        (staging / "dense_max.json").write_text(vocab.scales_json() + "\n")
        passes.append(PassStats("encode", rows, time.perf_counter() - started, peak_rss_mb()))
        publish(staging, out)
    except OSError as exc:
        raise DataError(f"{out}: cannot write the prepared table: {exc.strerror or exc}") from exc
    finally:
        remove_dirs([staging] if staging.exists() else [])
    return TableResult(
        out=out,
        rows=rows,
        vocab_size=vocab.size,
        has_labels=reader.with_label,
        label_rate=encoded.positives / rows if task == "binary" else None,
        id_width=tally.width,
        passes=tuple(passes),
        task=task,
        classes=meta.classes,
    )


@dataclass(frozen=True)
class _Encoded:
    sha256: dict[str, str]
    sample_ids_digest: str
    customer_ids_digest: str
    positives: int  # label-1 rows (binary labels; 0 otherwise)


def _encode(reader: TableSource, vocab: PartyVocab, staging: Path, rows: int, width: int) -> _Encoded:
    """Pass 2: encode every batch, in file order, into the staging directory."""
    writer = SplitWriter(staging, rows, len(vocab.columns), reader.with_label)
    customers = ArrayWriter(staging / "customer_ids.npy", np.dtype(f"S{width}"), (rows,))
    positives = 0
    try:
        for first_row, batch in reader.batches("encode", total_rows=rows):
            ids, vals = vocab.encode(batch)
            labels = vocab.labels(batch) if reader.with_label else None
            positives += int(labels.sum()) if labels is not None and vocab.task == "binary" else 0
            sample_ids = np.arange(first_row, first_row + batch.num_rows, dtype=np.int64)
            writer.append(ids, vals, labels, sample_ids)
            utf8 = pc.cast(batch.column(ID), pa.binary()).to_numpy(zero_copy_only=False)
            customers.append(utf8.astype(f"S{width}"))
    except BaseException:
        writer.abort()
        customers.close()
        raise
    customers.close()
    if customers.rows != rows:  # checked before writer.close(), whose own message would be less clear
        writer.abort()
        raise DataError(f"{reader.path}: {customers.rows} rows in pass 2 but {rows} in pass 1; did the file change?")
    split = writer.close()
    return _Encoded(
        sha256={**split.sha256, "customer_ids.npy": customers.file_hash.hexdigest()},
        sample_ids_digest=split.sample_ids_digest,
        customer_ids_digest=customers.data_hash.hexdigest(),
        positives=positives,
    )


def _threshold_of(meta: Path) -> int:
    try:
        return int(json.loads(meta.read_text())["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{meta}: unreadable ({exc!r})") from exc
