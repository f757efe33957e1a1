"""The Wide&Deep bottom (the Criteo preset's): one party's columns -> its cut, {"wide": [B,1], "deep": [B,1]};
and the initialisers every part of the model shares (`part_generator`, `linear`, `embedding`).

The top over the parties' cuts is `vfl_cli.model.top`; the optimisers `vfl_cli.model.optimizers`.

Initialisation follows MindSpore ModelZoo's Wide&Deep where it is sound: both embedding tables N(0, 0.01)
(its `EmbeddingLookup` default), wide bias 0. Its dense layers are also N(0, 0.01), which shrinks the
activations at every layer of a 5-layer MLP; we use Xavier-uniform weights and zero biases instead.
Every initialiser draws from an optional `torch.Generator` (else the global RNG, so `torch.manual_seed`
makes it deterministic); `part_generator(seed, part)` gives each part its own stream, so a party can build
its part alone and still get the same weights as the joint model built from the same seed.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Part = str  # a party's key in the job, or "top" / "central" (`vfl_cli.job` keeps those two off party keys)
EMBEDDING_STD = 0.01  # MindSpore EmbeddingLookup's default normal init


def part_generator(seed: int, part: Part) -> torch.Generator:
    """An RNG stream for one part of the model, fixed by the job seed and the part's name."""
    digest = hashlib.sha256(f"vfl-init:{seed}:{part}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def linear(in_features: int, out_features: int, generator: torch.Generator | None) -> nn.Linear:
    if in_features == 0:  # a head over nothing (a leader-only baseline without columns): its bias alone
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that initialising the empty weight does nothing
            layer = nn.Linear(0, out_features)
        nn.init.zeros_(layer.bias)
        return layer
    layer = nn.utils.skip_init(nn.Linear, in_features, out_features)  # no default init: we draw our own
    nn.init.xavier_uniform_(layer.weight, generator=generator)
    nn.init.zeros_(layer.bias)
    return layer


def embedding(vocab_size: int, dim: int, generator: torch.Generator | None) -> nn.Embedding:
    table = nn.utils.skip_init(nn.Embedding, vocab_size, dim)  # skips a wasted init of a large table
    nn.init.normal_(table.weight, std=EMBEDDING_STD, generator=generator)
    return table


class WideDeepBottom(nn.Module):
    """One party's Wide&Deep: ids and values of its F fields -> {"wide": [B, 1], "deep": [B, 1]}, its logit parts.

    wide = sum_f wide_embedding[ids_f] * vals_f + wide_bias
    deep = deep_mlp(flatten(deep_embedding[ids] * vals)), MLP deep_layers with ReLU, then Linear -> 1

    Example:
        >>> bottom = WideDeepBottom(1000, num_fields=20, emb_dim=80, deep_layers=(1024, 512, 256, 128))
        >>> ids = torch.randint(0, 1000, (16, 20), dtype=torch.int32)  # [B, F]
        >>> vals = torch.rand(16, 20)  # [B, F]
        >>> bottom(ids, vals)["wide"].shape  # and "deep": [B, 1] each
        torch.Size([16, 1])
    """

    def __init__(
        self,
        vocab_size: int,
        num_fields: int,
        emb_dim: int,
        deep_layers: Sequence[int],
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.num_fields = num_fields
        self.emb_dim = emb_dim
        self.wide_embedding = embedding(vocab_size, 1, generator)
        self.wide_bias = nn.Parameter(torch.zeros(1))
        self.deep_embedding = embedding(vocab_size, emb_dim, generator)
        widths = [num_fields * emb_dim, *deep_layers]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [linear(d_in, d_out, generator), nn.ReLU(inplace=True)]  # a Linear's output is not kept
        layers.append(linear(widths[-1], 1, generator))
        self.deep_mlp = nn.Sequential(*layers)

    def forward(self, ids: Tensor, vals: Tensor) -> dict[str, Tensor]:
        # embedding_bag with per-sample weights is gather-and-scale in one kernel, and its backward scatters the
        # scaled gradient in one pass: the same values as embedding(ids) * vals, ~60 ms less per 16,000-row step.
        # int32 ids are looked up as they are (the kernels take them), so no int64 copy of [B, F].
        batch = ids.shape[0]
        wide = F.embedding_bag(ids, self.wide_embedding.weight, mode="sum", per_sample_weights=vals)  # (B, 1)
        wide = wide + self.wide_bias
        # One bag per (row, field): [B*F, 1] ids -> [B*F, E] rows, each its embedding times its value.
        deep_in = F.embedding_bag(ids.reshape(-1, 1), self.deep_embedding.weight, mode="sum",
                                  per_sample_weights=vals.reshape(-1, 1))  # (B*F, E)
        deep = self.deep_mlp(deep_in.view(batch, self.num_fields * self.emb_dim))  # (B, F*E) -> (B, 1)
        return {"wide": wide, "deep": deep}

    def wide_parameters(self) -> list[Tensor]:
        """What FTRL trains: the 1-dim embeddings and the bias."""
        return [self.wide_embedding.weight, self.wide_bias]

    def deep_parameters(self) -> list[Tensor]:
        """What Adam trains: the deep embeddings and the MLP."""
        return [self.deep_embedding.weight, *self.deep_mlp.parameters()]

    def embedding_tables(self) -> list[Tensor]:
        """The deep embedding table, the one parameter under the L2 term."""
        return [self.deep_embedding.weight]

    def l2_penalty(self, l2_coef: float) -> Tensor:
        """0.5 * l2_coef * ||deep_embedding||^2 over the whole table, as MindSpore's leader loss has it.

        Training does not add it to the loss: its gradient, l2_coef * table, is Adam's weight decay on the table
        (`build_optimizers`), which saves a pass over the whole table per step. Reference computations use it.
        (MindSpore's splitnn follower takes the mean of the squares instead; we use the sum on both sides.)
        """
        return 0.5 * l2_coef * self.deep_embedding.weight.square().sum()

    @torch.no_grad()
    def l2_value(self, l2_coef: float) -> float:
        """`l2_penalty`'s value for the log line, 10x faster: BLAS dots over 64k-value chunks, summed in float64
        (one dot over the whole table would lose 5 digits to float32 accumulation)."""
        flat = self.deep_embedding.weight.reshape(-1)
        return 0.5 * l2_coef * sum(torch.dot(chunk, chunk).item() for chunk in flat.split(1 << 16))
