"""One organisation's own table (CSV or TSV keyed by customer id) -> its prepared arrays (`vfl prep table`).

Input: a header row, then one row per customer; plain or gzip; comma or tab separated (detected from the
header line: a tab in it means TSV, else CSV; or given). Columns are found by name: the id column
(`parties.<role>.id_column`), the party's fields (I1..I13 numeric, C1..C26 strings, as in the job), and for
the leader the label column (`parties.leader.label_column`, 0 or 1; `1.0` is accepted). Other columns are
ignored. Values as exports write them: `260.0` for an integer, quoted fields ("a,b"), CRLF line ends, a UTF-8
BOM; an empty cell (quoted or not) is missing. Blank lines are skipped; a value may not contain a newline.
Customer ids are compared byte for byte (no trimming) and must be unique and non-empty.

Semantics are `vfl prep criteo`'s (`data_prep.criteo`), fitted on this party's rows only: dense value /
column max, or log(1 + max(value, 0)) / its column max with `data.dense: log` (missing -> 0.0, same id), a
categorical value seen more than `threshold` times gets an id, others the field's OOV id. Two streaming
passes: count (vocabulary, maxima, ids), then encode. Memory is bounded by a batch except for the
duplicate-id check, which keeps 8 bytes per row (a 64-bit hash of each id; equal hashes are confirmed on the
real ids by re-reading, on the error path only).

With `vocab_from` (scoring new customers with a trained model's encoding) nothing is fitted: pass 1 reads
only the id column (rows, id width, duplicates), pass 2 encodes with the directory's vocab.json and
dense_max.json (unseen values -> OOV id, dense values scaled as that directory's were, whatever the job's
`data.dense` says, and divided by the training max); the leader's label column is optional then.

Output, `<data.dir>/tables/<role>/` by default, written to a staging directory and renamed into place only when
complete (the format is drawn in `data_prep.store`):

    meta.json          TableMeta: role, fields, has_labels, vocab_size, field_offsets, threshold, source,
                       rows, id_column, id_width, sha256 per file, sample_ids/customer_ids digests, vocab_from
    ids.npy            int32   [N, F]   vals.npy  float32 [N, F]   labels.npy  float32 [N] (leader, if labelled)
    sample_ids.npy     int64   [N]      0-based data row in the input file (header and blank lines not counted)
    customer_ids.npy   S<w>    [N]      the ids, UTF-8, NUL-padded to the longest id's w bytes
    vocab.json, dense_max.json          as `vfl prep criteo` writes them

There is no train/test split here: that follows the order both parties agree on after the PSI.
"""

from __future__ import annotations

import csv
import gzip
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from data_prep.criteo import PartyVocab, PassStats, _peak_rss_mb, _remove, count_pass
from data_prep.errors import DataError
from data_prep.reader import BLOCK_SIZE, LABEL, ProgressFn, _is_number, csv_batches, is_gzip
from data_prep.schema import CRITEO_NUMERIC as DENSE_FIELDS
from data_prep.store import ArrayWriter, SplitWriter, TableMeta, publish, staging_dir
from vfl_cli.job import JobSpec, PartySpec, Role

ID = "\x00customer_id"  # the id column's name inside batches; cannot clash with a header name
Labels = bool | None  # True: required, False: not read, None: read when the header has it


def open_text(path: Path) -> IO[str]:
    """A plain or gzip file as text lines, line ends kept as they are (for csv)."""
    opener = gzip.open if is_gzip(path) else open
    return opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="")


def read_header(path: Path, delimiter: str | None) -> tuple[list[str], str]:
    """The header's column names and the delimiter (given, or tab if the header line has one, else comma)."""
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    try:
        with open_text(path) as handle:
            line = handle.readline()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read input ({exc})") from exc
    if not line.strip():
        raise DataError(f"{path}: empty file, no header row")
    if delimiter is None:
        delimiter = "\t" if "\t" in line else ","
    return next(csv.reader([line.rstrip("\r\n")], delimiter=delimiter)), delimiter


