"""The label party's own features given in a predict request (`{"ids": [...], "rows": [{column: value}, ...]}`),
for data fresher than its store: encoded exactly as `vfl prep` encoded its table (the vocabulary and scaling
stored beside the prepared arrays; an unseen category gets its column's OOV id, a missing or null value is
filled as preparation fills it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_prep.encode import PartyVocab
from data_prep.errors import DataError
from data_prep.schema import PartySchema

MAX_CELL_CHARS = 256


class RowError(ValueError):
    """A row that cannot be encoded; the message names the row and column."""


class RowEncoder:
    def __init__(self, store_dir: Path, schema: PartySchema) -> None:
        self.vocab = PartyVocab.load(store_dir, schema)  # DataError where the directory's files are unusable
        self.columns = self.vocab.columns

    def encode(self, rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [N, F], vals float32 [N, F]) of the rows; RowError for an unknown column or a value of the
        wrong type."""
        known = {name for name, _ in self.columns}
        for i, row in enumerate(rows):
            extra = sorted(set(row) - known)
            if extra:
                raise RowError(f"rows[{i}]: unknown column {extra[0][:40]!r}; the label party's columns are "
                               f"{', '.join(sorted(known))}")
        arrays = {name: self._column(rows, name, kind) for name, kind in self.columns}
        try:
            ids, vals = self.vocab.encode(pa.RecordBatch.from_pydict(arrays))
        except (DataError, pa.ArrowException) as exc:
            raise RowError(f"rows: {exc}") from exc
        return ids.astype(np.int64), vals

    @staticmethod
    def _column(rows: list[dict[str, Any]], name: str, kind: str) -> pa.Array:
        values = [row.get(name) for row in rows]
        for i, value in enumerate(values):
            if kind == "numeric" and not (value is None or isinstance(value, int | float)) or isinstance(value, bool):
                raise RowError(f"rows[{i}].{name}: a number or null, got {type(value).__name__}")
            if kind != "numeric" and not (value is None or isinstance(value, str | int)):
                raise RowError(f"rows[{i}].{name}: a string, number or null, got {type(value).__name__}")
            if isinstance(value, str) and len(value) > MAX_CELL_CHARS:
                raise RowError(f"rows[{i}].{name}: longer than {MAX_CELL_CHARS} characters")
        if kind == "numeric":
            return pa.array([None if v is None else float(v) for v in values], pa.float64())
        return pa.array([None if v is None else str(v) for v in values], pa.string()).dictionary_encode()
