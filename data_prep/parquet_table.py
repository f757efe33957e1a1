"""A party's own table as a Parquet file (`ParquetTable`, a `data_prep.source.TableSource`).

A file is Parquet by its name (`.parquet`, `.pq`) or its first bytes (`PAR1`). It is read through
pyarrow.parquet in batches (`iter_batches`, at most `BATCH_ROWS` rows of the needed columns at a time), so
memory is bounded by a batch and a row group, not by the file.

Column types: a numeric column must hold numbers (integers, floats, booleans, decimals; cast to float64),
so a text column declared numeric is an error naming the column; a categorical column's values become
text (an integer code 12 becomes "12", as a CSV export would write it); the id column becomes text; a
binary or regression label must hold numbers, a multiclass label becomes text. Nulls are missing values.
Errors name the file, the row (1-based data row, as a CSV's line would be) and the column.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import closing
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.errors import DataError
from data_prep.labels import LabelRule
from data_prep.reader import LABEL, ProgressFn
from data_prep.schema import Kind, PartySchema
from data_prep.source import ID, Labels, check_batch, check_names

PARQUET_SUFFIXES = (".parquet", ".pq")
MAGIC = b"PAR1"
BATCH_ROWS = 65_536  # rows per batch read (a row group smaller than this is one batch)


def is_parquet(path: Path) -> bool:
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return True
    with path.open("rb") as handle:
        return handle.read(4) == MAGIC


def _numbers(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return any(test(kind) for test in (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean,
                                       pa.types.is_decimal, pa.types.is_null))


class ParquetTable:
    """Streams a Parquet table as Arrow record batches: ID, LABEL (if read) and the requested columns."""

    unit = "row"

    def __init__(
        self,
        path: Path,
        schema: PartySchema,
        columns: Sequence[tuple[str, Kind]],
        labels: Labels,
        classes: tuple[str, ...] | None = None,
        on_progress: ProgressFn | None = None,
        batch_rows: int = BATCH_ROWS,
    ) -> None:
        if not path.is_file():
            raise DataError(f"{path}: input file not found")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file, no Parquet schema")
        try:
            with closing(pq.ParquetFile(path)) as handle:
                types, self.rows = handle.schema_arrow, handle.metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
        self.path = path
        self.id_column = schema.id_column
        self.with_label = check_names(f"{path}: the Parquet schema", schema, columns, types.names, labels)
        self.rule = LabelRule(schema.label.column, schema.label.task, classes) \
            if self.with_label and schema.label is not None else None
        self.numeric = [name for name, kind in columns if kind == "numeric"]
        self.on_progress = on_progress
        self.batch_rows = batch_rows
        # input column -> (name in the batches, whether it must hold numbers: cast to float64, else to text)
        self.read: dict[str, tuple[str, bool]] = {self.id_column: (ID, False)}
        if self.rule is not None:
            self.read[self.rule.column] = (LABEL, self.rule.task != "multiclass")
        self.read.update({name: (name, kind == "numeric") for name, kind in columns})
        for column, (_, numbers) in self.read.items():
            kind = types.field(column).type
            if numbers and not _numbers(kind):
                label = self.rule is not None and column == self.rule.column
                what = f"a {self.rule.task} label" if label and self.rule is not None else "declared numeric"
                raise DataError(f"{path}: column {column!r} holds {kind}, not numbers ({what})")
            if pa.types.is_nested(kind):
                raise DataError(f"{path}: column {column!r} holds {kind}, not single values")

    def batches(self, phase: str, total_rows: int | None = None) -> Iterator[tuple[int, pa.RecordBatch]]:
        """Yield (data row number of the batch's first row, batch) through the whole table."""
        first_row = 0
        try:
            with closing(pq.ParquetFile(self.path)) as handle:
                for raw in handle.iter_batches(batch_size=self.batch_rows, columns=list(self.read), use_threads=False):
                    batch = self._convert(raw)
                    check_batch(first_row, batch, id_column=self.id_column, rule=self.rule, numeric=self.numeric,
                                where=self.where, cell=partial(self._cell, raw, first_row))
                    first_row += batch.num_rows
                    if self.on_progress is not None:
                        self.on_progress(phase, first_row, total_rows or self.rows)
                    yield first_row - batch.num_rows, batch
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{self.path}: cannot read the Parquet data near {self.where(first_row)} ({exc})") from exc

    def _convert(self, raw: pa.RecordBatch) -> pa.RecordBatch:
        arrays, names = [], []
        for column, (name, numbers) in self.read.items():
            values = raw.column(column)
            if isinstance(values, pa.DictionaryArray):
                values = values.dictionary_decode()
            if numbers:
                values = pc.cast(values, pa.float64())
            else:
                values = pc.cast(values, pa.string())
                if name != ID:
                    values = values.dictionary_encode()
            arrays.append(values)
            names.append(name)
        return pa.RecordBatch.from_arrays(arrays, names=names)

    def _cell(self, raw: pa.RecordBatch, first_row: int, row: int, column: str) -> str:
        """The value as the file holds it (2 for an integer column, not the 2.0 it was cast to), as text."""
        value = raw.column(column)[row - first_row].as_py()
        return "" if value is None else str(value)

    def where(self, row: int) -> str:
        return f"{self.path}: row {row + 1}"

    def ids_at(self, rows: set[int]) -> Iterator[tuple[int, int, str]]:
        first_row = 0
        with closing(pq.ParquetFile(self.path)) as handle:
            for raw in handle.iter_batches(batch_size=self.batch_rows, columns=[self.id_column], use_threads=False):
                ids = pc.cast(raw.column(0), pa.string()).to_pylist()
                for i, customer in enumerate(ids):
                    if first_row + i in rows:
                        yield first_row + i, first_row + i + 1, customer
                first_row += raw.num_rows
