"""The label column by task: what a valid label is, how pass 1 finds the classes, what labels.npy holds.

    binary       0 or 1 (`1.0` is accepted)                      labels.npy: 0.0 / 1.0
    multiclass   any values, text or numbers, compared as text   labels.npy: the class index, as float32
    regression   finite numbers                                  labels.npy: the value, as float32

Multiclass classes are the distinct values of the training rows, sorted numerically when every one parses
as a finite number (so 2 comes before 10), else as strings; `meta.json` records them in that order. Encoding
new rows with a fitted vocabulary (`--vocab-from`) takes that directory's classes, and a value outside them
is an error. A missing label is an error for every task.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.errors import DataError
from data_prep.reader import dictionary_indices, is_number
from data_prep.schema import Task

MAX_CLASSES = 10_000  # more distinct values than this is not a class label (an id column by mistake?)
SHOWN_CLASSES = 20  # classes named in an error message before "..."
CATEGORICAL = pa.dictionary(pa.int32(), pa.string())


@dataclass(frozen=True)
class LabelRule:
    """One party's label column as the readers check it."""

    column: str  # its name in the input
    task: Task
    classes: tuple[str, ...] | None = None  # multiclass encoded with a fitted vocabulary: the known classes

    @property
    def arrow_type(self) -> pa.DataType:
        """The type a reader gives the column: text classes dictionary-encoded per batch, else numbers."""
        return CATEGORICAL if self.task == "multiclass" else pa.float64()

    def first_bad(self, column: pa.Array) -> int | None:
        """Index of the first invalid label in one batch's column (already of `arrow_type`), else None."""
        if self.task == "binary":
            bad = pc.invert(pc.is_in(column, value_set=pa.array([0.0, 1.0]))).fill_null(True)
        elif self.task == "regression":
            bad = pc.invert(pc.is_finite(column)).fill_null(True)
        elif self.classes is None:
            if not column.null_count:
                return None
            bad = column.is_null()
        else:
            known = pc.is_in(column.dictionary, value_set=pa.array(self.classes, pa.string())).to_numpy(
                zero_copy_only=False)
            ok = np.append(known, False)[dictionary_indices(column)]  # missing points past the dictionary
            return None if ok.all() else int(np.argmin(ok))
        if not pc.any(bad).as_py():
            return None
        return int(np.argmax(bad.to_numpy(zero_copy_only=False)))

    def parses(self, cell: str) -> bool:
        """Whether a reader's parser takes this text (the label part of locating a parse error)."""
        if self.task == "binary":
            return cell == "" or (is_number(cell) and float(cell) in (0.0, 1.0))
        return self.task == "multiclass" or cell == "" or is_number(cell)

    def problem(self, cell: str) -> str:
        """What is wrong with this label cell (its text; "" = missing), for the error line."""
        name = self.column
        if self.task == "binary":
            return f"{name} must be 0 or 1, " + ("it is missing" if not cell else f"found {cell!r}")
        if self.task == "regression":
            if not cell:
                return f"{name} must be a number, it is missing"
            return f"{name} must be a{' finite' if is_number(cell) else ''} number, found {cell!r}"
        if not cell:
            return f"{name} is missing (every row needs a label)"
        classes = self.classes or ()
        shown = ", ".join(classes[:SHOWN_CLASSES]) + (", ..." if len(classes) > SHOWN_CLASSES else "")
        return f"{name} {cell!r} is not a class seen in training (classes: {shown})"


class ClassTally:
    """Pass 1's view of a multiclass label column: its distinct values."""

    def __init__(self, column: str) -> None:
        self.column = column
        self.seen: set[str] = set()

    def add(self, labels: pa.DictionaryArray) -> None:
        used = np.bincount(dictionary_indices(labels), minlength=len(labels.dictionary) + 1)[:-1] > 0
        self.seen.update(labels.dictionary.filter(pa.array(used)).to_pylist())
        if len(self.seen) > MAX_CLASSES:
            raise DataError(f"{self.column}: more than {MAX_CLASSES:,} distinct values, too many for a multiclass "
                            "label (is it the right column?)")

    def classes(self) -> tuple[str, ...]:
        return sort_classes(self.seen)


def sort_classes(values: Iterable[str]) -> tuple[str, ...]:
    """Distinct values in class order: numerically if all are finite numbers (ties by text), else as text."""
    distinct = sorted(set(values))
    if all(is_number(v) and math.isfinite(float(v)) for v in distinct):
        return tuple(sorted(distinct, key=lambda v: (float(v), v)))
    return tuple(distinct)


def encode_labels(column: pa.Array, task: Task, classes: tuple[str, ...]) -> np.ndarray:
    """One batch's checked label column -> float32 [N]: the value, or for multiclass the class index."""
    if task != "multiclass":
        return column.to_numpy(zero_copy_only=False).astype(np.float32)
    found = pc.index_in(column.dictionary, value_set=pa.array(classes, pa.string())).fill_null(-1).to_numpy()
    return np.append(found, -1)[dictionary_indices(column)].astype(np.float32)  # -1: refused by the check
