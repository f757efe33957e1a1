"""Synthetic Criteo-format text with a planted, learnable signal split across both parties' fields.

Owns `write_synth(path, rows, seed)`. The output looks like Criteo's `train.txt`: label, I1..I13, C1..C26,
tab separated, no header, empty = missing. Shapes follow the real data loosely: dense counts are
heavy-tailed (log-normal, I2 sometimes negative), categorical values are 8-hex-digit strings drawn from
power-law (Zipf-like) rank distributions whose support ranges from a handful to a million values, and every
field has its own missing rate.

The label is Bernoulli(sigmoid(logit)) with logit = bias + per-value effects of a few categorical fields
and a log-count effect of one dense field, on both sides of the default leader/follower split (leader:
I1..I7, C1..C13; follower: I8..I13, C14..C26), so a model that sees both parties' fields clearly beats the
leader's alone. Effects sit on the frequent values, so a threshold like 5 on ~20k rows keeps them learnable.
The bias is calibrated once so ~25% of rows are positive. Everything is numpy-vectorised per chunk and
deterministic in (seed, rows); a `.gz` suffix on the output path writes gzip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from data_prep.errors import DataError

CHUNK_ROWS = 200_000  # fixed so that the output depends on (seed, rows) only
POSITIVE_RATE = 0.25
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)

# Per dense field: (log-normal mu, sigma, missing rate). Wide sigmas give Criteo's long count tails.
_DENSE = (
    (0.5, 1.4, 0.45), (2.0, 1.8, 0.0), (1.8, 1.2, 0.21), (1.6, 1.0, 0.22), (7.5, 2.0, 0.03),
    (3.5, 1.8, 0.22), (1.5, 1.6, 0.04), (2.0, 1.1, 0.0), (3.5, 1.4, 0.04), (0.3, 0.6, 0.45),
    (0.8, 1.0, 0.04), (0.2, 1.2, 0.77), (1.6, 1.1, 0.22),
)  # fmt: skip
# Per categorical field: (support size K, tail power p, missing rate). rank = floor(K * u**p): larger p
# concentrates mass on the first ranks, K bounds the distinct values.
_CATEGORICAL = (
    (1_400, 3.0, 0.0), (550, 2.5, 0.0), (1_000_000, 4.0, 0.03), (400_000, 4.0, 0.03), (300, 3.0, 0.0),
    (20, 2.0, 0.12), (12_000, 3.0, 0.0), (600, 3.5, 0.0), (3, 2.0, 0.0), (90_000, 3.5, 0.0),
    (5_000, 3.0, 0.0), (800_000, 4.0, 0.03), (3_000, 3.0, 0.0), (27, 2.0, 0.0), (14_000, 3.0, 0.0),
    (600_000, 4.0, 0.03), (10, 1.5, 0.0), (5_000, 3.0, 0.0), (2_000, 3.0, 0.44), (4, 1.5, 0.44),
    (700_000, 4.0, 0.03), (18, 2.0, 0.76), (15, 2.0, 0.0), (100_000, 3.5, 0.03), (100, 2.5, 0.44),
    (80_000, 3.5, 0.44),
)  # fmt: skip
# Where the signal lives (0-based indices into I1..I13 / C1..C26) and how strong each field is (std of
# its per-value effects). Leader fields first, then follower fields of about the same total strength.
_SIGNAL_CATEGORICAL = {0: 0.8, 1: 0.7, 4: 0.6, 13: 0.8, 14: 0.7, 16: 0.6}  # C1, C2, C5 | C14, C15, C17
_SIGNAL_DENSE = {2: 0.25, 8: -0.2}  # I3 | I9, per unit of log1p(count)
_SIGNAL_TOP_RANKS = 400  # ranks beyond this share no effect: too rare to learn at a small threshold


@dataclass(frozen=True)
class _Plan:
    """What does not depend on the chunk: value spellings, per-value effects, the calibrated bias."""

    spellings: list[pa.Array]  # per categorical field, rank -> 8-hex-digit string
    effects: dict[int, np.ndarray]  # categorical field index -> effect per rank (first ranks only)
    bias: float


def _hex_strings(codes: np.ndarray) -> pa.Array:
    """uint32 codes -> 8-hex-digit strings, vectorised via nibbles and a lookup table."""
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    nibbles = (codes[:, None] >> shifts) & np.uint32(0xF)
    text = _HEX[nibbles].reshape(-1)
    offsets = np.arange(0, 8 * len(codes) + 1, 8, dtype=np.int32)
    return pa.StringArray.from_buffers(len(codes), pa.py_buffer(offsets), pa.py_buffer(text.tobytes()))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser: an invertible mix, so distinct inputs give distinct outputs."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _make_plan(seed: int) -> _Plan:
    rng = np.random.default_rng([seed, 1])
    # Spell rank r of a field as fmix32(r + salt): fmix32 is a bijection on 32-bit ints, so distinct ranks
    # get distinct, random-looking codes without a uniqueness check.
    salts = rng.integers(0, 2**32, size=len(_CATEGORICAL), dtype=np.uint64)
    spellings = [
        _hex_strings(_fmix32((np.arange(size, dtype=np.uint64) + salt).astype(np.uint32)))
        for (size, _, _), salt in zip(_CATEGORICAL, salts, strict=True)
    ]
    effects = {
        field: rng.normal(0.0, std, size=min(_CATEGORICAL[field][0], _SIGNAL_TOP_RANKS))
        for field, std in _SIGNAL_CATEGORICAL.items()
    }
    plan = _Plan(spellings, effects, 0.0)
    # Calibrate the bias on a separate sample so that ~25% of labels are positive, by bisection.
    _, _, logits = _draw_features(np.random.default_rng([seed, 2]), 100_000, plan)
    low, high = -10.0, 10.0
    for _ in range(50):
        mid = (low + high) / 2
        rate = float(np.mean(1.0 / (1.0 + np.exp(-(logits + mid)))))
        low, high = (mid, high) if rate < POSITIVE_RATE else (low, mid)
    return _Plan(spellings, effects, (low + high) / 2)


def _draw_features(
    rng: np.random.Generator, rows: int, plan: _Plan
) -> tuple[list[np.ma.MaskedArray], list[np.ma.MaskedArray], np.ndarray]:
    """Dense counts and categorical ranks (masked where missing), plus the logit without the bias."""
    logits = np.zeros(rows)
    dense = []
    for index, (mu, sigma, missing) in enumerate(_DENSE):
        counts = np.floor(rng.lognormal(mu, sigma, rows)).astype(np.int64)
        if index == 1:  # I2 is the one Criteo field with small negative values
            counts = np.where(rng.random(rows) < 0.05, -rng.integers(1, 4, rows), counts)
        if index in _SIGNAL_DENSE:
            logits += _SIGNAL_DENSE[index] * (np.log1p(np.maximum(counts, 0)) - mu)
        dense.append(np.ma.masked_array(counts, mask=rng.random(rows) < missing))
    categorical = []
    for index, (size, power, missing) in enumerate(_CATEGORICAL):
        ranks = np.minimum((size * rng.random(rows) ** power).astype(np.int64), size - 1)
        mask = rng.random(rows) < missing
        if index in plan.effects:
            effect = plan.effects[index]
            known = (ranks < len(effect)) & ~mask
            logits += np.where(known, effect[np.minimum(ranks, len(effect) - 1)], 0.0)
        categorical.append(np.ma.masked_array(ranks, mask=mask))
    return dense, categorical, logits


def _chunk_table(rng: np.random.Generator, rows: int, plan: _Plan) -> pa.Table:
    dense, categorical, logits = _draw_features(rng, rows, plan)
    labels = (rng.random(rows) < 1.0 / (1.0 + np.exp(-(logits + plan.bias)))).astype(np.int8)
    columns: dict[str, pa.Array] = {"label": pa.array(labels)}
    for index, counts in enumerate(dense):
        columns[f"I{index + 1}"] = pa.array(counts.data, mask=counts.mask)
    for index, ranks in enumerate(categorical):
        columns[f"C{index + 1}"] = pc.take(plan.spellings[index], pa.array(ranks.data, mask=ranks.mask))
    return pa.table(columns)


def write_synth(path: Path, rows: int, seed: int = 0, on_rows: Callable[[int], None] | None = None) -> None:
    """Write `rows` synthetic Criteo lines to `path` (gzip when it ends in .gz); `on_rows(n)` after each chunk."""
    if rows <= 0:
        raise DataError(f"{path}: --rows must be positive, got {rows}")
    plan = _make_plan(seed)
    rng = np.random.default_rng([seed, 3])
    options = pa_csv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sink = pa.output_stream(str(path), compression="gzip" if path.suffix == ".gz" else None)
    except OSError as exc:
        raise DataError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    with sink, pa_csv.CSVWriter(sink, _chunk_table(rng, 0, plan).schema, write_options=options) as writer:
        for start in range(0, rows, CHUNK_ROWS):
            count = min(CHUNK_ROWS, rows - start)
            writer.write_table(_chunk_table(rng, count, plan))
            if on_rows is not None:
                on_rows(count)
