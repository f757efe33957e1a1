"""Marvell: class-dependent Gaussian noise on the leader's returned gradients, shaped so the two classes look alike.

Li et al., "Label Leakage and Protection in Two-party Split Learning" (ICLR 2022). What it protects, against whom:
the leader's labels, against a follower that reads the gradients it receives. For a binary loss every row is
(p_i - y_i) times a vector the batch shares, so without noise the sign of a row's projection on that vector gives
y_i away. Cost: the follower's half of the model learns from noisier gradients.

Per batch, in float64, with g_j the class means (j = 0 negatives, 1 positives), S_j the classes' covariance
matrices (k x k, the rows' actual spread: for a linear top both lie along one line), p the batch's fraction of
positives, e = (g1 - g0) / |g1 - g0| and the budget P = power * |g1 - g0|^2 (expected noise power per row):

1. Match the spreads. A row of class j gets, as noise, the deviation of a random row of the *other* class from that
   class's mean, so both classes end with the distribution of (own deviation + other's deviation) around their
   means: covariance S0 + S1 for both, and the same shape in every moment. Equal spreads are what the follower's
   attacks on spread (the absolute projection on a minor axis, a quadratic discriminant, a mixture model) need to
   differ; the paper's Gaussian model only matches the covariance, and a sampled square root of a rank-deficient
   covariance leaves rounding-sized noise off the rows' line that is itself class-dependent. It costs
   p tr(S0) + (1 - p) tr(S1), the data's own spread: small against the class-mean gap.
2. Hide the gap. What is left of P goes along e, split between the classes (a_0, a_1) to minimise the symmetrised
   KL divergence of the two classes' Gaussians along e (means |g1 - g0| apart, variances u + a_j with u = e^T
   (S0 + S1) e): the paper's objective, with its closed form (`along_split`).

Why not the paper's own solver: it models each class as isotropic (S_j = u_j I) and, where one class is tighter,
pours noise across e into that class only; on a real cut layer, whose classes have no spread across e at all, that
noise is the label (the absolute projection on the minor axis recovered 0.99 AUC in our audit). Step 1 replaces
that model by the classes' measured covariances; the "dynamic" budget of the authors' code is not implemented.

Returns a bitwise copy of grad and draws nothing when power = 0, when the batch holds one class only (or is empty)
or when g1 == g0 exactly. Otherwise it draws one uniform then one standard normal per row from the generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class MarvellSolution:
    """The noise one batch gets: class j, the other class's spread (covariance[1 - j]) plus N(0, along[j]) along e.

    `direction` is e ([k], float64); `means` the class means g0, g1 ([k] float64); `covariance` the classes'
    measured covariances S0, S1 ([k, k] float64, the gradient's squared units); `along` the extra variance along
    e per class; `budget` P; `matching_cost` what step 1 spends; `pos_fraction` p; `sum_kl` and `sum_kl_before`
    the symmetrised KL along e after and before.
    """

    direction: Tensor
    means: tuple[Tensor, Tensor]
    covariance: tuple[Tensor, Tensor]
    along: tuple[float, float]
    budget: float
    matching_cost: float
    pos_fraction: float
    sum_kl: float
    sum_kl_before: float


def along_sum_kl(u: float, v: float, gap: float, a0: np.ndarray | float, a1: np.ndarray | float) -> np.ndarray:
    """KL(N(gap, v + a1) || N(0, u + a0)) + the reverse, in nats: (X + gap)/Y + (Y + gap)/X over 2, minus 1, with
    X = u + a0, Y = v + a1 and gap the squared distance of the means. Vectorised; inf where a variance is 0."""
    x, y = u + np.asarray(a0, dtype=np.float64), v + np.asarray(a1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(0.5 * ((x + gap) / y + (y + gap) / x) - 1.0)


def along_split(budget: float, u: float, v: float, gap: float, p: float) -> tuple[float, float]:
    """The (a0, a1) >= 0 with p a1 + (1 - p) a0 = budget that minimise `along_sum_kl` (closed form).

    With X = a0 + u, Y = a1 + v and C = budget + p v + (1 - p) u, the objective restricted to p Y + (1 - p) X = C is
    convex in X (each term is linear-fractional with a positive, affine denominator); its stationary point has
    Y / X = sqrt((C + (1 - p) gap) / (C + p gap)), clipped to the feasible X in [u, u + budget / (1 - p)].
    """
    c = budget + p * v + (1 - p) * u
    ratio = math.sqrt((c + (1 - p) * gap) / (c + p * gap))  # Y / X at the stationary point
    x = min(max(c / (p * ratio + 1 - p), u), u + budget / (1 - p))
    a0 = max(x - u, 0.0)
    return a0, max((budget - (1 - p) * a0) / p, 0.0)


def _check_inputs(grad: Tensor, labels: Tensor, power: float) -> None:
    if grad.dim() != 2 or grad.shape[1] < 1:
        raise ValueError(f"grad must be a 2-d tensor [B, k] with k >= 1, got shape {tuple(grad.shape)}")
    if not grad.is_floating_point():
        raise ValueError(f"grad must be a floating-point tensor, got {grad.dtype}")
    if labels.dim() != 1 or labels.shape[0] != grad.shape[0]:
        raise ValueError(f"labels must be a 1-d tensor [B] with B = {grad.shape[0]}, got shape {tuple(labels.shape)}")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    if not (power >= 0 and math.isfinite(power)):
        raise ValueError(f"power must be finite and >= 0, got {power}")
    if not bool(torch.isfinite(grad).all()):
        raise ValueError("grad must be finite")


def _covariance(rows: Tensor) -> Tensor:
    """The rows' covariance [k, k] (divided by n: the spread the follower sees), 0 for a single row."""
    centred = rows - rows.mean(dim=0)
    return centred.T @ centred / rows.shape[0]


def marvell_solution(grad: Tensor, labels: Tensor, power: float) -> MarvellSolution | None:
    """The noise `marvell_noise` would draw for this batch, or None when it would add nothing. Draws nothing.

    Everything is computed in units of |g1 - g0|^2 (the problem is scale-free there, and float64 never sees the
    1e-18 variances of a 1/B-scaled gradient), then scaled back.
    """
    _check_inputs(grad, labels, power)
    pos = labels == 1
    n1 = int(pos.sum())
    n0 = grad.shape[0] - n1
    if power == 0 or n1 == 0 or n0 == 0:
        return None
    g64 = grad.detach().to(torch.float64).cpu()
    pos = pos.cpu()
    g1, g0 = g64[pos].mean(dim=0), g64[~pos].mean(dim=0)  # (k,) each
    diff = g1 - g0
    gap = float(diff.square().sum())
    if gap == 0:
        return None
    e = diff / math.sqrt(gap)
    s0, s1 = _covariance(g64[~pos]), _covariance(g64[pos])  # (k, k) each
    p = n1 / grad.shape[0]
    matching = (p * float(torch.trace(s0)) + (1 - p) * float(torch.trace(s1))) / gap
    u = float(e @ (s0 + s1) @ e) / gap  # both classes' variance along e once matched
    a0, a1 = along_split(max(power - matching, 0.0), u, u, 1.0, p)
    u0, u1 = float(e @ s0 @ e) / gap, float(e @ s1 @ e) / gap
    return MarvellSolution(
        direction=e,
        means=(g0, g1),
        covariance=(s0, s1),
        along=(a0 * gap, a1 * gap),
        budget=power * gap,
        matching_cost=matching * gap,
        pos_fraction=p,
        sum_kl=float(along_sum_kl(u, u, 1.0, a0, a1)),
        sum_kl_before=float(along_sum_kl(u0, u1, 1.0, 0.0, 0.0)),
    )


def marvell_noise(grad: Tensor, labels: Tensor, power: float, generator: torch.Generator) -> Tensor:
    """The leader's returned gradient [B, k] with Marvell's noise added (see the module docstring); same dtype and
    device. Raises ValueError for a grad that is not [B, k] floating and finite, labels that are not [B] in
    {0, 1}, or a negative or non-finite power.

    Example: grad [B, 2] float32, labels [B] float32 in {0, 1} -> [B, 2] float32.
    """
    solution = marvell_solution(grad, labels, power)
    if solution is None:
        return grad.clone()
    g64 = grad.detach().to(torch.float64).cpu()
    pos = (labels == 1).cpu()
    members = (torch.nonzero(~pos)[:, 0], torch.nonzero(pos)[:, 0])  # row indices of each class
    uniform = torch.rand(grad.shape[0], generator=generator, dtype=torch.float64)  # (B,)
    normal = torch.randn(grad.shape[0], generator=generator, dtype=torch.float64)  # (B,)
    noise = torch.empty_like(g64)  # (B, k)
    for cls in (0, 1):
        rows, other = members[cls], members[1 - cls]
        # A deviation of a random row of the other class from its mean: noise with that class's distribution
        # (every moment, not only the covariance), and no square root to round off the line the rows lie on.
        picked = other[(uniform[rows] * len(other)).long().clamp(max=len(other) - 1)]
        noise[rows] = g64[picked] - solution.means[1 - cls]
        noise[rows] += (math.sqrt(solution.along[cls]) * normal[rows]).unsqueeze(1) * solution.direction
    return (g64 + noise).to(device=grad.device, dtype=grad.dtype)
