"""A party's own table as CSV or TSV text (`CsvTable`, a `data_prep.source.TableSource`).

A header row, then one row per customer; plain or gzip; comma or tab separated (detected from the header
line: a tab in it means TSV, else CSV; or given). Values as exports write them: `260.0` for an integer,
quoted fields ("a,b"), CRLF line ends, a UTF-8 BOM; an empty cell (quoted or not) is missing. Blank lines
are skipped; a value may not contain a newline. Customer ids are text, compared byte for byte (no trimming).

Parsing is Arrow's, streamed in blocks (`data_prep.reader.csv_batches`); on the error path the text is read
again with the csv module to name the line and the cell.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.csv as pa_csv

from data_prep.errors import DataError
from data_prep.labels import LabelRule
from data_prep.reader import BLOCK_SIZE, LABEL, ProgressFn, csv_batches, is_gzip, is_number
from data_prep.schema import Kind, PartySchema
from data_prep.source import ID, Labels, check_batch, check_names


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


class CsvTable:
    """Streams a CSV/TSV table as Arrow record batches: ID, LABEL (if read) and the requested columns."""

    unit = "line"

    def __init__(
        self,
        path: Path,
        schema: PartySchema,
        columns: Sequence[tuple[str, Kind]],
        labels: Labels,
        classes: tuple[str, ...] | None = None,
        delimiter: str | None = None,
        on_progress: ProgressFn | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        self.path = path
        self.id_column = schema.id_column
        header, self.delimiter = read_header(path, delimiter)
        self.with_label = check_names(f"{path}: header", schema, columns, header, labels)
        self.rule = LabelRule(schema.label.column, schema.label.task, classes) \
            if self.with_label and schema.label is not None else None
        self.numeric = [name for name, kind in columns if kind == "numeric"]
        self.on_progress = on_progress
        self.block_size = block_size
        # Columns get canonical names; ignored ones placeholders, so no name is ambiguous.
        rename = {self.id_column: ID, **{name: name for name, _ in columns}}
        if self.rule is not None:
            rename[self.rule.column] = LABEL
        self.names = [rename.get(name, f"\x00ignored{i}") for i, name in enumerate(header)]
        self.header_width = len(header)
        categorical = pa.dictionary(pa.int32(), pa.string())
        types = {name: pa.float64() if kind == "numeric" else categorical for name, kind in columns}
        label = {LABEL: self.rule.arrow_type} if self.rule is not None else {}
        self.convert = pa_csv.ConvertOptions(
            column_types={ID: pa.string(), **label, **types},  # a binary label may be written 1.0
            include_columns=[ID, *label, *types],
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        )

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
        check_batch(first_row, batch, id_column=self.id_column, rule=self.rule, numeric=self.numeric,
                    where=self.where, cell=self._cell)

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

    def where(self, row: int) -> str:
        line = next((line for _, line, _ in self._rows(row)), row + 2)
        return f"{self.path}:{line}"

    def ids_at(self, rows: set[int]) -> Iterator[tuple[int, int, str]]:
        index = self.names.index(ID)
        for row, line, cells in self._rows():
            if row in rows:
                yield row, line, cells[index]

    def _cell(self, row: int, column: str) -> str:
        cells = next((cells for _, _, cells in self._rows(row)), [])
        index = self.names.index(LABEL if self.rule is not None and column == self.rule.column else column)
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
                if name == LABEL and self.rule is not None and not self.rule.parses(cell):
                    return f"{where}: {self.rule.problem(cell)}"
                if name in self.numeric and cell and not is_number(cell):
                    return f"{where}: {name} must be a number, found {cell!r}"
        return None
