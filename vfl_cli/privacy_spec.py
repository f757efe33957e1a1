"""The job's `privacy:` section: which cut-layer defences run, validated at load with the rest of the job
(`vfl_cli.job` holds it as `JobSpec.privacy`; the mechanisms themselves live in `vfl_cli.privacy`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelDpSpec(_Spec):
    """Leader: randomised response on its training labels, each flipped with probability 1/(e^eps + 1)."""

    eps: NonNegativeFloat  # 0 = coin flips (nothing learnt), large = almost no flips


class GradientNoiseSpec(_Spec):
    """Leader: clip each row of the gradients it returns to an L2 bound, then add isotropic Gaussian noise."""

    noise_ratio: NonNegativeFloat  # noise std per coordinate / the clip bound (DP-SGD's noise multiplier)
    clip_norm: PositiveFloat | None = None  # the bound, in gradient units; None = the batch's largest row norm


class MarvellSpec(_Spec):
    """Leader: Marvell (Li et al. 2022) class-dependent Gaussian noise on the gradients it returns, chosen per
    batch to make positives' and negatives' gradients look alike within a noise power budget."""

    power: PositiveFloat  # expected noise power per row, as a multiple of |mean g(y=1) - mean g(y=0)|^2


class EmbeddingDpSpec(_Spec):
    """Follower: clip each row of the embeddings it sends to an L2 bound, then add Gaussian noise."""

    clip_norm: PositiveFloat  # the bound, in embedding units (the bottom's output logits)
    sigma: NonNegativeFloat  # noise std / clip_norm


class EmbeddingRrSpec(_Spec):
    """Follower: send one bit per embedding value (its sign), flipped with probability 1/(e^eps + 1)."""

    eps: NonNegativeFloat


class QuantizeSpec(_Spec):
    """Min-max quantisation of a wire tensor to 1..8 bits per value, bit-packed; None = float32."""

    embeddings: Annotated[int, Field(ge=1, le=8)] | None = None  # what the follower sends
    gradients: Annotated[int, Field(ge=1, le=8)] | None = None  # what the leader returns


class PrivacySpec(_Spec):
    """Defences on the cut layer, each applied by the party that owns the secret before anything leaves it.
    All are off by default, and a job with none is bitwise the run without this section. `vfl audit` measures
    what each buys (label-leak AUC) and costs (test AUC); the README has the figures."""

    label_dp: LabelDpSpec | None = None  # leader, protects labels
    gradient_noise: GradientNoiseSpec | None = None  # leader, protects labels
    marvell: MarvellSpec | None = None  # leader, protects labels
    embedding_dp: EmbeddingDpSpec | None = None  # follower, protects its features
    embedding_rr: EmbeddingRrSpec | None = None  # follower, protects its features
    quantize: QuantizeSpec = QuantizeSpec()  # either side: compression

    @model_validator(mode="after")
    def _one_noise_per_tensor(self) -> PrivacySpec:
        if self.gradient_noise and self.marvell:
            raise ValueError("privacy: choose one of gradient_noise and marvell for the returned gradients")
        if self.embedding_dp and self.embedding_rr:
            raise ValueError("privacy: choose one of embedding_dp and embedding_rr for the sent embeddings")
        return self

    @property
    def enabled(self) -> list[str]:
        """Names of the defences that are on, e.g. ["label_dp", "quantize.gradients"]."""
        names = [name for name in ("label_dp", "gradient_noise", "marvell", "embedding_dp", "embedding_rr")
                 if getattr(self, name) is not None]
        return names + [f"quantize.{kind}" for kind in ("embeddings", "gradients")
                        if getattr(self.quantize, kind) is not None]
