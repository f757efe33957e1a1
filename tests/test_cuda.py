"""The CUDA path (`device: cuda` / `auto`), where this machine has a GPU; skipped elsewhere. A party on the GPU
trains what it trains on the CPU (to float tolerance: other kernels), batches and cut tensors cross from pinned
host memory, and two workers per party (NCCL inside the party, one GPU each) equal one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.conftest import job_dict, write_planted_data
from tests.test_resume import final_auc
from tests.test_workers import paired, train_both  # noqa: F401, F811 - paired is a fixture
from vfl_cli.job import parse_job
from vfl_cli.train.batches import to_device
from vfl_cli.train.session import run_local, train_session

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


def trained_auc(tmp_path: Path, name: str, device: str, **party: object) -> float:
    spec = job_dict(tmp_path / name)
    for p in spec["parties"].values():
        p.update(device=device, **party)
    write_planted_data(Path(spec["data"]["dir"]))
    job = parse_job(spec)
    run_local(job, train_session)
    return final_auc(job.train.run_dir)


def test_a_party_on_the_gpu_trains_the_cpu_model(tmp_path: Path) -> None:
    assert abs(trained_auc(tmp_path, "gpu", "cuda") - trained_auc(tmp_path, "cpu", "cpu")) <= 2e-3


def test_batches_cross_from_pinned_memory() -> None:
    host = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    moved = to_device(host, torch.device("cuda"))
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), host)
    assert not host.is_pinned()  # the caller's tensor is left as it was


def test_bf16_autocast_on_the_gpu(tmp_path: Path) -> None:
    spec = job_dict(tmp_path, precision="bf16")
    for p in spec["parties"].values():
        p["device"] = "cuda"
    write_planted_data(Path(spec["data"]["dir"]))
    job = parse_job(spec)
    run_local(job, train_session)
    assert final_auc(job.train.run_dir) > 0.7


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two workers per party need two GPUs")
def test_two_workers_per_party_on_two_gpus(
    paired: tuple[dict[str, Any], Path, float, dict[int, float]],  # noqa: F811 - the fixture
) -> None:
    """Worker i of each party on GPU i (LOCAL_RANK), NCCL inside the party: the model of one CPU worker."""
    spec, job, auc, _ = paired
    for party in spec["parties"].values():
        party["device"] = "cuda"
    job.write_text(yaml.safe_dump(spec))
    (leader_code, _, leader_err), (follower_code, _, follower_err) = train_both(job)
    assert (leader_code, follower_code) == (0, 0), leader_err + follower_err
    assert abs(final_auc(Path(spec["train"]["run_dir"])) - auc) <= 2e-3
