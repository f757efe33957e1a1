"""Cut-layer defences as pure torch functions: label DP, isotropic gradient noise, embedding DP and RR.

Each runs at the party that owns the secret, before the tensor leaves it, and takes an explicit `torch.Generator`
so a run is reproducible from its seed. None does I/O or knows the job spec; the loop decides when to call them.

- `randomized_response` (leader, on its training labels): protects the labels against a curious follower, since
  every gradient it returns is then computed from a label that is wrong with probability 1/(e^eps + 1); it costs
  accuracy, because the model is fitted to those noisy labels. Its draws are the caller's (one per customer).
- `perturb_gradients` (leader, on the gradients it returns): protects the labels against a follower that reads the
  sign or norm of its gradients; it costs accuracy, because the follower's half of the model learns from clipped,
  noisy gradients.
- `embedding_dp` and `one_bit_rr` (follower, on the embeddings it sends): protect the follower's features against
  a curious leader that would invert the embeddings; they cost accuracy, because the leader's top sees a noisy
  (or 1-bit) follower signal. They do nothing for the labels.

The Gaussian pair switched off (noise 0, clip_norm inf) returns a copy bitwise equal to its input and draws nothing
from the generator, so the rest of the run's random stream is that of a run without defences. The randomised
response pair has no "off" value: the loop turns it off by not calling it.
Marvell's class-dependent noise has a module of its own, `marvell`.
"""

from __future__ import annotations

import math

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


def randomized_response(labels: Tensor, eps: float, uniforms: Tensor, classes: int = 2) -> Tensor:
    """k-ary randomised response (eps-label-DP; for k = 2 MindSpore's LabelDP): each label is replaced, with
    probability (k - 1)/(e^eps + k - 1), by one of the other k - 1 classes, uniformly. One uniform draw in [0, 1)
    per label decides both: below that probability it is replaced, and where below it picks the class. For
    k = 2 that is the binary flip with probability 1/(e^eps + 1).

    The caller owns the draws: `CutLayerDefences` draws one per customer for the whole run, so every epoch trains on
    the same released label and the release stays eps-DP however many epochs see it (a fresh draw per epoch would
    compose to E x eps, and a follower averaging its epochs would undo the flips).

    Example: labels [B] float32 in {0, ..., k-1}, uniforms [B] -> [B] float32 in {0, ..., k-1}, same dtype and device.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-d tensor [B], got shape {tuple(labels.shape)}")
    if uniforms.shape != labels.shape:
        raise ValueError(f"uniforms must be one per label, shape {tuple(labels.shape)}, got {tuple(uniforms.shape)}")
    if classes < 2 or not bool(((labels >= 0) & (labels < classes) & (labels == labels.round())).all()):
        raise ValueError(f"labels must be class indices 0..{classes - 1}" if classes > 2 else "labels must be 0 or 1")
    u = uniforms.to(labels.device)
    replace = (classes - 1) / (math.exp(eps) + classes - 1) if eps < 700 else 0.0
    if classes == 2:
        return torch.where(u < flip_probability(eps), 1 - labels, labels)  # bitwise the binary mechanism
    shift = 1 + torch.floor(u / replace * (classes - 1)).clamp(max=classes - 2) if replace > 0 else torch.zeros_like(u)
    other = torch.remainder(labels + shift.to(labels.dtype), classes)  # one of the k - 1 other classes
    return torch.where(u < replace, other, labels)


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
