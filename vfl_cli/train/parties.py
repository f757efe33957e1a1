"""Each party's trainable state, built from the job and its prepared data: its bottom (none for a label-only
leader), the leader's top and task, and the optimisers (FTRL for wide parameters, Adam for the rest)."""

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
from vfl_cli.model.build import Bottom, bottom_parameters, build_bottom, build_top
from vfl_cli.model.kernels import GemmChoice, choose_gemm, use_gemm
from vfl_cli.model.optimizers import build_optimizers
from vfl_cli.model.top import Top
from vfl_cli.task import Task

log = logging.getLogger(__name__)


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class PartyModel:
    role: str  # the party's key in the job
    bottom: Bottom | None  # None: a leader without feature columns
    top: Top | None  # the leader's top; None for the follower
    task: Task | None  # the leader's; None for the follower
    optimizers: list[torch.optim.Optimizer]
    device: torch.device
    bf16: bool = False  # run the bottom under bfloat16 autocast (`train.precision: bf16`, where supported)
    gemm: GemmChoice | None = None  # the CPU GEMM path of its dense layers and why (None on CUDA)

    def bottom_forward(self, ids: Tensor, vals: Tensor) -> dict[str, Tensor]:
        """This party's cut outputs, float32 whatever the precision ({} without a bottom)."""
        if self.bottom is None:
            return {}
        with self.autocast():
            cut = self.bottom(ids, vals)
        return {name: t.float() for name, t in cut.items()}  # no-ops in fp32

    def l2_value(self, l2_coef: float) -> float:
        return 0.0 if self.bottom is None else self.bottom.l2_value(l2_coef)

    def autocast(self) -> AbstractContextManager[Any]:
        return bf16_autocast(self.bf16, self.device)

    def train(self, mode: bool = True) -> None:
        for module in (self.bottom, self.top):
            if module is not None:
                module.train(mode)

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "bottom": None if self.bottom is None else self.bottom.state_dict(),
            "top": None if self.top is None else self.top.state_dict(),
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "task": None if self.task is None else self.task.scale_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            if self.bottom is not None:
                self.bottom.load_state_dict(state["bottom"])
            if self.top is not None:
                self.top.load_state_dict(state["top"])
            for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"], strict=True):
                optimizer.load_state_dict(optimizer_state)
            if self.task is not None:
                self.task = self.task.with_scale(state.get("task"))
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint does not fit this {self.role}'s model: {exc}") from exc


def build_party(job: JobSpec, role: str, meta: PartyMeta, device: torch.device, task: Task | None = None) -> PartyModel:
    """A follower gets its bottom; the leader its bottom (if it has columns), the top over every party's cut (its
    own first, then the followers' in the job's order) and the task (`task`, or the prepared data's)."""
    bottom = build_bottom(job.model, job.seed, role, meta.vocab_size, meta.kinds)
    top = None
    leader = job.is_leader(role)
    if leader:
        task = task or Task.of(job.leader.task, tuple(meta.classes))
        cuts = [job.cut_widths(key) for key in job.keys]
        top = build_top(job.model, job.seed, cuts, task.width)
    if bottom is not None:
        bottom = bottom.to(device)
    if top is not None:
        top = top.to(device)
    bf16 = use_bf16(job.train.precision, device)
    gemm = party_gemm(job, role, bottom, top, bf16) if device.type == "cpu" else None
    for module in (bottom, top):
        if module is not None and gemm is not None:
            use_gemm(module, gemm.path)
    wide, deep, tables = bottom_parameters(bottom)
    optimizers = build_optimizers(wide, deep + ([] if top is None else list(top.parameters())),
                                  job.train.wide_optimizer, job.train.deep_optimizer, job.train.l2_coef, tables)
    return PartyModel(role, bottom, top, task if leader else None, optimizers, device, bf16, gemm)


def party_gemm(job: JobSpec, role: str, bottom: Bottom | None, top: Top | None, bf16: bool) -> GemmChoice:
    """`parties.<role>.gemm` resolved at the party's first dense layer (its bottom's, else the top's): a batch
    shard's rows (batch_size / workers) x its input width -> its first width, on this process's torch threads."""
    first = next((m for module in (bottom, top) if module is not None for m in module.modules()
                  if isinstance(m, torch.nn.Linear)), None)
    rows = job.train.batch_size // job.parties[role].workers
    shape = (rows, 0, 0) if first is None else (rows, first.in_features, first.out_features)
    return choose_gemm(job.parties[role].gemm, shape, torch.get_num_threads(), bf16 and bottom is not None)


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
