"""A party's own table as the preparation reads it: the `TableSource` interface that both formats implement
(`data_prep.csv_table` for CSV/TSV, `data_prep.parquet_table` for Parquet), and the checks they share.

A source yields Arrow record batches holding the customer id as `ID` (text), the label as `LABEL` when it
is read (its type by task, `data_prep.labels`), and each requested column under its own name: numeric as
float64, categorical as dictionary-encoded text. Columns are found by name; others are ignored. Every bad
input is one DataError naming the file, the line (CSV) or the row (Parquet), and the column.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.errors import DataError
from data_prep.labels import LabelRule
from data_prep.reader import LABEL, BatchSource
from data_prep.schema import Kind, PartySchema

ID = "\x00customer_id"  # the id column's name inside batches; cannot clash with a column of a table
Labels = bool | None  # True: required, False: not read, None: read when the table has the column


class TableSource(BatchSource, Protocol):
    unit: str  # what `where` and `ids_at` count: "line" (CSV, the header is line 1) or "row" (Parquet, from 1)

    def where(self, row: int) -> str:
        """The place of data row `row` (0-based) for an error line: "file:line" or "file: row n"."""
        ...

    def ids_at(self, rows: set[int]) -> Iterator[tuple[int, int, str]]:
        """(data row, its line or row number, customer id) for each of `rows`, in file order (error path)."""
        ...


def check_names(
    where: str, schema: PartySchema, columns: Sequence[tuple[str, Kind]], names: list[str], labels: Labels
) -> bool:
    """Check that the table's column `names` hold the id column, `columns` and, as `labels` asks, the label
    column; `where` is e.g. "file: header". Returns whether the label column is read."""
    role = schema.role
    label = schema.label.column if schema.label is not None else None
    with_label = label is not None and (labels is True or (labels is None and label in names))
    used = [schema.id_column, *(name for name, _ in columns)] + ([label] if with_label and label else [])
    if len(set(used)) != len(used):
        raise DataError(f"parties.{role}: id_column and label_column must differ from each other and the columns")
    if schema.id_column not in names:
        raise DataError(f"{where} has no id column {schema.id_column!r} (parties.{role}.id_column)")
    missing = [name for name, _ in columns if name not in names]
    if missing:
        raise DataError(f"{where} lacks the {role}'s field column(s) {', '.join(missing)}")
    if labels is True and label is not None and label not in names:
        raise DataError(f"{where} has no label column {label!r} (parties.{role}.label_column)")
    repeated = sorted({name for name in used if names.count(name) > 1})
    if repeated:
        raise DataError(f"{where} names column {repeated[0]!r} more than once")
    return with_label


def check_batch(
    first_row: int,
    batch: pa.RecordBatch,
    *,
    id_column: str,
    rule: LabelRule | None,
    numeric: Sequence[str],
    where: Callable[[int], str],
    cell: Callable[[int, str], str],
) -> None:
    """What a parser cannot check: ids present, labels valid for the task, numeric values finite (cheap
    aggregates first). `where(row)` places a data row, `cell(row, column)` is its text ("" = missing)."""
    ids = batch.column(ID)
    if ids.null_count:
        row = first_row + _first(ids.is_null())
        raise DataError(f"{where(row)}: {id_column} is missing (every row needs a customer id)")
    if rule is not None:
        bad = rule.first_bad(batch.column(LABEL))
        if bad is not None:
            raise DataError(f"{where(first_row + bad)}: {rule.problem(cell(first_row + bad, rule.column))}")
    for name in numeric:
        column = batch.column(name)
        if np.isfinite(pc.sum(column).as_py() or 0.0):
            continue
        bad_values = pc.invert(pc.is_finite(column)).fill_null(False)
        if pc.any(bad_values).as_py():  # else the sum merely overflowed
            row = first_row + _first(bad_values)
            raise DataError(f"{where(row)}: {name} must be a finite number, found {cell(row, name)!r}")


def _first(mask: pa.Array) -> int:
    return int(np.argmax(mask.to_numpy(zero_copy_only=False)))
