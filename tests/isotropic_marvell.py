"""The isotropic-model Marvell that vfl shipped until issue 16, kept only as a test subject for the attacks.

It modelled each class's gradient spread as isotropic (u I, v I) and, where one class was tighter, poured noise
across e into that class alone; on a real cut layer, whose classes have no spread across e, that noise marks the
class (the audit's |PC2| and QDA attacks recover ~0.99 AUC). `tests/test_attacks.py` reproduces the finding with it;
`vfl_cli.privacy.marvell` is the defence that replaced it. Not used by vfl itself.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

_GRID = 2049  # first pass over the along/across budget split
_ZOOM_POINTS = 65  # each refinement pass re-grids the two cells around the best point
_ZOOM_ROUNDS = 8  # 2049 points then 8 x (2/64): the split is resolved far below float64 precision


def marvell_sum_kl(
    u: Any, v: Any, g: Any, d: int, a0: Any, b0: Any, a1: Any, b1: Any
) -> Any:
    """KL(N1 || N0) + KL(N0 || N1) for N1 = N(g1, v I + Sigma1), N0 = N(g0, u I + Sigma0), in nats.

    Sigma_j = a_j e e^T + b_j (I - e e^T) with e along g1 - g0, g = |g1 - g0|^2 and d the dimension; u, v are the
    negatives' and positives' per-coordinate variances. Along e both covariances are diagonal with the mean gap, so:
        1/2 [ (a0+u+g)/(a1+v) + (a1+v+g)/(a0+u) + (d-1) ((b0+u)/(b1+v) + (b1+v)/(b0+u)) ] - d.
    Vectorised over numpy arrays (float64). Orthogonal to e two equal variances (even both 0, two point masses at the
    same place) contribute nothing; a zero variance against a positive one, or along e against the gap, is inf.
    """
    a0, b0, a1, b1 = (np.asarray(x, dtype=np.float64) for x in (a0, b0, a1, b1))
    with np.errstate(divide="ignore", invalid="ignore"):
        along = (a0 + u + g) / (a1 + v) + (a1 + v + g) / (a0 + u)
        ratio = np.where(b0 + u == b1 + v, 1.0, (b0 + u) / (b1 + v))
        across = (d - 1) * (ratio + 1 / ratio) if d > 1 else 0.0
    return 0.5 * (along + across) - d


def _along_best(s_a: np.ndarray, u: float, v: float, g: float, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Best (a0, a1) >= 0 with p a1 + (1 - p) a0 = s_a, for each budget in s_a (closed form).

    With X = a0 + u, Y = a1 + v and C = s_a + p v + (1 - p) u, the along-e part (X + g)/Y + (Y + g)/X restricted to
    p Y + (1 - p) X = C is convex in X (each term is linear-fractional with a positive, affine denominator); setting
    its derivative to zero gives (X^2 - Y^2) C/p + g ((1-p)/p X^2 - Y^2) = 0, i.e. Y / X = sqrt((C + (1-p) g) /
    (C + p g)). The constrained minimiser is that stationary point clipped to X in [u, u + s_a / (1 - p)].
    """
    c = s_a + p * v + (1 - p) * u
    ratio = np.sqrt((c + (1 - p) * g) / (c + p * g))  # Y / X at the stationary point
    x = np.clip(c / (p * ratio + 1 - p), u, u + s_a / (1 - p))
    a0 = np.maximum(x - u, 0.0)
    a1 = np.maximum((s_a - (1 - p) * a0) / p, 0.0)
    return a0, a1


def _across_best(s_b: np.ndarray, u: float, v: float, d: int, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Best (b0, b1) >= 0 with (d - 1)(p b1 + (1 - p) b0) = s_b (closed form; k >= 2).

    The across part (d-1) h((b0+u)/(b1+v)), h(r) = r + 1/r, only asks the two variances to be as close as possible:
    pour the budget into the class with the smaller spread until they are equal, then into both alike.
    """
    c = s_b / (d - 1)  # p b1 + (1 - p) b0
    if u <= v:
        gap = (1 - p) * (v - u)  # what it costs to lift the negatives' spread to the positives'
        b0 = np.where(c <= gap, c / (1 - p), v - u + (c - gap))
        b1 = np.where(c <= gap, 0.0, c - gap)
    else:
        gap = p * (u - v)
        b1 = np.where(c <= gap, c / p, u - v + (c - gap))
        b0 = np.where(c <= gap, 0.0, c - gap)
    return b0, b1


def solve_marvell(u: float, v: float, g: float, d: int, p: float, budget: float) -> tuple[float, float, float, float]:
    """Minimise `marvell_sum_kl` over a0, b0, a1, b1 >= 0 subject to p (a1 + (d-1) b1) + (1-p)(a0 + (d-1) b0) = P.

    Returns (a0, b0, a1, b1). Needs g > 0, 0 < p < 1, P >= 0, d >= 1. The inequality constraint <= P of the paper
    is met with equality at an optimum: adding c to all four variances costs d c and never raises the objective
    (it pulls every variance ratio towards 1 and shrinks the mean-gap terms). For a given split of P between the
    along-e part (s_a) and the across part (s_b = P - s_a) both halves have closed forms (`_along_best`,
    `_across_best`); the 1-d split, which need not be convex, is found by a dense grid then zoomed grids around the
    best point: deterministic, no random restarts.
    """
    if d == 1:
        a0, a1 = _along_best(np.array([budget]), u, v, g, p)
        return float(a0[0]), 0.0, float(a1[0]), 0.0
    lo, hi, points = 0.0, budget, _GRID
    for _ in range(_ZOOM_ROUNDS + 1):
        s_a = np.linspace(lo, hi, points)
        a0, a1 = _along_best(s_a, u, v, g, p)
        b0, b1 = _across_best(np.maximum(budget - s_a, 0.0), u, v, d, p)
        objective = np.nan_to_num(marvell_sum_kl(u, v, g, d, a0, b0, a1, b1), nan=np.inf)
        best = int(np.argmin(objective))  # the first minimum: ties resolve the same way every time
        lo, hi, points = s_a[max(best - 1, 0)], s_a[min(best + 1, points - 1)], _ZOOM_POINTS
    return float(a0[best]), float(b0[best]), float(a1[best]), float(b1[best])


def isotropic_marvell_noise(grad: Tensor, labels: Tensor, power: float, generator: torch.Generator) -> Tensor:
    """The old defence's noise on one batch [B, k] (labels [B] in {0, 1}, both classes present)."""
    g64 = grad.detach().to(torch.float64)
    pos = labels == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    g1, g0 = g64[pos].mean(dim=0), g64[~pos].mean(dim=0)
    diff = g1 - g0
    gap = float(diff.square().sum())
    d = grad.shape[1]
    u = float((g64[~pos] - g0).square().sum()) / (n0 * d) / gap
    v = float((g64[pos] - g1).square().sum()) / (n1 * d) / gap
    a0, b0, a1, b1 = solve_marvell(u, v, 1.0, d, n1 / grad.shape[0], power)
    e = (diff / math.sqrt(gap)).to(grad.dtype)
    z = torch.randn(grad.shape, generator=generator, dtype=grad.dtype)
    cls = labels.long().unsqueeze(1)
    sd_along = torch.tensor([math.sqrt(a0 * gap), math.sqrt(a1 * gap)], dtype=grad.dtype)[cls]
    sd_across = torch.tensor([math.sqrt(b0 * gap), math.sqrt(b1 * gap)], dtype=grad.dtype)[cls]
    return grad + sd_across * z + (sd_along - sd_across) * (z @ e).unsqueeze(1) * e
