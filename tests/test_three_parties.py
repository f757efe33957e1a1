"""A leader and two followers: learning, three processes over mutual TLS equal to one, and kill -9 of any one."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import write_job
from tests.test_train_local import joint_losses
from tests.test_two_party import finish
from tests.three_parties import make_certs, run_all, start, three_party_job, write_three_party_data
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.reporter import SilentReporter
from vfl_cli.train.baseline import train_baseline
from vfl_cli.train.session import run_local, train_session

AUC = re.compile(r"test: AUC (\d\.\d+)")


def final_auc(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "leader" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "epoch"][-1]["test_auc"]


@pytest.fixture
def local_three(tmp_path: Path) -> JobSpec:
    spec = three_party_job(tmp_path, epochs=3)
    write_three_party_data(Path(spec["data"]["dir"]))
    return parse_job(spec)


def test_three_parties_learn_what_none_has_alone(local_three: JobSpec) -> None:
    outcome = run_local(local_three, train_session)
    assert set(outcome) == {"leader", "follower1", "follower2"}
    three = outcome["leader"].epochs[-1][2]
    alone = train_baseline(local_three, "leader-only", SilentReporter()).epochs[-1][2]
    assert three is not None and alone is not None
    # Each party holds a third of the planted signal: the leader alone reads 0.770, all three together 0.937
    # (every column pooled in one model: 0.927). With follower2's cut zeroed at the leader by hand: 0.837.
    assert three.score > alone.score + 0.08, (three.score, alone.score)


def test_three_party_split_training_equals_the_joint_model(local_three: JobSpec) -> None:
    """Each follower's bottom gets the gradients of its own cut: the per-step losses are those of one module
    holding all three bottoms and the top, trained on the same batches."""
    run_local(local_three, train_session)
    lines = (local_three.train.run_dir / "leader" / "metrics.jsonl").read_text().splitlines()
    split = [r["wide_loss"] for r in map(json.loads, lines) if r["event"] == "step"]
    joint = joint_losses(local_three, len(split))
    assert len(split) == 57  # 3 epochs of 19 steps
    assert np.allclose(split, joint, atol=1e-6, rtol=0)
    assert split[-1] < split[0]


@pytest.fixture
def tls_three(tmp_path: Path) -> tuple[dict[str, Any], Path, float]:
    """The three-party job over mutual TLS (its certificates made), and the test AUC of `--role local` on it."""
    spec = three_party_job(tmp_path, tls=True, epochs=2, checkpoint_every=10)
    spec["transport"]["timeout_s"] = 3
    write_three_party_data(Path(spec["data"]["dir"]), rows=4000)
    job = write_job(tmp_path, spec)
    make_certs(job)
    reference = parse_job({**spec, "train": {**spec["train"], "run_dir": str(tmp_path / "reference")}})
    run_local(reference, train_session)
    return spec, job, final_auc(reference.train.run_dir)


def test_three_processes_over_mtls_train_like_one(tls_three: tuple[dict[str, Any], Path, float]) -> None:
    spec, job, local_auc = tls_three
    results = run_all("train", "--job", str(job), "--restart")
    assert all(code == 0 for code, _, _ in results.values()), {k: err[-2000:] for k, (_, _, err) in results.items()}
    _, out, _ = results["leader"]
    assert abs(float(AUC.search(out).group(1)) - local_auc) <= 1e-6
    assert abs(final_auc(Path(spec["train"]["run_dir"])) - local_auc) <= 1e-6
    for key in ("follower1", "follower2"):
        assert f"{key}: sent its part" not in results[key][1]  # training prints no eval line at a follower
        assert "Traceback" not in results[key][2]


def last_step(run_dir: Path) -> int:
    metrics = run_dir / "leader" / "metrics.jsonl"
    if not metrics.exists():
        return 0
    steps = [json.loads(line).get("global_step", 0) for line in metrics.read_text().splitlines() if line]
    return max(steps, default=0)


# CI kills one party, picked by seed; `make test-all` kills each in turn.
VICTIM = random.Random("three-party kill").choice(["leader", "follower1", "follower2"])


@pytest.mark.parametrize("victim", [pytest.param(v, marks=[] if v == VICTIM else [pytest.mark.slow])
                                    for v in ("leader", "follower1", "follower2")])
def test_kill_any_one_of_three_and_rerun_all_ends_like_an_uninterrupted_run(
    tls_three: tuple[dict[str, Any], Path, float], victim: str
) -> None:
    spec, job, reference_auc = tls_three
    run_dir = Path(spec["train"]["run_dir"])
    step = random.Random(f"kill-{victim}").randrange(5, 100)  # of 2 x 50 steps
    processes = {key: start(key, "train", "--job", str(job)) for key in ("follower2", "follower1", "leader")}
    deadline = time.monotonic() + 120
    while last_step(run_dir) < step and time.monotonic() < deadline and processes["leader"].poll() is None:
        time.sleep(0.005)
    processes[victim].kill()
    started = time.monotonic()
    codes = {key: finish(process, timeout=60)[0] for key, process in processes.items()}
    assert time.monotonic() - started < 30, "the survivors stop within the timeout"
    assert all(code != 0 for key, code in codes.items() if key != victim), codes
    results = run_all("train", "--job", str(job))
    assert all(code == 0 for code, _, _ in results.values()), {k: err[-2000:] for k, (_, _, err) in results.items()}
    assert "resumed run" in results["leader"][2]
    assert abs(final_auc(run_dir) - reference_auc) <= 1e-6
