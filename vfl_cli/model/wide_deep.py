"""The Wide&Deep pieces of split learning: each party's bottom, the leader's top, and their joint forms.

- `WideDeepBottom`: one party's fields -> (wide [B,1], deep [B,1]), the cut-layer tensors of `vfl_cli.peer`.
- `TopModel`: the leader's Linear(4, 1) over both parties' (wide, deep) -> logits [B].
- `JointWideDeep`: leader bottom + follower bottom + top in one module; split training must equal it.
- `CentralWideDeep`: one bottom over all fields, logits = wide + deep (the pooled-data baseline).
- `build_optimizers`: FTRL on the wide parameters, Adam on the rest, as MindSpore's Wide&Deep does; the L2
  term on the deep embedding tables is Adam's (coupled) weight decay, the same gradient as the loss term.

Initialisation follows MindSpore ModelZoo's Wide&Deep where it is sound: both embedding tables N(0, 0.01)
(its `EmbeddingLookup` default), wide bias 0. Its dense layers are also N(0, 0.01), which shrinks the
activations at every layer of a 5-layer MLP; we use Xavier-uniform weights and zero biases instead.
Every initialiser draws from an optional `torch.Generator` (else the global RNG, so `torch.manual_seed`
makes it deterministic); `part_generator(seed, part)` gives each part its own stream, so a party can build
its part alone and still get the same weights as the joint model built from the same seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfl_cli.job import AdamSpec, FtrlSpec, ModelSpec
from vfl_cli.model.ftrl import Ftrl

Part = Literal["leader", "follower", "top", "central"]
EMBEDDING_STD = 0.01  # MindSpore EmbeddingLookup's default normal init


def part_generator(seed: int, part: Part) -> torch.Generator:
    """An RNG stream for one part of the model, fixed by the job seed and the part's name."""
    digest = hashlib.sha256(f"vfl-init:{seed}:{part}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _linear(in_features: int, out_features: int, generator: torch.Generator | None) -> nn.Linear:
    layer = nn.utils.skip_init(nn.Linear, in_features, out_features)  # no default init: we draw our own
    nn.init.xavier_uniform_(layer.weight, generator=generator)
    nn.init.zeros_(layer.bias)
    return layer


def _embedding(vocab_size: int, dim: int, generator: torch.Generator | None) -> nn.Embedding:
    table = nn.utils.skip_init(nn.Embedding, vocab_size, dim)  # skips a wasted init of a large table
    nn.init.normal_(table.weight, std=EMBEDDING_STD, generator=generator)
    return table


class WideDeepBottom(nn.Module):
    """One party's Wide&Deep: ids and values of its F fields -> (wide, deep) logit parts, each [B, 1].

    wide = sum_f wide_embedding[ids_f] * vals_f + wide_bias
    deep = deep_mlp(flatten(deep_embedding[ids] * vals)), MLP deep_layers with ReLU, then Linear -> 1

    Example:
        >>> bottom = WideDeepBottom(1000, num_fields=20, emb_dim=80, deep_layers=(1024, 512, 256, 128))
        >>> ids = torch.randint(0, 1000, (16, 20), dtype=torch.int32)  # [B, F]
        >>> vals = torch.rand(16, 20)  # [B, F]
        >>> wide, deep = bottom(ids, vals)  # [B, 1], [B, 1]
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
        self.wide_embedding = _embedding(vocab_size, 1, generator)
        self.wide_bias = nn.Parameter(torch.zeros(1))
        self.deep_embedding = _embedding(vocab_size, emb_dim, generator)
        widths = [num_fields * emb_dim, *deep_layers]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [_linear(d_in, d_out, generator), nn.ReLU(inplace=True)]  # a Linear's output is not kept
        layers.append(_linear(widths[-1], 1, generator))
        self.deep_mlp = nn.Sequential(*layers)

    def forward(self, ids: Tensor, vals: Tensor) -> tuple[Tensor, Tensor]:
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
        return wide, deep

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


class TopModel(nn.Module):
    """The leader's top: Linear(4, 1) over (leader wide, leader deep, follower wide, follower deep) -> [B].

    Example:
        >>> top = TopModel()
        >>> logits = top(*(torch.randn(16, 1) for _ in range(4)))  # four [B, 1] -> [B]
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.linear = _linear(4, 1, generator)

    def forward(
        self, leader_wide: Tensor, leader_deep: Tensor, follower_wide: Tensor, follower_deep: Tensor
    ) -> Tensor:
        cut = torch.cat((leader_wide, leader_deep, follower_wide, follower_deep), dim=1)  # (B, 4)
        return self.linear(cut).squeeze(-1)  # (B,)


class JointWideDeep(nn.Module):
    """Both bottoms and the top in one module: the reference split training must equal, and the plain-torch
    baseline.

    Example:
        >>> model = JointWideDeep.build(1000, 20, 900, 19, ModelSpec(), seed=0)
        >>> logits = model(leader_ids, leader_vals, follower_ids, follower_vals)  # [B,20], [B,19] -> [B]
    """

    def __init__(self, leader: WideDeepBottom, follower: WideDeepBottom, top: TopModel) -> None:
        super().__init__()
        self.leader = leader
        self.follower = follower
        self.top = top

    @classmethod
    def build(
        cls,
        leader_vocab: int,
        leader_fields: int,
        follower_vocab: int,
        follower_fields: int,
        model: ModelSpec,
        seed: int,
    ) -> JointWideDeep:
        """The parts each party builds alone from the seed (`part_generator`), assembled in one module."""
        return cls(
            WideDeepBottom(
                leader_vocab, leader_fields, model.emb_dim, model.deep_layers, part_generator(seed, "leader")
            ),
            WideDeepBottom(
                follower_vocab,
                follower_fields,
                model.emb_dim,
                model.deep_layers,
                part_generator(seed, "follower"),
            ),
            TopModel(part_generator(seed, "top")),
        )

    def forward(
        self, leader_ids: Tensor, leader_vals: Tensor, follower_ids: Tensor, follower_vals: Tensor
    ) -> Tensor:
        leader_wide, leader_deep = self.leader(leader_ids, leader_vals)  # (B, 1) each
        follower_wide, follower_deep = self.follower(follower_ids, follower_vals)  # (B, 1) each
        return self.top(leader_wide, leader_deep, follower_wide, follower_deep)  # (B,)

    def wide_parameters(self) -> list[Tensor]:
        return [*self.leader.wide_parameters(), *self.follower.wide_parameters()]

    def deep_parameters(self) -> list[Tensor]:
        return [*self.leader.deep_parameters(), *self.follower.deep_parameters(), *self.top.parameters()]

    def embedding_tables(self) -> list[Tensor]:
        return [*self.leader.embedding_tables(), *self.follower.embedding_tables()]

    def l2_penalty(self, l2_coef: float) -> Tensor:
        return self.leader.l2_penalty(l2_coef) + self.follower.l2_penalty(l2_coef)


class CentralWideDeep(nn.Module):
    """One Wide&Deep over all the fields it is given: logits = wide + deep, [B] (pooled / leader-only runs).

    Example:
        >>> model = CentralWideDeep(2000, 39, 80, (1024, 512, 256, 128))
        >>> logits = model(ids, vals)  # [B, 39] x2 -> [B]
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
        self.bottom = WideDeepBottom(vocab_size, num_fields, emb_dim, deep_layers, generator)

    def forward(self, ids: Tensor, vals: Tensor) -> Tensor:
        wide, deep = self.bottom(ids, vals)  # (B, 1) each
        return (wide + deep).squeeze(-1)  # (B,)

    def wide_parameters(self) -> list[Tensor]:
        return self.bottom.wide_parameters()

    def deep_parameters(self) -> list[Tensor]:
        return self.bottom.deep_parameters()

    def embedding_tables(self) -> list[Tensor]:
        return self.bottom.embedding_tables()

    def l2_penalty(self, l2_coef: float) -> Tensor:
        return self.bottom.l2_penalty(l2_coef)

    def l2_value(self, l2_coef: float) -> float:
        return self.bottom.l2_value(l2_coef)


def build_optimizers(
    wide_params: Iterable[Tensor],
    deep_params: Iterable[Tensor],
    ftrl: FtrlSpec,
    adam: AdamSpec,
    l2_coef: float = 0.0,
    embedding_tables: Sequence[Tensor] = (),
) -> list[torch.optim.Optimizer]:
    """[FTRL over the wide parameters, Adam over the deep ones]; step both after each backward.

    The L2 term 0.5 * l2_coef * ||table||^2 on each of `embedding_tables` (which must be among the deep
    parameters) is applied as Adam's coupled weight decay on those tables: Adam adds l2_coef * table to their
    gradient, exactly the term's gradient, without a pass of autograd over the whole table. Adam is the fused
    kernel (one pass over parameter, gradient and both moments, ~5x faster than the loop over tensors on CPU).
    """
    deep = list(deep_params)
    decayed = {id(t) for t in embedding_tables}
    if not decayed <= {id(t) for t in deep}:
        raise ValueError("embedding_tables must be among the deep parameters")
    groups: list[dict[str, Any]] = [
        {"params": [t for t in deep if id(t) in decayed], "weight_decay": l2_coef},
        {"params": [t for t in deep if id(t) not in decayed], "weight_decay": 0.0},
    ]
    return [
        Ftrl(
            list(wide_params),
            lr=ftrl.lr,
            l1=ftrl.l1,
            l2=ftrl.l2,
            initial_accumulator=ftrl.initial_accumulator,
        ),
        torch.optim.Adam([g for g in groups if g["params"]], lr=adam.lr, eps=adam.eps, fused=True),
    ]
