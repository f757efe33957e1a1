"""Each party's trainable state, built from the job and its prepared data: bottom model, the leader's top,
and the optimisers (FTRL for wide parameters, Adam for deep parameters and the top)."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor

from data_prep.store import PartyMeta
from vfl_cli.errors import CheckpointError
from vfl_cli.job import JobSpec
from vfl_cli.model.wide_deep import TopModel, WideDeepBottom, build_optimizers, part_generator

log = logging.getLogger(__name__)


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
    bf16: bool = False  # run the bottom under bfloat16 autocast (`train.precision: bf16`, where supported)

    def bottom_forward(self, ids: Tensor, vals: Tensor) -> tuple[Tensor, Tensor]:
        """The bottom's (wide, deep), float32 [B, 1] each whatever the precision: they are the cut layer."""
        with self.autocast():
            wide, deep = self.bottom(ids, vals)
        return wide.float(), deep.float()  # no-ops in fp32

    def autocast(self) -> AbstractContextManager[Any]:
        return bf16_autocast(self.bf16, self.device)

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
        bottom.wide_parameters(), deep_parameters, job.train.wide_optimizer, job.train.deep_optimizer,
        job.train.l2_coef, bottom.embedding_tables(),
    )
    return PartyModel(role, bottom, top, optimizers, device, use_bf16(job.train.precision, device))


def bf16_autocast(enabled: bool, device: torch.device) -> AbstractContextManager[Any]:
    """bfloat16 autocast for a bottom's matmuls (weights stay float32), or nothing in fp32."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 where the job asks for it and this party's device does it natively; else fp32, with a warning (the
    results then differ slightly from a bf16 peer's, the protocol does not)."""
    if precision != "bf16":
        return False
    if device.type == "cuda" or cpu_has_bf16():
        return True
    log.warning("train.precision bf16: this processor has no native bfloat16 (AVX512-BF16 or AMX); "
                "this party computes in fp32")
    return False


@cache
def cpu_has_bf16() -> bool:
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
