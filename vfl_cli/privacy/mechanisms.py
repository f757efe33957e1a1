"""Cut-layer defences as pure torch functions: label DP, gradient noise (isotropic, Marvell), embedding DP and RR.

Each runs at the party that owns the secret, before the tensor leaves it, and takes an explicit `torch.Generator`
so a run is reproducible from its seed. None does I/O or knows the job spec; the loop decides when to call them.

- `randomized_response` (leader, on its training labels): protects the labels against a curious follower, since
  every gradient it returns is then computed from a label that is wrong with probability 1/(e^eps + 1); it costs
  accuracy, because the model is fitted to those noisy labels.
- `perturb_gradients` (leader, on the gradients it returns): protects the labels against a follower that reads the
  sign or norm of its gradients; it costs accuracy, because the follower's half of the model learns from clipped,
  noisy gradients.
- `embedding_dp` and `one_bit_rr` (follower, on the embeddings it sends): protect the follower's features against
  a curious leader that would invert the embeddings; they cost accuracy, because the leader's top sees a noisy
  (or 1-bit) follower signal. They do nothing for the labels.
- `marvell_noise` (leader, on the gradients it returns): protects the labels like `perturb_gradients`, but spends its
  noise budget where it hides the most: Gaussian noise whose covariance depends on the row's label and is chosen per
  batch (Li et al.'s Marvell) to minimise how far apart the two classes' gradient distributions are. It costs
  accuracy like any gradient noise.

The Gaussian pair switched off (noise 0, clip_norm inf) returns a copy bitwise equal to its input and draws nothing
from the generator, so the rest of the run's random stream is that of a run without defences; so does
`marvell_noise` at power 0 (or on a batch it cannot help). The randomised response pair has no "off" value
(eps = inf still draws its uniforms): the loop turns it off by not calling it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


def flip_probability(eps: float) -> float:
    """Randomised response's flip probability 1 / (e^eps + 1): 0.5 at eps = 0, 0 at eps = inf.

    Computed as e^-eps / (1 + e^-eps), which does not overflow for large eps. Raises ValueError for a negative or
    NaN eps (a flip probability above 1/2 would just invert the labels, which protects nothing).
    """
    if math.isnan(eps) or eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    tail = math.exp(-eps)
    return tail / (1.0 + tail)


def randomized_response(labels: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    """Flip each 0/1 label independently with probability 1/(e^eps + 1) (eps-label-DP, MindSpore's LabelDP).

    Example: labels [B] float32 in {0, 1} -> [B] float32 in {0, 1}, same dtype and device.
    One uniform is drawn per label whatever eps is, so the generator's stream after the call depends only on B.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-d tensor [B], got shape {tuple(labels.shape)}")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    p = flip_probability(eps)
    flip = torch.rand(labels.shape, generator=generator, device=labels.device) < p  # (B,)
    return torch.where(flip, 1 - labels, labels)


def _clip_rows(x: Tensor, clip_norm: float) -> Tensor:
    """Scale each row of x [B, k] whose L2 norm exceeds clip_norm down to norm clip_norm; other rows stay bitwise."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # (B, 1)
    # where() rather than a min(1, C/norm) factor: rows inside the ball keep their exact bits, and a zero row
    # never divides by zero.
    return torch.where(norms > clip_norm, x * (clip_norm / norms), x)


def _clip_and_noise(x: Tensor, clip_norm: float, noise_multiplier: float, generator: torch.Generator) -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected a 2-d tensor [B, k], got shape {tuple(x.shape)}")
    if math.isnan(clip_norm) or clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0 (inf = no clipping), got {clip_norm}")
    if math.isnan(noise_multiplier) or noise_multiplier < 0 or math.isinf(noise_multiplier):
        raise ValueError(f"noise multiplier must be finite and >= 0, got {noise_multiplier}")
    if math.isinf(clip_norm) and noise_multiplier > 0:
        # The noise is scaled to the clipping bound; without a bound there is no scale to state it against.
        raise ValueError("noise needs a finite clip_norm: its std is noise multiplier * clip_norm")
    out = x.clone() if math.isinf(clip_norm) else _clip_rows(x, clip_norm)
    if noise_multiplier == 0:
        return out  # draws nothing, so the generator's stream is untouched when the defence is off
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # (B, k)
    return out + noise * (noise_multiplier * clip_norm)


def perturb_gradients(grad: Tensor, clip_norm: float, noise_ratio: float, generator: torch.Generator) -> Tensor:
    """Clip each row of the leader's returned gradient to L2 norm clip_norm, then add isotropic Gaussian noise.

    Noise-to-signal ratio, as used here: the per-coordinate noise std divided by the clipping bound,
    std = noise_ratio * clip_norm, i.e. DP-SGD's noise multiplier. The clipping bound is the largest norm a row can
    carry, so noise_ratio = 1 puts noise of one standard deviation the size of the largest possible gradient on
    each coordinate. With clip_norm set to the batch's largest row norm this is the isotropic-noise baseline of
    Li et al. ("Label Leakage and Protection in Two-party Split Learning"), whose noise is t * max_i ||g_i||.
    The gradient's scale is the loss's (a mean loss gives ~1/B per row), so clip_norm is in those units.

    Example: grad [B, 1] -> [B, 1]. noise_ratio = 0 with clip_norm = inf returns a bitwise-equal copy.
    """
    return _clip_and_noise(grad, clip_norm, noise_ratio, generator)


def embedding_dp(emb: Tensor, clip_norm: float, sigma: float, generator: torch.Generator) -> Tensor:
    """Clip each row of the follower's embedding to L2 norm clip_norm, then add Gaussian noise of std sigma * clip_norm.

    This is the Gaussian mechanism on each row: any two clipped rows differ by at most 2 * clip_norm, so one release
    is (eps, delta)-DP for the row when sigma >= 2 * sqrt(2 ln(1.25 / delta)) / eps (eps < 1); repeated releases of
    the same sample (every epoch) compose. sigma is the same kind of multiplier as `perturb_gradients`' noise_ratio.
    The function is differentiable (clip and add), so the follower may back-propagate through it or around it.

    Example: emb [B, 1] -> [B, 1]. sigma = 0 with clip_norm = inf returns a bitwise-equal copy.
    """
    return _clip_and_noise(emb, clip_norm, sigma, generator)


def one_bit_rr(emb: Tensor, eps: float, generator: torch.Generator, scale: float = 1.0) -> Tensor:
    """Send one noisy sign bit per coordinate: bit = emb >= 0, flipped with probability 1/(e^eps + 1), as +-scale.

    What it is: each coordinate is reduced to its sign (the magnitude never leaves the follower) and the bit goes
    through randomised response, so each coordinate's bit is eps-local-DP; a row of k coordinates is k*eps-DP, and
    each epoch's release composes. The leader's top then learns from +-scale instead of the embedding value.
    Threshold 0, not the batch median: the bit then depends on the row alone (a median would mix in the rest of the
    batch) and matches what a [B, 1] cut layer means by sign.

    How it differs from MindSpore Federated's `EmbeddingDP` (its 1-bit "unary quantization + randomized response"):
    MindSpore sends bits {0, 1} (emb > 0 -> 1) and flips with q = 1/(e^(eps/2) + 1), the symmetric unary-encoding
    budget; here the flip probability is 1/(e^eps + 1) per bit, as for the labels, and bits map to +-scale so a zero-
    mean embedding stays zero-mean. The output carries no autograd history: the follower back-propagates the
    gradient it receives through its own emb (straight through), as it would without the defence.

    Example: emb [B, k] float -> [B, k] same dtype, values in {-scale, +scale}.
    """
    if emb.dim() != 2:
        raise ValueError(f"expected a 2-d tensor [B, k], got shape {tuple(emb.shape)}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    p = flip_probability(eps)
    bit = emb.detach() >= 0  # (B, k)
    flip = torch.rand(emb.shape, generator=generator, device=emb.device) < p  # (B, k)
    sent = bit ^ flip
    return (sent.to(emb.dtype) * 2 - 1) * scale  # {0, 1} -> {-scale, +scale}


# --- Marvell: class-dependent Gaussian noise on the returned gradients -----------------------------------------------

_GRID = 2049  # first pass over the along/across budget split
_ZOOM_POINTS = 65  # each refinement pass re-grids the two cells around the best point
_ZOOM_ROUNDS = 8  # 2049 points then 8 x (2/64): the split is resolved far below float64 precision


@dataclass(frozen=True)
class MarvellSolution:
    """The noise covariances Marvell chose for one batch: Sigma_j = along_j * e e^T + across_j * (I - e e^T).

    `direction` is e = (g1 - g0) / |g1 - g0| ([k], float64); index 0 is the negatives' (y = 0), 1 the positives'.
    `across` is the variance in each of the k - 1 directions orthogonal to e (0 when k = 1). `budget` is P, in the
    gradient's squared units, and `pos_fraction` is p; p * tr(Sigma1) + (1 - p) * tr(Sigma0) = P. `sum_kl` and
    `sum_kl_before` are the symmetrised KL of the two modelled class distributions with and without the noise.
    """

    direction: Tensor
    along: tuple[float, float]
    across: tuple[float, float]
    budget: float
    pos_fraction: float
    sum_kl: float
    sum_kl_before: float


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


def _check_marvell_inputs(grad: Tensor, labels: Tensor, power: float) -> None:
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


def marvell_solution(grad: Tensor, labels: Tensor, power: float) -> MarvellSolution | None:
    """The covariances `marvell_noise` would draw from for this batch, or None when it would add nothing.

    None when power = 0, when the batch holds only one class (or is empty), or when g1 == g0. Deterministic: it draws
    nothing. Statistics are taken in float64: g_j the class means, u (v) the negatives' (positives') mean squared
    distance to their class mean divided by k, p the batch's fraction of positives, P = power * |g1 - g0|^2.
    """
    _check_marvell_inputs(grad, labels, power)
    pos = labels == 1
    n1 = int(pos.sum())
    n0 = grad.shape[0] - n1
    if power == 0 or n1 == 0 or n0 == 0:
        return None
    g64 = grad.detach().to(torch.float64)
    g1, g0 = g64[pos].mean(dim=0), g64[~pos].mean(dim=0)  # (k,) each
    diff = g1 - g0
    gap = float(diff.square().sum())
    if gap == 0:
        return None
    d = grad.shape[1]
    # Everything in units of |g1 - g0|^2: the problem is scale-free, and float64 then never sees 1e-18 variances.
    u = float((g64[~pos] - g0).square().sum()) / (n0 * d) / gap
    v = float((g64[pos] - g1).square().sum()) / (n1 * d) / gap
    p = n1 / grad.shape[0]
    a0, b0, a1, b1 = solve_marvell(u, v, 1.0, d, p, power)
    return MarvellSolution(
        direction=diff / math.sqrt(gap),
        along=(a0 * gap, a1 * gap),
        across=(b0 * gap, b1 * gap),
        budget=power * gap,
        pos_fraction=p,
        sum_kl=float(marvell_sum_kl(u, v, 1.0, d, a0, b0, a1, b1)),
        sum_kl_before=float(marvell_sum_kl(u, v, 1.0, d, 0.0, 0.0, 0.0, 0.0)),
    )


def marvell_noise(grad: Tensor, labels: Tensor, power: float, generator: torch.Generator) -> Tensor:
    """Marvell (Li et al., "Label Leakage and Protection in Two-party Split Learning", ICLR 2022) on the leader's
    returned gradient: class-dependent Gaussian noise chosen per batch to make positives' and negatives' gradients
    look alike.

    What it protects, against whom: the leader's labels, against a follower that reads the gradients it receives.
    For a binary loss every row is (p_i - y_i) times a vector the batch shares, so without noise the sign of a row's
    projection on that vector (or its norm) gives y_i away. Cost: the follower's half of the model learns from noisier
    gradients; the expected noise power per row is P = power * |g1 - g0|^2, so power is the noise-to-signal ratio
    measured against the gap between the class means (the authors' code calls it init_scale).

    What is solved, per batch, in float64 (see `marvell_solution` for the statistics u, v, p): model the positives'
    gradients as N(g1, v I) and the negatives' as N(g0, u I), and choose Sigma1, Sigma0 in the family
    Sigma_j = a_j e e^T + b_j (I - e e^T), e = (g1 - g0)/|g1 - g0|, a_j, b_j >= 0, to minimise the symmetrised KL
    KL(N(g1, vI + Sigma1) || N(g0, uI + Sigma0)) + the reverse, subject to p tr(Sigma1) + (1 - p) tr(Sigma0) <= P.
    `solve_marvell` explains why the budget is spent exactly and how the four scalars are found (closed forms for
    the along/across halves, a deterministic zoomed grid over the split). Each row i then gets noise from
    N(0, Sigma_{y_i}): one standard normal per coordinate, k per row, from `generator`.

    How it differs from the paper and the authors' code: the isotropic model of each class (the paper's) is kept,
    although here a class's spread really lies along e; the authors' solver additionally restricts the family to
    b_j <= a_j with one of b0, b1 zero and solves by alternating minimisation from a random start, this one searches
    the whole family deterministically (its optimum spends across-e budget on one class only in any case). Their
    "dynamic" mode, which raises P by 1.5x until the sum-KL is under a threshold, is not implemented: P is fixed.

    Returns a bitwise copy of grad and draws nothing when power = 0, when the batch holds one class only (nothing to
    tell apart, so nothing leaks through the class means) or when g1 == g0 exactly. Raises ValueError for a grad that
    is not [B, k] floating and finite, labels that are not [B] in {0, 1}, or a negative or non-finite power.

    Example: grad [B, 2] float32, labels [B] float32 in {0, 1} -> [B, 2] float32 on grad's device.
    """
    solution = marvell_solution(grad, labels, power)
    if solution is None:
        return grad.clone()
    z = torch.randn(grad.shape, generator=generator, device=grad.device, dtype=grad.dtype)  # (B, k)
    e = solution.direction.to(device=grad.device, dtype=grad.dtype)  # (k,)
    cls = labels.long().unsqueeze(1)  # (B, 1), indexes the per-class standard deviations below
    sd_along = torch.tensor([math.sqrt(a) for a in solution.along], dtype=grad.dtype, device=grad.device)[cls]
    sd_across = torch.tensor([math.sqrt(b) for b in solution.across], dtype=grad.dtype, device=grad.device)[cls]
    # sqrt(a) e e^T + sqrt(b) (I - e e^T) applied to z: covariance a e e^T + b (I - e e^T).
    noise = sd_across * z + (sd_along - sd_across) * (z @ e).unsqueeze(1) * e  # (B, k)
    return grad + noise