class TableReader:
    """Streams a party's table as Arrow record batches: ID, LABEL (if read) and the requested fields.

    Same interface as `data_prep.reader.BatchReader` (a `BatchSource`), so the counting and encoding code
    of `vfl prep criteo` runs on it unchanged. Bad input becomes one DataError naming file, line and column.
    """

    def __init__(
        self,
        path: Path,
        role: Role,
        party: PartySpec,
        fields: Sequence[str],
        labels: Labels,
        delimiter: str | None = None,
        on_progress: ProgressFn | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        self.path = path
        self.id_column, self.label_column = party.id_column, party.label_column
        header, self.delimiter = read_header(path, delimiter)
        self.with_label = labels is True or (labels is None and self.label_column in header)
        self._check_header(role, header, fields, labels is True)
        self.fields = list(fields)
        self.dense = [f for f in fields if f in DENSE_FIELDS]
        self.on_progress = on_progress
        self.block_size = block_size
        # Columns are renamed to canonical names; ignored ones get placeholders so no name is ambiguous.
        rename = {self.id_column: ID, **{f: f for f in fields}}
        if self.with_label:
            rename[self.label_column] = LABEL
        self.names = [rename.get(name, f"\x00ignored{i}") for i, name in enumerate(header)]
        self.header_width = len(header)
        categorical = pa.dictionary(pa.int32(), pa.string())
        types = {f: pa.float64() if f in DENSE_FIELDS else categorical for f in fields}
        self.convert = pa_csv.ConvertOptions(
            column_types={ID: pa.string(), LABEL: pa.float64(), **types},  # a label may be written 1.0
            include_columns=[ID] + ([LABEL] if self.with_label else []) + list(fields),
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        )

    def _check_header(self, role: Role, header: list[str], fields: Sequence[str], need_label: bool) -> None:
        where = f"{self.path}: header"
        used = [self.id_column, *fields] + ([self.label_column] if self.with_label else [])
        if len(set(used)) != len(used):
            raise DataError(f"parties.{role}: id_column and label_column must differ from each other and the fields")
        if self.id_column not in header:
            raise DataError(f"{where} has no id column {self.id_column!r} (parties.{role}.id_column)")
        missing = [f for f in fields if f not in header]
        if missing:
            raise DataError(f"{where} lacks the {role}'s field column(s) {', '.join(missing)}")
        if need_label and self.label_column not in header:
            raise DataError(f"{where} has no label column {self.label_column!r} (parties.{role}.label_column)")
        repeated = sorted({name for name in used if header.count(name) > 1})
        if repeated:
            raise DataError(f"{where} names column {repeated[0]!r} more than once")

    def batches(self, phase: str, total_rows: int | None = None) -> Iterator[tuple[int, pa.RecordBatch]]:
        """Yield (data row number of the batch's first row, batch) through the whole table."""
        yield from csv_batches(
            self.path,
            pa_csv.ReadOptions(column_names=self.names, skip_rows=1, block_size=self.block_size, use_threads=False),
            pa_csv.ParseOptions(delimiter=self.delimiter, quote_char='"', ignore_empty_lines=True),
            self.convert,
            check=self._check,
            locate=self._locate,
            progress=None if self.on_progress is None else partial(self.on_progress, phase),
            total_rows=total_rows,
        )

    def _check(self, first_row: int, batch: pa.RecordBatch) -> None:
        """What the parser cannot check: ids present, labels 0/1, dense values finite (cheap aggregates first)."""
        ids = batch.column(ID)
        if ids.null_count:
            row = first_row + int(np.argmax(ids.is_null().to_numpy(zero_copy_only=False)))
            raise DataError(f"{self._where(row)}: {self.id_column} is missing (every row needs a customer id)")
        if self.with_label:
            label = batch.column(LABEL)
            bad = pc.invert(pc.is_in(label, value_set=pa.array([0.0, 1.0]))).fill_null(True)
            if pc.any(bad).as_py():
                row = first_row + int(np.argmax(bad.to_numpy(zero_copy_only=False)))
                value = self._cell(row, self.label_column)
                found = "it is missing" if not value else f"found {value!r}"
                raise DataError(f"{self._where(row)}: {self.label_column} must be 0 or 1, {found}")
        for field in self.dense:
            column = batch.column(field)
            if np.isfinite(pc.sum(column).as_py() or 0.0):
                continue
            bad = pc.invert(pc.is_finite(column)).fill_null(False)
            if pc.any(bad).as_py():
                row = first_row + int(np.argmax(bad.to_numpy(zero_copy_only=False)))
                value = self._cell(row, field)
                raise DataError(f"{self._where(row)}: {field} must be a finite number, found {value!r}")

    # --- the error path: re-read the text to name the line ----------------------------------------------

    def _rows(self, first_row: int = 0) -> Iterator[tuple[int, int, list[str]]]:
        """(data row, line number, cells) from `first_row` on, as the csv module splits them."""
        with open_text(self.path) as handle:
            reader = csv.reader(handle, delimiter=self.delimiter)
            next(reader, None)  # the header
            row = 0
            for cells in reader:
                if not cells:  # a blank line, skipped as the Arrow parser skips it
                    continue
                if row >= first_row:
                    yield row, reader.line_num, cells
                row += 1

    def _where(self, row: int) -> str:
        line = next((line for _, line, _ in self._rows(row)), row + 2)
        return f"{self.path}:{line}"

    def _cell(self, row: int, column: str) -> str:
        cells = next((cells for _, _, cells in self._rows(row)), [])
        index = self.names.index(LABEL if column == self.label_column and self.with_label else column)
        return cells[index] if index < len(cells) else ""

    def _locate(self, first_row: int) -> str | None:
        """The first bad line at or after `first_row` (a slow scan, on the error path only)."""
        separator = "tab" if self.delimiter == "\t" else repr(self.delimiter)
        for _, line, cells in self._rows(first_row):
            where = f"{self.path}:{line}"
            if len(cells) != self.header_width:
                expected = f"{self.header_width} {separator}-separated columns as in the header"
                return f"{where}: expected {expected}, found {len(cells)}"
            for name, cell in zip(self.names, cells, strict=True):
                if name == LABEL and cell not in ("0", "1") and not (_is_number(cell) and float(cell) in (0, 1)):
                    found = "it is missing" if not cell else f"found {cell!r}"
                    return f"{where}: {self.label_column} must be 0 or 1, {found}"
                if name in self.dense and cell and not _is_number(cell):
                    return f"{where}: {name} must be a number, found {cell!r}"
        return None


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

    def check_unique(self, reader: TableReader) -> None:
        """DataError naming one duplicated id and two of its lines; equal hashes are confirmed on the text."""
        if not self.hashes:
            return
        hashes = np.concatenate(self.hashes)
        order = np.argsort(hashes, kind="stable")
        same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
        if not len(same):
            return
        candidates = set(order[same].tolist()) | set(order[same + 1].tolist())
        first_line: dict[str, int] = {}
        for row, line, cells in reader._rows():
            if row in candidates:
                customer = cells[reader.names.index(ID)]
                if customer in first_line:
                    raise DataError(
                        f"{reader.path}: customer id {customer!r} appears more than once "
                        f"(lines {first_line[customer]} and {line}); ids must be unique"
                    )
                first_line[customer] = line


@dataclass(frozen=True)
class TableResult:
    out: Path
    rows: int
    vocab_size: int
    has_labels: bool
    label_rate: float | None
    id_width: int
    passes: tuple[PassStats, ...]

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(sum(p.seconds for p in self.passes), 1e-9)


def prepare_table(
    path: Path,
    job: JobSpec,
    role: Role,
    out: Path,
    delimiter: str | None = None,
    vocab_from: Path | None = None,
    on_progress: ProgressFn | None = None,
    block_size: int = BLOCK_SIZE,
) -> TableResult:
    """Prepare `role`'s own table at `path` into the directory `out`, replacing it only when complete."""
    party = job.party(role)
    loaded = None  # (vocabulary, its threshold) when encoding with an existing vocabulary
    if vocab_from is not None:
        loaded = PartyVocab.load(vocab_from, role, party), _threshold_of(vocab_from / "meta.json")
    labels: Labels = (None if vocab_from is not None else True) if role == "leader" else False
    reader = TableReader(path, role, party, party.fields, labels, delimiter, on_progress, block_size)
    tally = IdTally()
    passes: list[PassStats] = []
    started = time.perf_counter()
    if loaded is None:
        counts = count_pass(reader, party.fields, job.data.threshold, job.seed, 0.0, on_batch=tally,
                            dense_scaling=job.schema(role).scaling)
        rows = counts.rows
        vocab = PartyVocab.build(role, party, counts)
        threshold = job.data.threshold
        passes.append(PassStats("count", rows, time.perf_counter() - started, _peak_rss_mb()))
    else:
        vocab, threshold = loaded
        ids_only = TableReader(path, role, party, (), False, delimiter, on_progress, block_size)
        rows = 0
        for first_row, batch in ids_only.batches("ids"):
            tally(first_row, batch)
            rows = first_row + batch.num_rows
        if rows == 0:
            raise DataError(f"{path}: empty input, no rows")
        passes.append(PassStats("ids", rows, time.perf_counter() - started, _peak_rss_mb()))
    tally.check_unique(reader)

    try:
        staging = staging_dir(out.parent, out.name)
    except OSError as exc:
        raise DataError(f"{out}: cannot write the output directory: {exc.strerror or exc}") from exc
    try:
        started = time.perf_counter()
        encoded = _encode(reader, vocab, staging, rows, tally.width)
        meta = TableMeta(
            role=role,
            fields=vocab.fields,
            has_labels=reader.with_label,
            vocab_size=vocab.size,
            field_offsets=vocab.offsets,
            threshold=threshold,
            source=path.name,
            rows=rows,
            id_column=party.id_column,
            id_width=tally.width,
            sha256=encoded.sha256,
            sample_ids_digest=encoded.sample_ids_digest,
            customer_ids_digest=encoded.customer_ids_digest,
            vocab_from=str(vocab_from) if vocab_from is not None else None,
        )
        (staging / "meta.json").write_text(meta.to_json() + "\n")
        (staging / "vocab.json").write_text(vocab.to_json() + "\n")
        (staging / "dense_max.json").write_text(vocab.scales_json() + "\n")
        passes.append(PassStats("encode", rows, time.perf_counter() - started, _peak_rss_mb()))
        publish(staging, out)
    except OSError as exc:
        raise DataError(f"{out}: cannot write the prepared table: {exc.strerror or exc}") from exc
    finally:
        _remove([staging] if staging.exists() else [])
    return TableResult(
        out=out,
        rows=rows,
        vocab_size=vocab.size,
        has_labels=reader.with_label,
        label_rate=encoded.positives / rows if reader.with_label else None,
        id_width=tally.width,
        passes=tuple(passes),
    )


@dataclass(frozen=True)
class _Encoded:
    sha256: dict[str, str]
    sample_ids_digest: str
    customer_ids_digest: str
    positives: int  # label-1 rows (0 without labels)


def _encode(reader: TableReader, vocab: PartyVocab, staging: Path, rows: int, width: int) -> _Encoded:
    """Pass 2: encode every batch, in file order, into the staging directory."""
    writer = SplitWriter(staging, rows, len(vocab.fields), reader.with_label)
    customers = ArrayWriter(staging / "customer_ids.npy", np.dtype(f"S{width}"), (rows,))
    positives = 0
    try:
        for first_row, batch in reader.batches("encode", total_rows=rows):
            ids, vals = vocab.encode(batch)
            labels = batch.column(LABEL).to_numpy().astype(np.float32) if reader.with_label else None
            positives += int(labels.sum()) if labels is not None else 0
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
