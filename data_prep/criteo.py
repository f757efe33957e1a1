"""Raw Criteo text -> each party's prepared arrays, in two streaming passes (count, then encode).

Owns the preparation semantics; reading raw lines lives in `data_prep.reader`, the on-disk format and its
writer in `data_prep.store`.

- Columns of ids/vals follow the order of the party's `fields` in the job.
- Ids per party: fields in that order get consecutive ranges. A dense field has one id; a categorical field
  has its OOV id first, then one id per frequent value in lexicographic order of the raw string.
- Dense val, by the job's `data.dense`: `max`, value / column max over all input rows; `log`,
  log(1 + max(value, 0)) / column max of that over all input rows (so in [0, 1]). The divisor is 1.0 where
  that max <= 0; missing -> 0.0, same id. dense_max.json keeps the divisors, and `"scaling": "log"` for
  `log` (absent = `max`, so `max` output is byte for byte what it was before the setting existed).
- A categorical value counted more than `threshold` times gets its own id; rarer values and missing ones
  get the field's OOV id; categorical val = 1.0.
- Row r (0-based line number) is in the test split iff u(seed, r) < test_fraction, where u is the
  (r+1)-th output of a splitmix64 generator seeded with `seed`, scaled to [0, 1). It depends on nothing
  else, so leader and follower prepared separately stay row-aligned. sample_ids = r.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.errors import DataError
from data_prep.reader import BLOCK_SIZE, LABEL, BatchReader, BatchSource, ProgressFn, dictionary_indices
from data_prep.schema import CRITEO_NUMERIC as DENSE_FIELDS
from data_prep.store import SPLITS, PartyMeta, SplitWriter, publish, staging_dir, write_meta
from vfl_cli.job import JobSpec, PartySpec, Role

COMPACT_MIN_VALUES = 100_000  # pending distinct values per field before a first merge (~2 MB)
DenseScaling = Literal["max", "log"]  # the job's data.dense
SCALING_KEY = "scaling"  # in dense_max.json beside the fields' divisors; absent = "max"

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def split_uniform(seed: int, rows: np.ndarray) -> np.ndarray:
    """u(seed, r) in [0, 1) for each row number r: splitmix64's (r+1)-th output for `seed`, top 53 bits."""
    z = np.uint64(seed % 2**64) + (rows.astype(np.uint64) + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def in_test_split(seed: int, first_row: int, count: int, test_fraction: float) -> np.ndarray:
    """True where row first_row + i belongs to the test split."""
    return split_uniform(seed, np.arange(first_row, first_row + count, dtype=np.int64)) < test_fraction


# --- pass 1: counting ----------------------------------------------------------------------------------


class _ValueCounter:
    """Occurrences of each value of one categorical field; memory grows with distinct values, not rows."""

    def __init__(self, merge_floor: int = COMPACT_MIN_VALUES) -> None:
        self.merge_floor = merge_floor
        self.values: list[pa.Array] = []  # distinct per piece; the first piece is the merged total so far
        self.counts: list[np.ndarray] = []
        self.pending_rows = 0
        self.compacted_rows = 0

    def add(self, column: pa.DictionaryArray) -> None:
        # The reader dictionary-encodes each batch, so counting is a bincount over the indices.
        size = len(column.dictionary)
        counts = np.bincount(dictionary_indices(column), minlength=size + 1)[:size]
        seen = np.flatnonzero(counts)
        self.values.append(column.dictionary.take(pa.array(seen)))
        self.counts.append(counts[seen])
        self.pending_rows += len(seen)
        # Merge when the pieces hold twice the merged size: amortised linear work overall.
        if self.pending_rows > 2 * self.compacted_rows + self.merge_floor:
            self._compact()

    def _compact(self) -> None:
        # Hash the pieces' values together once, then add up their counts per distinct value.
        encoded = pc.dictionary_encode(pa.concat_arrays(self.values))
        total = np.bincount(encoded.indices.to_numpy(), weights=np.concatenate(self.counts))
        self.values, self.counts = [encoded.dictionary], [total.astype(np.int64)]
        self.pending_rows = self.compacted_rows = len(encoded.dictionary)

    def frequent(self, threshold: int) -> pa.Array:
        """Values counted more than `threshold` times, sorted by their raw string (UTF-8 byte order)."""
        if not self.values:
            return pa.array([], pa.string())
        self._compact()
        values = self.values[0].filter(pa.array(self.counts[0] > threshold))
        return values.take(pc.sort_indices(values))


@dataclass
class Counts:
    """What pass 1 learns about the input: sizes, dense divisors, frequent categorical values."""

    rows: int
    test_rows: int
    positives: int | None  # label-1 rows, when the label was read
    dense_max: dict[str, float]  # dense field -> divisor: the column max of its scaled values, 1.0 if <= 0
    frequent: dict[str, pa.Array]
    dense_scaling: DenseScaling = "max"


def count_pass(
    reader: BatchSource,
    fields: Sequence[str],
    threshold: int,
    seed: int,
    test_fraction: float,
    on_batch: Callable[[int, pa.RecordBatch], None] | None = None,
    dense_scaling: DenseScaling = "max",
) -> Counts:
    """Pass 1: rows, test rows, label-1 rows, dense maxima and categorical counts over the whole input.

    `on_batch(first_row, batch)` sees every batch too (`vfl prep table` collects its customer ids there).
    """
    dense = [f for f in fields if f in DENSE_FIELDS]
    counters = {f: _ValueCounter() for f in fields if f not in DENSE_FIELDS}
    maxima: dict[str, float] = {}
    rows = test_rows = 0
    positives: int | None = 0 if reader.with_label else None
    for first_row, batch in reader.batches("count"):
        rows = first_row + batch.num_rows
        test_rows += int(in_test_split(seed, first_row, batch.num_rows, test_fraction).sum())
        if positives is not None:
            positives += int(pc.sum(batch.column(LABEL)).as_py() or 0)
        for field in dense:
            top = pc.max(batch.column(field)).as_py()
            if top is not None:
                maxima[field] = max(maxima.get(field, top), top)
        for field, counter in counters.items():
            counter.add(batch.column(field))
        if on_batch is not None:
            on_batch(first_row, batch)
    if rows == 0:
        raise DataError(f"{reader.path}: empty input, no rows")
    return Counts(
        rows=rows,
        test_rows=test_rows,
        positives=positives,
        dense_max={f: _divisor(maxima.get(f), dense_scaling) for f in dense},
        frequent={f: counter.frequent(threshold) for f, counter in counters.items()},
        dense_scaling=dense_scaling,
    )


def _divisor(top: float | None, scaling: DenseScaling) -> float:
    """The column max of the scaled values from the raw column max (None: all missing); 1.0 if it is <= 0.

    log1p(max(x, 0)) grows with x, so its column max is log1p of the raw one: no pass of its own.
    """
    if top is None or top <= 0:
        return 1.0
    return float(np.log1p(top)) if scaling == "log" else top


def scale_dense(values: np.ndarray, divisor: float, scaling: DenseScaling) -> np.ndarray:
    """Raw dense values (NaN where missing) -> their vals: scaled, divided by `divisor`, missing -> 0.0."""
    if scaling == "log":
        values = np.log1p(np.maximum(values, 0))  # negatives (Criteo's I2 has some) -> 0; NaN stays NaN
    values = values / divisor
    return np.where(np.isnan(values), 0.0, values)


# --- the per-party vocabulary ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PartyVocab:
    """One party's id layout: consecutive id ranges per field, in the party's field order."""

    role: Role
    fields: tuple[str, ...]
    offsets: dict[str, int]  # first id of each field's range (a categorical field's OOV id)
    size: int  # total ids
    frequent: dict[str, pa.Array]  # categorical field -> its frequent values in id order
    dense_max: dict[str, float]  # dense field -> divisor
    dense_scaling: DenseScaling = "max"  # how dense values are scaled before the divisor

    @classmethod
    def build(cls, role: Role, party: PartySpec, counts: Counts) -> PartyVocab:
        offsets: dict[str, int] = {}
        next_id = 0
        for field in party.fields:
            offsets[field] = next_id
            next_id += 1 if field in DENSE_FIELDS else 1 + len(counts.frequent[field])
        return cls(
            role=role,
            fields=party.fields,
            offsets=offsets,
            size=next_id,
            frequent={f: counts.frequent[f] for f in [f for f in party.fields if f not in DENSE_FIELDS]},
            dense_max={f: counts.dense_max[f] for f in [f for f in party.fields if f in DENSE_FIELDS]},
            dense_scaling=counts.dense_scaling,
        )

    @classmethod
    def load(cls, directory: Path, role: Role, party: PartySpec) -> PartyVocab:
        """The vocabulary a previous `vfl prep criteo` or `vfl prep table` wrote to `directory` (to encode new rows)."""
        try:
            meta = json.loads((directory / "meta.json").read_text())
            frequent = json.loads((directory / "vocab.json").read_text())
            dense_max = json.loads((directory / "dense_max.json").read_text())
            fields, offsets, size = tuple(meta["fields"]), dict(meta["field_offsets"]), int(meta["vocab_size"])
            scales = {f: float(dense_max[f]) for f in [f for f in party.fields if f in DENSE_FIELDS] if f in fields}
            scaling = dense_max.get(SCALING_KEY, "max")  # written before the setting existed: max
        except FileNotFoundError as exc:
            raise DataError(f"{exc.filename}: missing; --vocab-from needs a prepared party's directory") from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise DataError(f"{directory}: unreadable vocabulary ({exc!r})") from exc
        if scaling not in get_args(DenseScaling):
            raise DataError(f"{directory / 'dense_max.json'}: unknown {SCALING_KEY} {scaling!r}")
        if meta.get("role") != role:
            raise DataError(f"{directory}: holds the {meta.get('role')}'s vocabulary, not the {role}'s")
        if fields != party.fields:
            raise DataError(f"{directory}: fields {', '.join(fields)} differ from the job's {', '.join(party.fields)}")
        vocab = cls(
            role=role,
            fields=fields,
            offsets=offsets,
            size=size,
            frequent={f: pa.array(frequent.get(f, []), pa.string())
                      for f in party.fields if f not in DENSE_FIELDS},
            dense_max=scales,
            dense_scaling=scaling,
        )
        expected, next_id = {}, 0  # the offsets must follow from the value lists, else the files disagree
        for field in fields:
            expected[field] = next_id
            next_id += 1 if field in DENSE_FIELDS else 1 + len(vocab.frequent[field])
        if expected != offsets or next_id != size:
            raise DataError(f"{directory}: vocab.json does not match the id layout in meta.json")
        return vocab

    def to_json(self) -> str:
        """vocab.json: categorical field -> frequent values in id order, enough to encode new rows."""
        return json.dumps({f: values.to_pylist() for f, values in self.frequent.items()}, indent=1)

    def scales_json(self) -> str:
        """dense_max.json: dense field -> divisor, and the scaling unless it is `max` (then as before it existed)."""
        scaling = {} if self.dense_scaling == "max" else {SCALING_KEY: self.dense_scaling}
        return json.dumps({**self.dense_max, **scaling}, indent=1)

    def encode(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """One batch -> (ids int32 [N, F], vals float32 [N, F]), vectorised per column."""
        ids = np.empty((batch.num_rows, len(self.fields)), dtype=np.int32)
        vals = np.ones((batch.num_rows, len(self.fields)), dtype=np.float32)
        for j, field in enumerate(self.fields):
            offset = self.offsets[field]
            column = batch.column(field)
            if field in self.dense_max:
                ids[:, j] = offset
                raw = column.to_numpy(zero_copy_only=False)  # NaN where missing
                vals[:, j] = scale_dense(raw, self.dense_max[field], self.dense_scaling)
            else:
                # Look up each distinct value of the batch once, then map every row through that table.
                found = pc.index_in(column.dictionary, value_set=self.frequent[field]).fill_null(-1).to_numpy()
                table = np.append(np.where(found >= 0, offset + 1 + found, offset), offset).astype(np.int32)
                ids[:, j] = table[dictionary_indices(column)]
        return ids, vals


# --- pass 2: encoding, and the whole run ------------------------------------------------------------------


@dataclass(frozen=True)
class PassStats:
    phase: str
    rows: int
    seconds: float
    peak_rss_mb: float  # the process's peak resident set size so far


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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _encode_pass(
    reader: BatchReader, vocabs: list[PartyVocab], staging: dict[str, Path], counts: Counts, job: JobSpec,
    test_readers: Sequence[BatchReader] = (),
) -> dict[str, dict[str, SplitWriter]]:
    """Pass 2: encode every batch for each party and append its rows to that party's train or test arrays.
    With `test_readers`, the input is all train and their rows are the test split, numbered after it."""
    test_fraction = 0.0 if test_readers else job.data.test_fraction
    sizes = {"train": counts.rows - counts.test_rows, "test": counts.test_rows}
    writers: dict[str, dict[str, SplitWriter]] = {
        v.role: {
            split: SplitWriter(staging[v.role] / split, sizes[split], len(v.fields), v.role == "leader")
            for split in SPLITS
        }
        for v in vocabs
    }
    try:
        offset = 0
        for source in (reader, *test_readers):
            last = 0
            for first_row, batch in source.batches("encode", total_rows=counts.rows):
                if source is reader:
                    in_test = in_test_split(job.seed, first_row, batch.num_rows, test_fraction)
                else:
                    in_test = np.ones(batch.num_rows, dtype=bool)
                sample_ids = np.arange(offset + first_row, offset + first_row + batch.num_rows, dtype=np.int64)
                labels = batch.column(LABEL).to_numpy().astype(np.float32) if source.with_label else None
                for vocab in vocabs:
                    ids, vals = vocab.encode(batch)
                    for split, rows in (("train", ~in_test), ("test", in_test)):
                        split_labels = labels[rows] if labels is not None and vocab.role == "leader" else None
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
    job: JobSpec,
    out: Path,
    threshold: int,
    roles: Sequence[Role],
    on_progress: ProgressFn | None = None,
    block_size: int = BLOCK_SIZE,
    test_files: Sequence[Path] = (),
) -> PrepResult:
    """Prepare `roles` from raw Criteo text at `path` into `<out>/<role>/`, replacing it only when complete.

    With `test_files`, every row of `path` is a training row (the vocabulary and dense divisors come from them
    alone) and the test split is the rows of `test_files`, in order: a held-out file, as a user who has one
    would evaluate on it, instead of the seeded random test_fraction of `path`."""
    fields = [f for role in roles for f in job.party(role).fields]
    reader = BatchReader(path, fields, "leader" in roles, on_progress, block_size)
    test_readers = [BatchReader(p, fields, "leader" in roles, on_progress, block_size) for p in test_files]
    staging: dict[str, Path] = {}
    try:
        for role in roles:
            staging[role] = staging_dir(out, role)
    except OSError as exc:
        _remove(staging.values())
        raise DataError(f"{out}: cannot write the output directory: {exc.strerror or exc}") from exc
    try:
        started = time.perf_counter()
        counts = count_pass(reader, fields, threshold, job.seed, 0.0 if test_files else job.data.test_fraction,
                            dense_scaling=job.data.dense or "max")
        if test_readers:  # the held-out rows: counted (for the arrays' sizes), never learnt from
            held_out = sum(batch.num_rows for r in test_readers for _, batch in r.batches("count"))
            counts = replace(counts, rows=counts.rows + held_out, test_rows=held_out)
        passes = [PassStats("count", counts.rows, time.perf_counter() - started, _peak_rss_mb())]
        vocabs = [PartyVocab.build(role, job.party(role), counts) for role in roles]
        started = time.perf_counter()
        writers = _encode_pass(reader, vocabs, staging, counts, job, test_readers)
        for vocab in vocabs:
            meta = PartyMeta(
                role=vocab.role,
                fields=vocab.fields,
                has_labels=vocab.role == "leader",
                vocab_size=vocab.size,
                field_offsets=vocab.offsets,
                threshold=threshold,
                source=", ".join([path.name, *(p.name for p in test_files)]),
                splits={split: writer.close() for split, writer in writers[vocab.role].items()},
            )
            write_meta(staging[vocab.role], meta)
            (staging[vocab.role] / "vocab.json").write_text(vocab.to_json() + "\n")
            scales = vocab.scales_json()  # dense divisors and scaling, also needed to encode new rows
            (staging[vocab.role] / "dense_max.json").write_text(scales + "\n")
        passes.append(PassStats("encode", counts.rows, time.perf_counter() - started, _peak_rss_mb()))
        for role in roles:
            publish(staging[role], out / role)
    except OSError as exc:
        raise DataError(f"{out}: cannot write the prepared data: {exc.strerror or exc}") from exc
    finally:
        _remove(p for p in staging.values() if p.exists())
    return PrepResult(
        out=out,
        split_rows={"train": counts.rows - counts.test_rows, "test": counts.test_rows},
        vocab_sizes={v.role: v.size for v in vocabs},
        label_rate=counts.positives / (counts.rows - (counts.test_rows if test_files else 0))
        if counts.positives is not None else None,
        passes=tuple(passes),
    )


def _remove(paths: Iterable[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
