"""The oneDNN linear equals F.linear (forward and every gradient, fp32 and bf16 autocast); a party on either GEMM
path trains the same model; `auto` keeps the default for small layers without timing; checkpoints load across
paths; `gemm` is a local setting."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data_prep.store import open_party
from tests.conftest import job_dict, write_planted_data
from tests.test_train_local import joint_losses, leader_losses
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.model import kernels
from vfl_cli.model.kernels import GemmChoice, OneDnnLinear, choose_gemm, gemm_gflops, onednn_linear, use_gemm
from vfl_cli.report.records import read_records
from vfl_cli.train.parties import build_party, cpu_has_bf16
from vfl_cli.train.session import run_local, train_session


def linear_and_grads(fn: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     autocast: bool = False) -> list[torch.Tensor]:
    """fn's output and the grads of a fixed loss w.r.t. input, weight and bias (all float32 leaves)."""
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(x, weight, bias)
    (y.float() * torch.linspace(-1, 1, y.shape[1])).square().sum().backward()
    assert x.grad is not None and weight.grad is not None and bias.grad is not None
    return [y.detach(), x.grad, weight.grad, bias.grad]


def operands(rows: int = 300, d_in: int = 96, d_out: int = 40) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(rows, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen) * d_in ** -0.5,
            torch.randn(d_out, generator=gen))


def test_onednn_linear_forward_and_every_grad_equal_f_linear_in_fp32() -> None:
    ref = linear_and_grads(F.linear, *operands())
    got = linear_and_grads(onednn_linear, *operands())
    for name, r, g in zip(("y", "grad input", "grad weight", "grad bias"), ref, got, strict=True):
        assert g.dtype == r.dtype == torch.float32, name
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()), msg=name)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this processor has no native bfloat16")
def test_onednn_linear_under_bf16_autocast_matches_f_linear_to_bf16_rounding() -> None:
    ref = linear_and_grads(F.linear, *operands(), autocast=True)
    got = linear_and_grads(onednn_linear, *operands(), autocast=True)
    assert got[0].dtype == ref[0].dtype == torch.bfloat16  # autocast's output dtype, as F.linear's
    for name, r, g in zip(("y", "grad input", "grad weight", "grad bias"), ref, got, strict=True):
        assert g.dtype == r.dtype, name  # grads of float32 leaves come back float32 through the casts
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2 * float(r.abs().max()), msg=name)


def test_use_gemm_swaps_the_layers_and_keeps_parameters_and_keys() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1))
    params, keys = list(model.parameters()), list(model.state_dict())
    use_gemm(model, "onednn")
    assert [type(m) for m in model if isinstance(m, nn.Linear)] == [OneDnnLinear, OneDnnLinear]
    assert list(model.parameters()) == params and list(model.state_dict()) == keys
    use_gemm(model, "mkl")
    assert all(type(m) is nn.Linear for m in model if isinstance(m, nn.Linear))


# ------------------------------------------------------------------------------------------ the party


def gemm_job(tmp_path: Path, gemm: str, **train: Any) -> JobSpec:
    spec = job_dict(tmp_path, **train)
    for party in spec["parties"].values():
        party["gemm"] = gemm
    if not (tmp_path / "data").exists():
        write_planted_data(Path(spec["data"]["dir"]), rows=1200)
    return parse_job(spec)


def leader_step(job: JobSpec) -> tuple[dict[str, torch.Tensor], GemmChoice | None]:
    """One leader step (its bottom, the top over its cut and a fixed follower cut, backward, both optimisers):
    every parameter afterwards."""
    meta = open_party(job.data.dir, "leader").meta
    party = build_party(job, "leader", meta, torch.device("cpu"))
    assert party.bottom is not None and party.top is not None and party.task is not None
    layer = OneDnnLinear if job.leader.gemm == "onednn" else nn.Linear
    linears = [m for part in (party.bottom, party.top) for m in part.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is layer for m in linears)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, meta.vocab_size, (64, len(job.leader.fields)), generator=gen, dtype=torch.int32)
    vals = torch.rand(64, len(job.leader.fields), generator=gen)
    theirs = {"wide": torch.randn(64, 1, generator=gen), "deep": torch.randn(64, 1, generator=gen)}
    labels = (torch.rand(64, generator=gen) > 0.5).float()
    party.zero_grad()
    logits = party.top([party.bottom_forward(ids, vals), theirs])
    F.binary_cross_entropy_with_logits(logits[:, 0], labels).backward()
    party.step()
    return {f"bottom.{k}": v for k, v in party.bottom.state_dict().items()} | {
        f"top.{k}": v for k, v in party.top.state_dict().items()}, party.gemm


