"""Pass 1 of every preparation: one streaming read that fits what the encoding needs (`count_pass`).

Per column, by its kind in the schema (never by its name): a numeric column's max or mean and std
(`data_prep.scaling`), a categorical column's occurrences of each value (`ValueCounter`); and for the label
party the rows, the test rows, the label-1 rows (binary) or the classes (multiclass, `data_prep.labels`).
Memory grows with the distinct categorical values, not with the rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.errors import DataError
from data_prep.labels import ClassTally
from data_prep.reader import LABEL, BatchSource, dictionary_indices
from data_prep.scaling import NumericTally, Scale
from data_prep.schema import PartySchema
from data_prep.splits import in_test_split

COMPACT_MIN_VALUES = 100_000  # pending distinct values per column before a first merge (~2 MB)


class ValueCounter:
    """Occurrences of each value of one categorical column; memory grows with distinct values, not rows."""

    def __init__(self, merge_floor: int = COMPACT_MIN_VALUES) -> None:
        self.merge_floor = merge_floor
        self.values: list[pa.Array] = []  # distinct per piece; the first piece is the merged total so far
        self.counts: list[np.ndarray] = []
        self.pending_rows = 0
        self.compacted_rows = 0

    def add(self, column: pa.DictionaryArray) -> None:
        # The readers dictionary-encode each batch, so counting is a bincount over the indices.
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
    """What pass 1 learns about the input."""

    rows: int
    test_rows: int
    positives: int | None  # label-1 rows, when binary labels were read
    scales: dict[str, Scale]  # numeric column -> its fitted scaling
    frequent: dict[str, pa.Array]  # categorical column -> values counted more than the threshold, sorted
    classes: tuple[str, ...] = field(default=())  # multiclass labels read: the classes in index order


def count_pass(
    reader: BatchSource,
    schemas: Sequence[PartySchema],
    seed: int,
    test_fraction: float,
    on_batch: Callable[[int, pa.RecordBatch], None] | None = None,
) -> Counts:
    """Pass 1 over the whole input for the columns of `schemas` (one party's, or both read from one file;
    a name may appear in one schema only). `on_batch(first_row, batch)` sees every batch too (`vfl prep
    table` collects its customer ids there)."""
    numeric = {name: NumericTally(s.scaling) for s in schemas for name in s.numeric}
    counters = {name: ValueCounter() for s in schemas for name in s.categorical}
    if len(numeric) + len(counters) != sum(len(s.columns) for s in schemas):
        raise ValueError("count_pass: a column is named in more than one schema")
    task = next((s.task for s in schemas if s.task is not None), None) if reader.with_label else None
    label = next((s.label for s in schemas if s.label is not None), None)
    positives: int | None = 0 if task == "binary" else None
    classes = ClassTally(label.column) if task == "multiclass" and label is not None else None
    rows = test_rows = 0
    for first_row, batch in reader.batches("count"):
        rows = first_row + batch.num_rows
        test_rows += int(in_test_split(seed, first_row, batch.num_rows, test_fraction).sum())
        if positives is not None:
            positives += int(pc.sum(batch.column(LABEL)).as_py() or 0)
        if classes is not None:
            classes.add(batch.column(LABEL))
        for name, tally in numeric.items():
            tally.add(batch.column(name))
        for name, counter in counters.items():
            counter.add(batch.column(name))
        if on_batch is not None:
            on_batch(first_row, batch)
    if rows == 0:
        raise DataError(f"{reader.path}: empty input, no rows")
    return Counts(
        rows=rows,
        test_rows=test_rows,
        positives=positives,
        scales={name: tally.fit() for name, tally in numeric.items()},
        frequent={name: counters[name].frequent(s.threshold) for s in schemas for name in s.categorical},
        classes=classes.classes() if classes is not None else (),
    )
