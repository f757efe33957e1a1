"""Each party's trainable state, built from the job and its prepared data: bottom model, the leader's top,
and the optimisers (FTRL for wide parameters, Adam for deep parameters and the top)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data_prep.store import PartyMeta
from vfl_cli.errors import CheckpointError
from vfl_cli.job import JobSpec
from vfl_cli.model.wide_deep import TopModel, WideDeepBottom, build_optimizers, part_generator


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class PartyModel:
    role: str
    bottom: WideDeepBottom
    top: TopModel | None  # the leader's top; None for the follower
    optimizers: list[torch.optim.Optimizer]
    device: torch.device

    def train(self, mode: bool = True) -> None:
        self.bottom.train(mode)
        if self.top is not None:
            self.top.train(mode)

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "bottom": self.bottom.state_dict(),
            "top": None if self.top is None else self.top.state_dict(),
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.bottom.load_state_dict(state["bottom"])
            if self.top is not None:
                self.top.load_state_dict(state["top"])
            for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"], strict=True):
                optimizer.load_state_dict(optimizer_state)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint does not fit this {self.role}'s model: {exc}") from exc


def build_bottom(job: JobSpec, vocab_size: int, num_fields: int, part: str) -> WideDeepBottom:
    """Initial weights come from the part's own stream of the job seed (the same as in `JointWideDeep.build`)."""
    generator = part_generator(job.seed, part)  # type: ignore[arg-type]
    return WideDeepBottom(vocab_size, num_fields, job.model.emb_dim, job.model.deep_layers, generator)


def build_party(job: JobSpec, role: str, meta: PartyMeta, device: torch.device) -> PartyModel:
    """The leader gets a bottom and the top; the follower a bottom only."""
    bottom = build_bottom(job, meta.vocab_size, len(meta.fields), role).to(device)
    top = TopModel(part_generator(job.seed, "top")).to(device) if role == "leader" else None
    deep_parameters = list(bottom.deep_parameters()) + ([] if top is None else list(top.parameters()))
    optimizers = build_optimizers(
        bottom.wide_parameters(), deep_parameters, job.train.wide_optimizer, job.train.deep_optimizer
    )
    return PartyModel(role, bottom, top, optimizers, device)
