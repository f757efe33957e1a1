"""The seeded train/test split: which rows are test rows, from the seed and the row number alone.

Row r (0-based) is in the test split iff u(seed, r) < test_fraction, where u is the (r+1)-th output of a
splitmix64 generator seeded with `seed`, scaled to [0, 1). It depends on nothing else, so parties that
prepare separately (`vfl prep criteo --role`), or that align their rows first (`vfl psi`, where r is the
position in the agreed order), split identically without a message. `vfl prep split` draws its
membership from the same generator under another seed.
"""

from __future__ import annotations

import numpy as np

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
