"""Leader and follower as two real processes over mutual TLS on 127.0.0.1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import job_dict, write_job, write_planted_data

VFL = [sys.executable, "-m", "vfl_cli.app"]
PASSWORDS = {"VFL_LEADER_KEY_PASSWORD": "leader-secret", "VFL_FOLLOWER_KEY_PASSWORD": "follower-secret"}


def tls_job(tmp_path: Path, **train: Any) -> dict[str, Any]:
    spec = job_dict(tmp_path, **train)
    certs = tmp_path / "certs"
    spec["tls"] = {"enabled": True, "ca": str(certs / "ca.pem")}
    for role in ("leader", "follower"):
        spec["parties"][role].update(cert=str(certs / f"{role}.pem"), key=str(certs / f"{role}.key"),
                                     key_password_env=f"VFL_{role.upper()}_KEY_PASSWORD")
    return spec


def environment() -> dict[str, str]:
    return {**os.environ, **PASSWORDS, "VFL_NO_PROGRESS": "1"}


def start(role: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*VFL, *args, "--role", role], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=environment())


def finish(process: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, out, err


@pytest.fixture
def tls_setup(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    spec = tls_job(tmp_path)
    write_planted_data(Path(spec["data"]["dir"]))
    job = write_job(tmp_path, spec)
    made = subprocess.run([*VFL, "certs", "--job", str(job)], capture_output=True, text=True, env=environment())
    assert made.returncode == 0, made.stderr
    return spec, job


# Every defence at once (one per tensor): what crosses the wire is noised, flipped and bit-packed, and the two
# processes must still draw exactly what one process draws.
ALL_DEFENCES = {"label_dp": {"eps": 2.0}, "marvell": {"power": 4.0},
                "embedding_dp": {"clip_norm": 2.0, "sigma": 0.1}, "quantize": {"embeddings": 6, "gradients": 3}}


# Validation with early stopping: the leader's `selection` messages cross the wire after every epoch.
SELECTION = {"data": {"valid_fraction": 0.25}, "train": {"epochs": 3, "early_stopping": {"patience": 1}}}


@pytest.mark.parametrize("overrides", [{}, {"privacy": ALL_DEFENCES}, SELECTION],
                         ids=["plain", "all-defences", "model-selection"])
def test_two_processes_train_like_one(tls_setup: tuple[dict[str, Any], Path], overrides: dict) -> None:
    spec, job = tls_setup
    if overrides:
        merged = {key: {**spec.get(key, {}), **value} for key, value in overrides.items()}
        job = write_job(job.parent, {**spec, **merged})
    local = subprocess.run([*VFL, "train", "--role", "local", "--job", str(job)], capture_output=True, text=True,
                           env=environment())
    local_auc = float(re.search(r"test: AUC (\d\.\d+)", local.stdout).group(1))
    follower = start("follower", "train", "--job", str(job), "--restart")
    leader = start("leader", "train", "--job", str(job), "--restart")
    leader_code, leader_out, leader_err = finish(leader)
    follower_code, _, follower_err = finish(follower)
    assert (leader_code, follower_code) == (0, 0), leader_err + follower_err
    auc = float(re.search(r"leader test: AUC (\d\.\d+)", leader_out).group(1))
    assert abs(auc - local_auc) <= 1e-6
    assert re.search(r"leader sent [\d.]+ MB, received [\d.]+ MB", leader_out)
    assert "Traceback" not in leader_err + follower_err


def test_killed_follower_stops_the_leader_within_the_timeout(tmp_path: Path) -> None:
    spec = tls_job(tmp_path, epochs=50)
    spec["transport"]["timeout_s"] = 3
    write_planted_data(Path(spec["data"]["dir"]), rows=20_000)
    job = write_job(tmp_path, spec)
    assert subprocess.run([*VFL, "certs", "--job", str(job)], capture_output=True, env=environment()).returncode == 0
    follower = start("follower", "train", "--job", str(job))
    leader = start("leader", "train", "--job", str(job))
    metrics = Path(spec["train"]["run_dir"]) / "leader" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not metrics.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metrics.exists(), "training never started"
    follower.kill()
    killed_at = time.monotonic()
    code, _, err = finish(leader, timeout=60)
    finish(follower)
    assert code == 4, err
    assert time.monotonic() - killed_at < 3 + 10  # the timeout plus a margin for a loaded machine
    assert "follower" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1


def test_mismatched_jobs_stop_both_sides_at_handshake(tls_setup: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    spec, job = tls_setup
    spec["seed"] = 99  # the follower's copy of the job differs in a shared setting
    other = tmp_path / "other"
    other.mkdir()
    follower_job = write_job(other, spec)
    follower = start("follower", "train", "--job", str(follower_job))
    leader = start("leader", "train", "--job", str(job))
    leader_code, _, leader_err = finish(leader)
    follower_code, _, follower_err = finish(follower)
    assert leader_code == 5 and follower_code == 5, leader_err + follower_err
    assert "job fingerprint" in leader_err and "job fingerprint" in follower_err
