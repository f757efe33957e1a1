"""Raw Criteo text -> each party's prepared arrays, train and test, in two streaming passes (`vfl prep criteo`).

The Criteo preset's file: label, I1..I13, C1..C26, tab separated, no header (`data_prep.reader`). Each party
names the columns it holds; a column's kind comes from the party's schema. Pass 1 (`data_prep.fit`) fits on
every input row: vocabulary, numeric scales, rows, test rows, label-1 rows; pass 2 encodes
(`data_prep.encode`, `data_prep.scaling`) and appends each row to its party's train or test arrays. The
label is Criteo's 0/1 click (task binary).

- Row r (0-based line number) is in the test split as `data_prep.splits` decides it from the seed, so
  leader and follower prepared separately stay row-aligned. sample_ids = r.
- With held-out test files, every input row trains (and is fitted on) and the test split is their rows,
  numbered after the input's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from data_prep.encode import PartyVocab
from data_prep.errors import DataError
from data_prep.fit import Counts, count_pass
from data_prep.passes import PassStats, peak_rss_mb
from data_prep.reader import BLOCK_SIZE, BatchReader, ProgressFn
from data_prep.schema import PartySchema
from data_prep.splits import in_test_split
from data_prep.store import SPLITS, PartyMeta, SplitWriter, publish, remove_dirs, staging_dir, write_meta


@dataclass(frozen=True)
class PrepResult:
    out: Path
    split_rows: dict[str, int]
    vocab_sizes: dict[str, int]
    label_rate: float | None
    passes: tuple[PassStats, ...]

    @property
    def rows_per_s(self) -> float:
        """Input rows per second over the whole preparation (both passes)."""
        return sum(self.split_rows.values()) / max(sum(p.seconds for p in self.passes), 1e-9)


def _encode_pass(
    reader: BatchReader, vocabs: list[PartyVocab], staging: dict[str, Path], counts: Counts, seed: int,
    test_fraction: float, test_readers: Sequence[BatchReader] = (),
) -> dict[str, dict[str, SplitWriter]]:
    """Pass 2: encode every batch for each party and append its rows to that party's train or test arrays.
    With `test_readers`, the input is all train and their rows are the test split, numbered after it."""
    test_fraction = 0.0 if test_readers else test_fraction
    sizes = {"train": counts.rows - counts.test_rows, "test": counts.test_rows}
    writers: dict[str, dict[str, SplitWriter]] = {
        v.role: {
            split: SplitWriter(staging[v.role] / split, sizes[split], len(v.columns), v.task is not None)
            for split in SPLITS
        }
        for v in vocabs
    }
    labelled = next((v for v in vocabs if v.task is not None), None)
    try:
        offset = 0
        for source in (reader, *test_readers):
            last = 0
            for first_row, batch in source.batches("encode", total_rows=counts.rows):
                if source is reader:
                    in_test = in_test_split(seed, first_row, batch.num_rows, test_fraction)
                else:
                    in_test = np.ones(batch.num_rows, dtype=bool)
                sample_ids = np.arange(offset + first_row, offset + first_row + batch.num_rows, dtype=np.int64)
                labels = labelled.labels(batch) if labelled is not None else None
                for vocab in vocabs:
                    ids, vals = vocab.encode(batch)
                    for split, rows in (("train", ~in_test), ("test", in_test)):
                        split_labels = labels[rows] if labels is not None and vocab is labelled else None
                        writers[vocab.role][split].append(ids[rows], vals[rows], split_labels, sample_ids[rows])
                last = first_row + batch.num_rows
            offset += last
    except BaseException:
        for split_writers in writers.values():
            for writer in split_writers.values():
                writer.abort()
        raise
    return writers


def prepare_criteo(
    path: Path,
    schemas: Sequence[PartySchema],
    out: Path,
    seed: int,
    test_fraction: float,
    on_progress: ProgressFn | None = None,
    block_size: int = BLOCK_SIZE,
    test_files: Sequence[Path] = (),
) -> PrepResult:
    """Prepare each of `schemas`' parties from raw Criteo text at `path` into `<out>/<role>/`, each replaced only
    when complete; the vocabulary threshold and the scaling are each schema's.

    With `test_files`, every row of `path` is a training row (the vocabulary and numeric scales come from them
    alone) and the test split is the rows of `test_files`, in order: a held-out file, as a user who has one
    would evaluate on it, instead of the seeded random test_fraction of `path`."""
    for schema in schemas:
        if schema.task not in (None, "binary"):
            raise DataError(f"Criteo text has a 0/1 label; the {schema.role}'s task is {schema.task} "
                            "(prepare other labels with `vfl prep table`)")
    columns = [column for schema in schemas for column in schema.columns]
    names = [name for name, _ in columns]
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise DataError(f"{path}: column(s) {', '.join(twice)} named by both parties; one Criteo file holds each once")
    labelled = any(schema.label is not None for schema in schemas)
    reader = BatchReader(path, columns, labelled, on_progress, block_size)
    test_readers = [BatchReader(p, columns, labelled, on_progress, block_size) for p in test_files]
    staging: dict[str, Path] = {}
    try:
        for schema in schemas:
            staging[schema.role] = staging_dir(out, schema.role)
    except OSError as exc:
        remove_dirs(staging.values())
        raise DataError(f"{out}: cannot write the output directory: {exc.strerror or exc}") from exc
    try:
        started = time.perf_counter()
        counts = count_pass(reader, schemas, seed, 0.0 if test_files else test_fraction)
        if test_readers:  # the held-out rows: counted (for the arrays' sizes), never learnt from
            held_out = sum(batch.num_rows for r in test_readers for _, batch in r.batches("count"))
            counts = replace(counts, rows=counts.rows + held_out, test_rows=held_out)
        passes = [PassStats("count", counts.rows, time.perf_counter() - started, peak_rss_mb())]
        vocabs = [PartyVocab.build(schema, counts) for schema in schemas]
        started = time.perf_counter()
        writers = _encode_pass(reader, vocabs, staging, counts, seed, test_fraction, test_readers)
        for vocab in vocabs:
            meta = PartyMeta(
                role=vocab.role,
                fields=vocab.fields,
                has_labels=vocab.task is not None,
                vocab_size=vocab.size,
                field_offsets=vocab.offsets,
                threshold=next(s.threshold for s in schemas if s.role == vocab.role),
                source=", ".join([path.name, *(p.name for p in test_files)]),
                splits={split: writer.close() for split, writer in writers[vocab.role].items()},
                kinds=vocab.kinds,
                task=vocab.task,
            )
            write_meta(staging[vocab.role], meta)
            (staging[vocab.role] / "vocab.json").write_text(vocab.to_json() + "\n")
            scales = vocab.scales_json()  # numeric scales and scaling, also needed to encode new rows
            (staging[vocab.role] / "dense_max.json").write_text(scales + "\n")
        passes.append(PassStats("encode", counts.rows, time.perf_counter() - started, peak_rss_mb()))
        for schema in schemas:
            publish(staging[schema.role], out / schema.role)
    except OSError as exc:
        raise DataError(f"{out}: cannot write the prepared data: {exc.strerror or exc}") from exc
    finally:
        remove_dirs(p for p in staging.values() if p.exists())
    return PrepResult(
        out=out,
        split_rows={"train": counts.rows - counts.test_rows, "test": counts.test_rows},
        vocab_sizes={v.role: v.size for v in vocabs},
        label_rate=counts.positives / (counts.rows - (counts.test_rows if test_files else 0))
        if counts.positives is not None else None,
        passes=tuple(passes),
    )

