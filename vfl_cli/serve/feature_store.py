"""A party's features by customer id, for online scoring: `FeatureStore.open(data_dir)` over a prepared
party directory (`vfl psi`'s aligned splits, or new customers prepared with `--vocab-from` and aligned with
`vfl psi --out`), and `lookup(ids)` -> the rows' ids and vals.

No scan and no copy of the table per request: the arrays stay memory-mapped; opening sorts each split's
customer ids once (an int64 order and the sorted ids, 8 + w bytes per row for ids of w bytes), and a lookup is
a binary search per id (O(log n)) and a gather of just those rows. An id held by no split is reported as
missing (the caller decides what a follower answers for it: see the serving docs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.store import PartyData, SplitArrays
from vfl_cli.errors import DataError


@dataclass(frozen=True)
class Rows:
    """The features of the looked-up ids, in the order asked: ids int64 [B, F], vals float32 [B, F] (zeros where
    missing), and found bool [B]."""

    ids: np.ndarray
    vals: np.ndarray
    found: np.ndarray


@dataclass(frozen=True)
class _Split:
    arrays: SplitArrays
    order: np.ndarray  # int64 [N]: the rows in ascending customer id
    sorted_ids: np.ndarray  # S<w> [N]: the customer ids in that order


class FeatureStore:
    def __init__(self, data: PartyData, splits: list[_Split]) -> None:
        self.data, self._splits = data, splits
        self.columns = len(data.meta.fields)

    @classmethod
    def open(cls, directory: Path) -> FeatureStore:
        """Every split of a prepared party directory that has customer ids; DataError where none has."""
        data = PartyData(directory)
        splits = []
        for name in data.meta.splits:
            ids = data.customer_ids(name)
            if ids is None:
                continue
            order = np.argsort(ids, kind="stable").astype(np.int64)
            sorted_ids = np.asarray(ids[order])
            if len(sorted_ids) > 1 and (sorted_ids[1:] == sorted_ids[:-1]).any():
                raise DataError(f"{directory / name}: a customer id appears twice")
            splits.append(_Split(data.split(name), order, sorted_ids))
        if not splits:
            raise DataError(f"{directory}: no split with customer ids (prepare the data with `vfl psi`)")
        return cls(data, splits)

    @property
    def size(self) -> int:
        return sum(len(s.order) for s in self._splits)

    def lookup(self, customer_ids: Sequence[str | bytes]) -> Rows:
        """The rows of `customer_ids` (str or UTF-8 bytes), in that order; the first split that holds an id wins
        (a customer is in one split of aligned data)."""
        wanted = np.array([c.encode() if isinstance(c, str) else c for c in customer_ids], dtype=object)
        count = len(wanted)
        ids = np.zeros((count, self.columns), dtype=np.int64)
        vals = np.zeros((count, self.columns), dtype=np.float32)
        found = np.zeros(count, dtype=bool)
        for split in self._splits:
            todo = np.flatnonzero(~found)
            if not len(todo):
                break
            keys = wanted[todo].astype(split.sorted_ids.dtype)
            at = np.minimum(np.searchsorted(split.sorted_ids, keys), len(split.sorted_ids) - 1)
            # An id longer than the split's width is truncated by the cast: compare the full bytes too.
            hit = (split.sorted_ids[at] == keys) & np.array([len(w) <= split.sorted_ids.dtype.itemsize
                                                             for w in wanted[todo]], dtype=bool)
            rows = split.order[at[hit]]
            ids[todo[hit]] = split.arrays.ids[rows]
            vals[todo[hit]] = split.arrays.vals[rows]
            found[todo[hit]] = True
        return Rows(ids, vals, found)
