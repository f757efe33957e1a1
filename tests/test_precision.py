"""`train.precision: bf16`: the bottoms' matmuls in bfloat16, float32 everywhere else; split still equals joint
within bf16's tolerance, and it learns what fp32 learns."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep.store import open_party
from tests.conftest import job_dict, write_planted_data
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.model.ftrl import Ftrl
from vfl_cli.train import parties
from vfl_cli.train.batches import iterate
from vfl_cli.train.parties import build_party, cpu_has_bf16, use_bf16
from vfl_cli.train.session import run_local, train_session

needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this processor has no native bfloat16")


def planted_job(tmp_path: Path, precision: str, **train: object) -> JobSpec:
    spec = job_dict(tmp_path, precision=precision, **train)
    write_planted_data(Path(spec["data"]["dir"]), rows=1200)
    return parse_job(spec)


@needs_bf16
def test_bf16_bottom_sends_float32_and_computes_in_bfloat16(tmp_path: Path) -> None:
    job = planted_job(tmp_path, "bf16")
    meta = open_party(job.data.dir, "leader").meta
    party = build_party(job, "leader", meta, torch.device("cpu"))
    assert party.bf16
    ids = torch.randint(0, meta.vocab_size, (32, len(job.leader.fields)), dtype=torch.int32)
    vals = torch.rand(32, len(job.leader.fields))
    cut = party.bottom_forward(ids, vals)
    wide, deep = cut["wide"], cut["deep"]
    assert wide.dtype == deep.dtype == torch.float32  # the cut layer is float32 whatever the precision
    assert party.bottom is not None
    fp32_deep = party.bottom(ids, vals)["deep"]
    assert not torch.equal(deep, fp32_deep)  # the matmuls really ran in bfloat16
    torch.testing.assert_close(deep, fp32_deep, rtol=0.05, atol=0.02)
    assert all(p.dtype == torch.float32 for p in party.bottom.parameters())  # master weights stay float32


def leader_losses(job: JobSpec) -> list[float]:
    lines = (job.train.run_dir / "leader" / "metrics.jsonl").read_text().splitlines()
    return [r["wide_loss"] for r in map(json.loads, lines) if r["event"] == "step"]


def joint_bf16_losses(job: JobSpec) -> list[float]:
    """The reference math in one process: bottoms under bf16 autocast, top in float32, L2 in the loss, plain Adam."""
    device = torch.device("cpu")
    data = {role: open_party(job.data.dir, role) for role in ("leader", "follower")}
    leader = build_party(job, "leader", data["leader"].meta, device)
    follower = build_party(job, "follower", data["follower"].meta, device)
    assert leader.top is not None and leader.bottom is not None and follower.bottom is not None
    modules = [leader.bottom, follower.bottom, leader.top]
    ftrl, adam = job.train.wide_optimizer, job.train.deep_optimizer
    optimizers = [Ftrl([*leader.bottom.wide_parameters(), *follower.bottom.wide_parameters()], lr=ftrl.lr,
                       l1=ftrl.l1, l2=ftrl.l2, initial_accumulator=ftrl.initial_accumulator),
                  torch.optim.Adam([*leader.bottom.deep_parameters(), *follower.bottom.deep_parameters(),
                                    *leader.top.parameters()], lr=adam.lr, eps=adam.eps, foreach=False)]
    losses = []
    batches = [iterate(data[r].split("train"), job.train.batch_size, job.seed, 0, True) for r in data]
    for lb, fb in zip(*batches, strict=True):
        for optimizer in optimizers:
            optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            own = leader.bottom(lb.ids, lb.vals)
            theirs = follower.bottom(fb.ids, fb.vals)
        logits = leader.top([{k: t.float() for k, t in own.items()}, {k: t.float() for k, t in theirs.items()}])
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], lb.labels)
        l2 = sum(m.l2_penalty(job.train.l2_coef) for m in modules[:2])
        (loss + l2).backward()
        for optimizer in optimizers:
            optimizer.step()
        losses.append(loss.item())
    return losses


@needs_bf16
def test_bf16_split_training_equals_joint_within_bf16_tolerance(tmp_path: Path) -> None:
    # Stated tolerance: 2e-3 on each step's loss over 20 steps. The two runs do the same bf16 matmuls; they
    # differ in float32 rounding (fused Adam with weight decay vs the loop with L2 in the loss), which can tip a
    # value across a bfloat16 rounding boundary (a relative step of 2^-8) now and then.
    job = planted_job(tmp_path, "bf16", epochs=1, batch_size=48, l2_coef=1e-3)
    run_local(job, train_session)
    split, joint = leader_losses(job), joint_bf16_losses(job)
    assert len(split) == 20
    assert np.allclose(split, joint, atol=2e-3, rtol=0)
    assert split[-1] < split[0]


@needs_bf16
def test_bf16_learns_what_fp32_learns(tmp_path: Path) -> None:
    fp32 = run_local(planted_job(tmp_path / "fp32", "fp32"), train_session)["leader"].epochs[-1][2]
    bf16 = run_local(planted_job(tmp_path / "bf16", "bf16"), train_session)["leader"].epochs[-1][2]
    assert fp32 is not None and bf16 is not None
    assert bf16.score != fp32.score  # bf16 really ran
    assert abs(bf16.score - fp32.score) < 0.01


def test_bf16_without_native_support_falls_back_to_fp32_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(parties, "cpu_has_bf16", lambda: False)  # a processor without AVX512-BF16 or AMX
    with caplog.at_level(logging.WARNING):
        assert use_bf16("bf16", torch.device("cpu")) is False
    assert "computes in fp32" in caplog.text
    assert use_bf16("fp32", torch.device("cpu")) is False


@needs_bf16
def test_a_bf16_baseline_computes_in_bfloat16_and_returns_float32_logits(tmp_path: Path) -> None:
    from vfl_cli.train.baseline import baseline_task, build_model, logits, open_baseline_data
    from vfl_cli.train.batches import Batch

    job = planted_job(tmp_path, "bf16")
    fp32 = job.model_copy(update={"train": job.train.model_copy(update={"precision": "fp32"})})
    data = open_baseline_data(job, "central")
    model = build_model(job, data, baseline_task(job, data))
    batch: Batch = next(data.batches("train", 64, job.seed, 0, shuffle=False))
    in_bf16, in_fp32 = logits(model, job, batch), logits(model, fp32, batch)
    assert in_bf16.dtype == torch.float32 and in_bf16.shape == in_fp32.shape == (64, 1)
    assert not torch.equal(in_bf16, in_fp32)  # the matmuls really ran in bfloat16...
    assert torch.allclose(in_bf16, in_fp32, atol=0.05)  # ...and agree to bfloat16's precision
