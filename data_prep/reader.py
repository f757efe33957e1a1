"""Reading raw Criteo text: plain or gzip lines -> Arrow record batches of the requested columns.

The layout of a line is fixed (label, I1..I13, C1..C26, tab separated); each requested column is read as
its kind in the schema says: numeric as float64, categorical as text. Parsing runs in a background thread
(Arrow releases the GIL), so on two cores reading overlaps with the caller's counting or encoding. A parse
error is located by re-reading the lines, so the message names the file and line.
"""

from __future__ import annotations

import gzip
import math
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from data_prep.errors import DataError
from data_prep.schema import CRITEO_FIELDS, Kind

LABEL = "\x00label"  # the label column's name inside batches; cannot clash with a column of a table
COLUMNS = ("label", *CRITEO_FIELDS)  # the layout of a raw line
BLOCK_SIZE = 1 << 20  # bytes per parsed block (~4k Criteo rows); the reader holds ~40 MB at this size
ProgressFn = Callable[[str, int, int], None]  # (phase, rows done, rows total or an estimate from bytes read)


class BatchSource(Protocol):
    """What the counting and encoding passes read: `BatchReader` here, the table sources (`data_prep.source`)."""

    path: Path
    with_label: bool  # batches carry a LABEL column

    def batches(self, phase: str, total_rows: int | None = None) -> Iterator[tuple[int, pa.RecordBatch]]: ...


