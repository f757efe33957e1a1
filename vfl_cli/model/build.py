"""The model registry: which bottom and top a job's `model` names, the cut each party sends, and the whole
model in one module for the references (`SplitModel`: what split training with any number of followers must
equal; `CentralModel`: the pooled and leader-only baselines).

    bottom  wide_deep  -> {"wide": [B, 1], "deep": [B, 1]}  (`vfl_cli.model.wide_deep`, the Criteo preset)
            mlp        -> {"cut": [B, cut_dim]}             (`vfl_cli.model.mlp`)
            none       a party without feature columns sends nothing (a label-only leader)
    top     concat | sum over every party's cut, then `top_layers`, then Linear -> the task's width

Every part draws its initial weights from its own stream of the job seed (`part_generator`), so a party can
build its part alone and get the same weights as the joint model built from the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vfl_cli.job import ModelSpec
from vfl_cli.model.mlp import MlpBottom
from vfl_cli.model.top import CutWidths, Top
from vfl_cli.model.wide_deep import Part, WideDeepBottom, part_generator

Bottom = WideDeepBottom | MlpBottom


def build_bottom(model: ModelSpec, seed: int, part: Part, vocab_size: int, kinds: Sequence[str]) -> Bottom | None:
    """A party's bottom over its columns (`kinds`, one per column, in the prepared arrays' order); None without."""
    if not kinds:
        return None
    generator = part_generator(seed, part)
    if model.bottom == "wide_deep":
        return WideDeepBottom(vocab_size, len(kinds), model.emb_dim, model.deep_layers, generator)
    return MlpBottom(vocab_size, kinds, model.emb_dim, model.deep_layers, model.cut_dim, generator)


def build_top(model: ModelSpec, seed: int, cuts: Sequence[CutWidths], width: int) -> Top:
    return Top(cuts, model.top, model.top_layers, width, part_generator(seed, "top"))


def bottom_parameters(bottom: Bottom | None) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(wide parameters, deep parameters, embedding tables under L2) of a bottom, empty lists for none."""
    if bottom is None:
        return [], [], []
    return bottom.wide_parameters(), bottom.deep_parameters(), bottom.embedding_tables()


class SplitModel(nn.Module):
    """Every party's bottom and the top in one module: the reference split training must equal."""

    def __init__(self, leader: Bottom | None, followers: Sequence[Bottom], top: Top) -> None:
        super().__init__()
        self.leader, self.followers, self.top = leader, nn.ModuleList(followers), top

    @classmethod
    def build(cls, model: ModelSpec, seed: int, parties: dict[str, tuple[int, Sequence[str]]],
              width: int = 1) -> SplitModel:
        """From each party's (vocabulary size, column kinds) by key, the leader's first, as the parties build their
        parts alone (each bottom from its own key's stream)."""
        (leader_key, leader), *followers = parties.items()
        bottoms = [build_bottom(model, seed, key, *inputs) for key, inputs in followers]
        assert all(b is not None for b in bottoms), "every follower holds at least one column"
        cuts = [model.cut_widths(len(kinds)) for _, kinds in parties.values()]
        return cls(build_bottom(model, seed, leader_key, *leader), bottoms,  # type: ignore[arg-type]
                   build_top(model, seed, cuts, width))

    def forward(self, *inputs: Tensor) -> Tensor:
        """`inputs`: (ids, vals) of the leader, then of each follower in order, flattened."""
        pairs = [inputs[i:i + 2] for i in range(0, len(inputs), 2)]
        own = {} if self.leader is None else self.leader(*pairs[0])
        return self.top([own, *(bottom(*pair) for bottom, pair in zip(self.followers, pairs[1:], strict=True))])

    def bottoms(self) -> list[Bottom]:
        return [b for b in (self.leader, *self.followers) if b is not None]

    def wide_parameters(self) -> list[Tensor]:
        return [p for b in self.bottoms() for p in b.wide_parameters()]

    def deep_parameters(self) -> list[Tensor]:
        return [p for b in self.bottoms() for p in b.deep_parameters()] + list(self.top.parameters())

    def embedding_tables(self) -> list[Tensor]:
        return [t for b in self.bottoms() for t in b.embedding_tables()]


class CentralModel(nn.Module):
    """One bottom over all the columns it is given (pooled, or the leader's alone) and a head.

    Wide&Deep with a one-wide head and no top layers is its own model: logits = wide + deep, as it has always
    been (the Criteo baselines). Otherwise the job's top over this one bottom's cut."""

    def __init__(self, model: ModelSpec, seed: int, vocab_size: int, kinds: Sequence[str], width: int) -> None:
        super().__init__()
        self.bottom = build_bottom(model, seed, "central", vocab_size, kinds)
        self.sum_of_cut = model.bottom == "wide_deep" and width == 1 and not model.top_layers and bool(kinds)
        self.top = None if self.sum_of_cut else build_top(model, seed, [model.cut_widths(len(kinds))], width)

    def forward(self, ids: Tensor, vals: Tensor) -> Tensor:
        if self.bottom is None:  # no columns at all: the head's bias alone (the label's prior)
            assert self.top is not None
            return self.top.mlp(torch.zeros(ids.shape[0], 0, device=ids.device))
        cut = self.bottom(ids, vals)
        if self.top is None:
            return cut["wide"] + cut["deep"]  # (B, 1)
        return self.top([cut])  # (B, width)

    def wide_parameters(self) -> list[Tensor]:
        return bottom_parameters(self.bottom)[0]

    def deep_parameters(self) -> list[Tensor]:
        return bottom_parameters(self.bottom)[1] + ([] if self.top is None else list(self.top.parameters()))

    def embedding_tables(self) -> list[Tensor]:
        return bottom_parameters(self.bottom)[2]

    def l2_value(self, l2_coef: float) -> float:
        return 0.0 if self.bottom is None else self.bottom.l2_value(l2_coef)
