"""Numeric columns: the three scalings, fitted in pass 1, applied in pass 2, and stored in dense_max.json.

A numeric column has one id; its val is the raw value x scaled by what was fitted on the party's own rows:

    standard   (x - mean) / std            mean and population std of the present values; std 1.0 where the
                                           column is constant or all missing (then mean 0.0)
    max        x / column max              the divisor is 1.0 where the column max is <= 0 or all are missing
    log        log(1 + max(x, 0)) / m      m: the column max of log(1 + max(x, 0)), 1.0 where it is <= 0

A missing value becomes 0.0: for `standard` that is the training mean, for `max` and `log` zero.

The mean and std are accumulated over fixed blocks of `MOMENT_BLOCK` input rows, numbered from the first
row, and the blocks are combined in order (Chan et al.'s pairwise update), so the fitted values do not depend
on how the input was cut into batches (CSV block size, Parquet row groups).

dense_max.json, what a later `--vocab-from` needs to scale new rows the same way:

    max, log     {"<column>": divisor, ..., "scaling": "log"}      (no "scaling" key for max: the format
                                                                    from before the setting existed)
    standard     {"scaling": "standard", "columns": {"<column>": {"mean": m, "std": s}, ...}}

(max and log take the second layout too, `{"scaling": "max", "columns": {"<column>": divisor}}`, when a
numeric column is itself named "scaling".) Floats are written as Python's repr, so they read back exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.schema import SCALINGS, Scaling

SCALING_KEY = "scaling"  # in dense_max.json: the scaling (absent in the flat layout = max)
COLUMNS_KEY = "columns"  # in dense_max.json's nested layout: column -> its fitted values
MOMENT_BLOCK = 4096  # input rows per block of the mean/std accumulation


@dataclass(frozen=True)
class Scale:
    """One numeric column's fitted scaling: vals = (t(x) - shift) / divisor, missing -> 0.0, where t is
    log(1 + max(x, 0)) for `log` and x otherwise; shift is the mean for `standard` and 0 otherwise."""

    scaling: Scaling
    divisor: float
    shift: float = 0.0

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Raw values (float64, NaN where missing) -> their vals (float64)."""
        if self.scaling == "log":
            values = np.log1p(np.maximum(values, 0))  # negatives (Criteo's I2 has some) -> 0; NaN stays NaN
        if self.scaling == "standard":
            values = (values - self.shift) / self.divisor
        else:
            values = values / self.divisor
        return np.where(np.isnan(values), 0.0, values)

    def stored(self) -> float | dict[str, float]:
        return {"mean": self.shift, "std": self.divisor} if self.scaling == "standard" else self.divisor


class NumericTally:
    """Pass 1's view of one numeric column: its max (`max`, `log`) or its mean and std (`standard`)."""

    def __init__(self, scaling: Scaling) -> None:
        self.scaling = scaling
        self.top: float | None = None  # max and log: the raw column max so far
        self.count = 0  # standard: present values in the blocks combined so far, their mean and M2
        self.mean = self.m2 = 0.0
        self.low, self.high = math.inf, -math.inf
        self.carry = np.empty(0)  # standard: the rows of the current, unfinished block

    def add(self, column: pa.Array) -> None:
        """The column's values in the next rows of the input (float64, null where missing)."""
        if self.scaling != "standard":
            top = pc.max(column).as_py()
            if top is not None:
                self.top = top if self.top is None else max(self.top, top)
            return
        values = column.to_numpy(zero_copy_only=False)
        if len(self.carry):
            values = np.concatenate([self.carry, values])
        full = len(values) - len(values) % MOMENT_BLOCK
        for start in range(0, full, MOMENT_BLOCK):
            self._combine(values[start : start + MOMENT_BLOCK])
        self.carry = values[full:].copy()

    def _combine(self, block: np.ndarray) -> None:
        present = block[~np.isnan(block)]
        if not len(present):
            return
        count, mean = len(present), float(present.mean())
        m2 = float(np.square(present - mean).sum())
        self.low, self.high = min(self.low, float(present.min())), max(self.high, float(present.max()))
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total

    def fit(self) -> Scale:
        if self.scaling != "standard":
            return Scale(self.scaling, max_divisor(self.top, self.scaling))
        if len(self.carry):
            self._combine(self.carry)
            self.carry = np.empty(0)
        if self.count == 0:
            return Scale("standard", 1.0, 0.0)
        if self.low == self.high:  # constant: exactly that value, so every val is exactly 0.0
            return Scale("standard", 1.0, self.low)
        std = math.sqrt(self.m2 / self.count)
        return Scale("standard", std if std > 0 else 1.0, min(max(self.mean, self.low), self.high))


def max_divisor(top: float | None, scaling: Scaling) -> float:
    """The column max of the scaled values from the raw column max (None: all missing); 1.0 if it is <= 0.

    log1p(max(x, 0)) grows with x, so its column max is log1p of the raw one: no pass of its own.
    """
    if top is None or top <= 0:
        return 1.0
    return float(np.log1p(top)) if scaling == "log" else top


def scales_json(scaling: Scaling, scales: dict[str, Scale]) -> str:
    """dense_max.json's text for these fitted columns (the module docstring draws both layouts)."""
    if scaling == "standard" or SCALING_KEY in scales:
        body: dict[str, Any] = {SCALING_KEY: scaling, COLUMNS_KEY: {c: s.stored() for c, s in scales.items()}}
    else:
        body = {c: s.stored() for c, s in scales.items()}
        if scaling != "max":
            body[SCALING_KEY] = scaling
    return json.dumps(body, indent=1)


def read_scales(raw: Any, columns: tuple[str, ...]) -> tuple[Scaling, dict[str, Scale]]:
    """The scaling and each of `columns`' Scale from dense_max.json's parsed JSON; ValueError (or KeyError,
    TypeError) where it is not one of the layouts or lacks a column."""
    if not isinstance(raw, dict):
        raise TypeError("dense_max.json must hold a JSON object")
    scaling = raw.get(SCALING_KEY, "max")
    if scaling not in SCALINGS:
        raise ValueError(f"unknown {SCALING_KEY} {scaling!r}")
    nested = isinstance(raw.get(COLUMNS_KEY), dict) and SCALING_KEY in raw
    stored = raw[COLUMNS_KEY] if nested else raw
    scales = {}
    for column in columns:
        if column not in stored:
            raise ValueError(f"no entry for the numeric column {column!r}")
        value = stored[column]
        if scaling == "standard":
            scales[column] = Scale("standard", float(value["std"]), float(value["mean"]))
        else:
            scales[column] = Scale(scaling, float(value))
    return scaling, scales