def test_a_party_step_on_onednn_equals_the_step_on_mkl(tmp_path: Path) -> None:
    mkl, mkl_choice = leader_step(gemm_job(tmp_path, "mkl"))
    assert mkl_choice is not None and mkl_choice.path == "mkl"
    onednn, onednn_choice = leader_step(gemm_job(tmp_path, "onednn"))
    assert onednn_choice is not None and onednn_choice.path == "onednn"
    assert mkl.keys() == onednn.keys()
    for key in mkl:
        torch.testing.assert_close(onednn[key], mkl[key], rtol=1e-5, atol=1e-6, msg=key)


def test_split_training_on_onednn_equals_joint_training_on_mkl(tmp_path: Path) -> None:
    job = gemm_job(tmp_path, "onednn", epochs=1, batch_size=48, l2_coef=1e-3)
    run_local(job, train_session)
    split = leader_losses(job)
    joint = joint_losses(gemm_job(tmp_path, "mkl", epochs=1, batch_size=48, l2_coef=1e-3), len(split))
    assert len(split) == 20
    assert np.allclose(split, joint, atol=1e-6, rtol=0)
    assert split[-1] < split[0]
    for role in ("leader", "follower"):  # each party's start record says which path it ran (bench-train reads it)
        start = next(r for r in read_records(job.train.run_dir / role / "metrics.jsonl") if r["event"] == "start")
        assert start["gemm"] == "onednn" and "set in the job" in start["gemm_detail"]


def test_checkpoints_load_across_paths(tmp_path: Path) -> None:
    onednn_job = gemm_job(tmp_path, "onednn")
    meta = open_party(onednn_job.data.dir, "leader").meta
    onednn = build_party(onednn_job, "leader", meta, torch.device("cpu"))
    mkl = build_party(gemm_job(tmp_path, "mkl"), "leader", meta, torch.device("cpu"))
    assert onednn.bottom is not None and onednn.top is not None and mkl.bottom is not None
    for parameter in onednn.bottom.parameters():
        parameter.data.add_(0.5)  # a state the fresh mkl party does not have
    state = copy.deepcopy(onednn.state_dict())
    mkl.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(mkl.bottom.state_dict().values(), state["bottom"].values(),
                                                  strict=True))
    onednn.load_state_dict(mkl.state_dict())  # and back


def test_auto_keeps_the_default_on_a_small_model_without_timing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_timing(*args: object, **kwargs: object) -> None:
        raise AssertionError("auto timed a layer too small to matter")

    monkeypatch.setattr(kernels, "_step_seconds", no_timing)
    party = build_party(gemm_job(tmp_path, "auto"), "leader", open_party(tmp_path / "data", "leader").meta,
                        torch.device("cpu"))
    choice = party.gemm
    assert choice is not None and choice.path == kernels.DEFAULT_PATH and choice.mkl_gflops is None
    assert "not timed" in choice.describe()
    assert party.bottom is not None
    assert all(type(m) is nn.Linear for m in party.bottom.modules() if isinstance(m, nn.Linear))


def test_auto_times_both_paths_once_per_process_within_its_time_box() -> None:
    kernels._timed_choice.cache_clear()
    first = choose_gemm("auto", (4000, 256, 256), threads=1)  # 1.6 GFLOP per step: timed
    assert first.mkl_gflops and first.onednn_gflops and first.path in ("mkl", "onednn")
    assert choose_gemm("auto", (4000, 256, 256), threads=1) is first  # cached
    assert choose_gemm("onednn", (4000, 256, 256), threads=1).mkl_gflops is None  # as set: nothing timed


def test_gemm_gflops_reports_forward_backward_and_step() -> None:
    speed = gemm_gflops("onednn", (256, 64, 32), reps=2, threads=1)
    assert speed.forward > 0 and speed.backward > 0 and speed.step > 0


def test_gemm_is_not_in_the_fingerprint(tmp_path: Path) -> None:
    prints = {gemm_job(tmp_path, gemm).fingerprint() for gemm in ("auto", "mkl", "onednn")}
    assert len(prints) == 1
