"""A job's cut-layer defences (`privacy:`), applied where the loop sends and receives.

The maths lives in `mechanisms` and `quantize`; this module decides, from the job, which of them touch which
tensor, and gives each call its own random stream:

    leader   training labels   -> label_dp (randomised response, one draw per customer for the whole run)
             gradients it sends -> gradient_noise | marvell, then quantize.gradients
    follower embeddings it sends (train, eval and infer) -> embedding_dp | embedding_rr, then quantize.embeddings
    either   what it receives  -> dequantised back to float32 tensors

Gradients are quantised with stochastic rounding (unbiased, so the follower's optimiser still follows the true
gradient on average; nearest rounding makes 2-bit training diverge), embeddings with nearest rounding (so eval
and infer stay deterministic).

Randomness comes from a generator seeded by (job seed, follower, purpose, phase, epoch, step), never from
torch's global stream: each follower's cut gets its own noise (two followers never draw the same), a job
with every defence off draws nothing and runs bitwise as without this module, and a run resumed
at step s draws exactly what an uninterrupted one draws there. Label DP's draws are a hash of (job seed, customer
id) instead: the same flip for a customer in every epoch, so the run releases each label once (eps-DP in all).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vfl_cli.job import PrivacySpec
from vfl_cli.privacy.marvell import marvell_noise
from vfl_cli.privacy.mechanisms import (
    embedding_dp,
    one_bit_rr,
    perturb_gradients,
    randomized_response,
)
from vfl_cli.privacy.quantize import QuantizedTensor, dequantize, quantize
from vfl_cli.protocol import BatchKey, WireTensors

_PURPOSES = {"labels": 1, "gradients": 2, "embeddings": 3}
_PHASES = {"train": 1, "eval": 2, "infer": 3, "psi": 4}


def batch_generator(seed: int, purpose: str, key: BatchKey, device: torch.device, party: str = "") -> torch.Generator:
    """A generator for one (follower, purpose, batch): independent of every other follower, batch and of torch's
    global stream."""
    words = [seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, _PURPOSES[purpose], _PHASES[key.phase], key.epoch, key.step]
    if party:
        words += list(hashlib.sha256(party.encode()).digest()[:8])
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & (1 << 63) - 1)


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's constants


def customer_uniforms(seed: int, sample_ids: Tensor) -> Tensor:
    """One uniform in [0, 1) per customer id [B] (int64), a hash of (seed, id): the same for a customer in every
    epoch, batch and resume, independent across ids (SplitMix64's finaliser, Steele et al. 2014)."""
    z = sample_ids.detach().cpu().numpy().astype(np.uint64) * np.uint64(_GOLDEN)
    z += np.uint64((seed * _MIX1 + _PURPOSES["labels"]) & 0xFFFFFFFFFFFFFFFF)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    z ^= z >> np.uint64(31)
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def _join(cut: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.detach() for t in cut.values()], dim=1)  # (B, D): one row per sample


def _split(rows: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """`rows` [B, D] back into tensors of `like`'s names and widths."""
    parts = torch.split(rows, [t.shape[1] for t in like.values()], dim=1)
    return dict(zip(like, parts, strict=True))


@dataclass(frozen=True)
class CutLayerDefences:
    spec: PrivacySpec
    seed: int
    classes: int = 2  # the label's classes (randomised response is k-ary for multiclass)
    party: str = ""  # the follower whose cut these defences guard (its key): part of every generator's seed

    def training_labels(self, labels: Tensor, sample_ids: Tensor) -> Tensor:
        """The labels the leader trains this batch on: its own, or randomised response on them, each customer's
        label replaced (or not) once for the whole run."""
        if self.spec.label_dp is None:
            return labels
        uniforms = customer_uniforms(self.seed, sample_ids)
        return randomized_response(labels, self.spec.label_dp.eps, uniforms, self.classes)

    def gradients_out(self, grads: dict[str, Tensor], labels: Tensor, key: BatchKey) -> WireTensors:
        """What the leader returns for the follower's cut tensors (name -> [B, width]); `labels` are the ones
        this batch was trained on (Marvell shapes its noise by class)."""
        noise, marvell, bits = self.spec.gradient_noise, self.spec.marvell, self.spec.quantize.gradients
        if noise is None and marvell is None and bits is None:
            return self._wire(grads, None)  # no defence: no generator, nothing drawn
        generator = batch_generator(self.seed, "gradients", key, torch.device("cpu"), self.party)
        if noise is not None or marvell is not None:
            rows = _join(grads).cpu()
            if noise is not None:
                largest = float(torch.linalg.vector_norm(rows, dim=1).max()) if len(rows) else 0.0
                clip = noise.clip_norm if noise.clip_norm is not None else largest
                if clip > 0:  # an all-zero batch (nothing to hide) has no scale for the noise
                    rows = perturb_gradients(rows, clip, noise.noise_ratio, generator)
            else:
                assert marvell is not None
                rows = marvell_noise(rows, labels.cpu(), marvell.power, generator)
            grads = _split(rows, grads)
        return self._wire(grads, bits, generator)

    def embeddings_out(self, cut: dict[str, Tensor], key: BatchKey) -> WireTensors:
        """What the follower sends for its cut tensors (name -> [B, width]), in any phase."""
        dp, rr = self.spec.embedding_dp, self.spec.embedding_rr
        if dp is not None or rr is not None:
            rows = _join(cut).cpu()
            generator = batch_generator(self.seed, "embeddings", key, rows.device, self.party)
            if dp is not None:
                rows = embedding_dp(rows, dp.clip_norm, dp.sigma, generator)
            else:
                assert rr is not None
                rows = one_bit_rr(rows, rr.eps, generator)
            cut = _split(rows, cut)
        return self._wire(cut, self.spec.quantize.embeddings)

    @staticmethod
    def _wire(cut: dict[str, Tensor], bits: int | None, generator: torch.Generator | None = None) -> WireTensors:
        """Float32 tensors, or quantised ones (stochastic rounding when given a generator), in the cut's order."""
        plain = {name: t.detach().cpu() for name, t in cut.items()}
        if bits is None:
            return dict(plain)  # typed as WireTensors (dict is invariant in its values)
        return {name: quantize(t, bits, generator) for name, t in plain.items()}

    @staticmethod
    def received(tensors: WireTensors) -> dict[str, Tensor]:
        """The peer's cut-layer tensors as float32 (quantised ones dequantised; the server checked their form)."""
        return {name: dequantize(t) if isinstance(t, QuantizedTensor) else t for name, t in tensors.items()}