class BatchReader:
    """Streams raw Criteo text as Arrow record batches holding only the requested columns.

    Categorical columns come dictionary-encoded per batch, so later steps hash each distinct value of a
    batch once instead of once per row. Bad input becomes a DataError naming the file and line.
    """

    def __init__(
        self,
        path: Path,
        columns: Sequence[tuple[str, Kind]],
        with_label: bool,
        on_progress: ProgressFn | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        if not path.is_file():
            raise DataError(f"{path}: input file not found")
        self.path = path
        self.with_label = with_label
        unknown = [name for name, _ in columns if name not in CRITEO_FIELDS]
        if unknown:
            raise DataError(f"{path}: Criteo text has no column(s) {', '.join(unknown)} (label, I1..I13 and "
                            "C1..C26 only); a table with a header row is `vfl prep table`'s")
        self.columns = ([LABEL] if with_label else []) + [name for name, _ in columns]
        self.dense = [name for name, kind in columns if kind == "numeric"]
        self.on_progress = on_progress
        self.block_size = block_size
        self.gzipped = is_gzip(path)
        categorical = pa.dictionary(pa.int32(), pa.string())
        types = {name: pa.float64() if kind == "numeric" else categorical for name, kind in columns}
        self.convert = pa_csv.ConvertOptions(
            column_types={LABEL: pa.int8(), **types},
            include_columns=self.columns,
            null_values=[""],  # only an empty field is missing; "NA" or "null" are values (or bad numbers)
            strings_can_be_null=True,
        )

    def batches(self, phase: str, total_rows: int | None = None) -> Iterator[tuple[int, pa.RecordBatch]]:
        """Yield (row number of the batch's first line, batch) through the whole file."""
        yield from csv_batches(
            self.path,
            pa_csv.ReadOptions(column_names=[LABEL, *CRITEO_FIELDS], block_size=self.block_size, use_threads=False),
            pa_csv.ParseOptions(delimiter="\t", quote_char=False, ignore_empty_lines=False),
            self.convert,
            check=self._check,
            locate=self._locate,
            progress=None if self.on_progress is None else partial(self.on_progress, phase),
            total_rows=total_rows,
        )

    def _check(self, first_row: int, batch: pa.RecordBatch) -> None:
        """Vectorised checks the parser cannot do: labels are 0/1, dense values are finite.

        Cheap aggregates first (min/max of the label, the sum of each dense column, which is not finite if
        any value is inf or NaN); the row-level search runs only when one of them looks wrong.
        """
        if self.with_label:
            label = batch.column(LABEL)
            low_high = pc.min_max(label)
            if label.null_count or low_high["min"].as_py() < 0 or low_high["max"].as_py() > 1:
                bad = pc.invert(pc.is_in(label, value_set=pa.array([0, 1], pa.int8()))).fill_null(True)
                row = first_row + int(np.argmax(bad.to_numpy(zero_copy_only=False)))
                value = label[row - first_row].as_py()
                found = "it is missing" if value is None else f"found {value}"
                raise DataError(f"{self.path}:{row + 1}: label must be 0 or 1, {found}")
        for field in self.dense:
            column = batch.column(field)
            if math.isfinite(pc.sum(column).as_py() or 0.0):
                continue
            bad = pc.invert(pc.is_finite(column)).fill_null(False)
            if pc.any(bad).as_py():  # else the sum merely overflowed
                row = first_row + int(np.argmax(bad.to_numpy(zero_copy_only=False)))
                raise DataError(f"{self.path}:{row + 1}: {field} must be a finite number")

    def _locate(self, first_row: int) -> str | None:
        """Find the first bad line at or after `first_row` (a slow scan, on the error path only)."""
        wanted = {COLUMNS.index(f): f for f in self.dense}
        opener = gzip.open if self.gzipped else open
        with opener(self.path, "rt", encoding="utf-8", errors="replace", newline="\n") as handle:
            for row, line in enumerate(handle):
                if row < first_row:
                    continue
                parts = line.rstrip("\n").split("\t")
                where = f"{self.path}:{row + 1}"
                if len(parts) != len(COLUMNS):
                    return f"{where}: expected {len(COLUMNS)} tab-separated columns, found {len(parts)}"
                if self.with_label and parts[0] not in ("0", "1"):
                    return f"{where}: label must be 0 or 1, found {parts[0]!r}"
                for index, field in wanted.items():
                    if parts[index] and not is_number(parts[index]):
                        return f"{where}: {field} must be a number, found {parts[index]!r}"
        return None


def is_gzip(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def csv_batches(
    path: Path,
    read_options: pa_csv.ReadOptions,
    parse_options: pa_csv.ParseOptions,
    convert_options: pa_csv.ConvertOptions,
    *,
    check: Callable[[int, pa.RecordBatch], None],
    locate: Callable[[int], str | None],
    progress: Callable[[int, int], None] | None,
    total_rows: int | None,
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(row number of the batch's first row, batch) through a plain or gzipped delimited file, each batch
    checked by `check`; a parse error becomes a DataError at the line `locate` finds (or the file's name)."""
    size = max(path.stat().st_size, 1)
    raw = pa.OSFile(str(path), "rb")
    stream = pa.CompressedInputStream(raw, "gzip") if is_gzip(path) else raw
    first_row = 0
    parsed: Generator[pa.RecordBatch, None, None] | None = None
    try:
        parsed = _prefetch(pa_csv.open_csv(stream, read_options, parse_options, convert_options))
        for batch in parsed:
            check(first_row, batch)
            done = first_row + batch.num_rows
            if progress is not None:
                # Before pass 1 has counted the rows, extrapolate from the share of input bytes read
                # (the parser reads a little ahead); never report done before the end.
                progress(done, total_rows or max(done + 1, int(done * size / max(raw.tell(), 1))))
            yield first_row, batch
            first_row = done
        if progress is not None:
            progress(first_row, first_row)
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise DataError(f"{path}: empty input, no rows") from exc
        raise DataError(locate(first_row) or f"{path}: unreadable input ({exc})") from exc
    except OSError as exc:  # e.g. a corrupt or truncated gzip stream
        raise DataError(f"{path}: cannot read input ({exc})") from exc
    finally:
        if parsed is not None:
            parsed.close()  # stops the parsing thread before the file closes
        stream.close()
        raw.close()


def _prefetch(reader: pa.RecordBatchReader, depth: int = 2) -> Generator[pa.RecordBatch, None, None]:
    """Parse the next batches in a background thread while the caller works on the current one.

    Arrow parses without holding the GIL, so on two cores reading and counting/encoding overlap.
    """
    ready: queue.Queue[pa.RecordBatch | BaseException | None] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        item: pa.RecordBatch | BaseException | None
        while not stop.is_set():
            try:
                item = reader.read_next_batch()
            except StopIteration:
                item = None
            except BaseException as exc:  # handed to the consumer, which raises it
                item = exc
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(item, pa.RecordBatch):
                return

    worker = threading.Thread(target=produce, name="csv-prefetch", daemon=True)
    worker.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


def dictionary_indices(column: pa.DictionaryArray) -> np.ndarray:
    """A dictionary column's indices, with missing values pointing one past the dictionary's end."""
    indices = column.indices
    if indices.null_count:
        indices = indices.fill_null(len(column.dictionary))
    return indices.to_numpy()


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
