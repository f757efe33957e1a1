"""One training history, agreed by both parties: a run stopped anywhere and resumed ends exactly where an
uninterrupted run ends (same test AUC to 1e-6, same loss at every step), in one process and in two."""

from __future__ import annotations

import json
import random
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import job_dict, write_job, write_planted_data
from tests.test_two_party import VFL, environment, finish, start, tls_job
from vfl_cli.errors import CheckpointError, ProtocolError
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.reporter import SilentReporter
from vfl_cli.train.session import eval_session, infer_session, run_local, train_session

# The local job: 960 train rows / batch 64 = 15 steps per epoch, 2 epochs, 4 test batches; a checkpoint every
# 4 steps gives mid-epoch checkpoints at 4, 8, 12, 16, ... and epoch-end ones at 15 and 30.
STEPS_PER_EPOCH, EPOCHS, EVERY = 15, 2, 4


class Crash(Exception):
    """A party dying: raised from inside its loop."""


class CrashAfter(SilentReporter):
    """A reporter that kills its party after `batches` batches (training and evaluation both count)."""

    def __init__(self, batches: int) -> None:
        self.left = batches

    def advance(self, samples: int) -> None:
        self.left -= 1
        if self.left == 0:
            raise Crash("killed")


def records(run_dir: Path, role: str = "leader") -> list[dict[str, Any]]:
    path = run_dir / role / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(run_dir: Path) -> dict[int, float]:
    """The leader's wide_loss by global step; a resumed run's later records overwrite the replayed steps."""
    return {r["global_step"]: r["wide_loss"] for r in records(run_dir) if r["event"] == "step"}


def final_auc(run_dir: Path) -> float:
    return [r["test_auc"] for r in records(run_dir) if r["event"] == "epoch"][-1]


def held(job: JobSpec, role: str) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (job.train.run_dir / role).glob("checkpoint-*.pt"))


def drop_newest(job: JobSpec, role: str) -> int:
    """What a party that died just before writing its newest checkpoint has on disk."""
    newest = held(job, role)[-1]
    (job.train.run_dir / role / f"checkpoint-{newest:09d}.pt").unlink()
    return newest


@pytest.fixture
def local_spec(tmp_path: Path) -> dict[str, Any]:
    spec = job_dict(tmp_path, checkpoint_every=EVERY)
    spec["transport"]["timeout_s"] = 5
    write_planted_data(Path(spec["data"]["dir"]))
    return spec


@pytest.fixture
def reference(local_spec: dict[str, Any], tmp_path: Path) -> tuple[float, dict[int, float]]:
    """An uninterrupted run of the same job (run_dir is a local setting: the same job fingerprint)."""
    job = parse_job({**local_spec, "train": {**local_spec["train"], "run_dir": str(tmp_path / "reference")}})
    run_local(job, train_session)
    return final_auc(job.train.run_dir), losses(job.train.run_dir)


def assert_same_history(job: JobSpec, reference: tuple[float, dict[int, float]], resumed_at: int) -> None:
    """The same final AUC, and the same loss at every step logged before the stop and after the resume."""
    auc, reference_losses = reference
    assert abs(final_auc(job.train.run_dir) - auc) <= 1e-6
    resumed_losses = losses(job.train.run_dir)
    assert set(range(resumed_at + 1, STEPS_PER_EPOCH * EPOCHS + 1)) <= set(resumed_losses)
    for step, loss in resumed_losses.items():
        assert abs(loss - reference_losses[step]) <= 1e-6, f"step {step}: {loss} != {reference_losses[step]}"


# Where each side dies: after n of its 2 x (15 + 4) batches, chosen by a seeded random; `drop` also deletes
# the newest checkpoint of one side, as if it had died just before writing it while the other had not.
CRASHES = [(victim, n, drop) for victim, n, drop in zip(
    ["follower", "leader"] * 4,
    random.Random(20240611).sample(range(1, 2 * (STEPS_PER_EPOCH + 4)), 8),
    [None, None, "leader", "follower", None, "follower", "leader", None],
    strict=True,
)]


@pytest.mark.parametrize(("victim", "batches", "drop"), CRASHES)
def test_local_run_stopped_anywhere_resumes_to_the_same_model(
    local_spec: dict[str, Any], reference: tuple[float, dict[int, float]], victim: str, batches: int,
    drop: str | None,
) -> None:
    job = parse_job(local_spec)
    with pytest.raises(Crash):
        run_local(job, train_session, {victim: CrashAfter(batches)})
    if drop and held(job, drop):
        drop_newest(job, drop)
    expected = max(set(held(job, "leader")) & set(held(job, "follower")) | {0})
    outcome = run_local(job, train_session)["leader"]
    assert outcome.resumed and outcome.start.step == expected
    resume = [r for r in records(job.train.run_dir) if r["event"] == "resume"][-1]
    assert (resume["step"], resume["epoch"], resume["epoch_step"]) == (expected, *divmod(expected, STEPS_PER_EPOCH))
    assert_same_history(job, reference, expected)
    for role in ("leader", "follower"):  # after the run: the two newest, the same on both sides
        assert held(job, role) == [28, 30]


@pytest.mark.parametrize("victim", ["leader", "follower"])
def test_a_crash_during_the_last_evaluation_runs_it_again(
    local_spec: dict[str, Any], reference: tuple[float, dict[int, float]], victim: str
) -> None:
    """The epoch-end checkpoint comes after the epoch's test evaluation, so a resume never skips one."""
    job = parse_job(local_spec)
    with pytest.raises(Crash):  # batch 36 of 38: the second test batch of the last epoch
        run_local(job, train_session, {victim: CrashAfter(2 * STEPS_PER_EPOCH + 4 + 2)})
    outcome = run_local(job, train_session)["leader"]
    assert outcome.start.step == 28 and [e for e, _, _ in outcome.epochs] == [1]
    assert abs(outcome.epochs[-1][2].score - reference[0]) <= 1e-6


@pytest.mark.parametrize("loser", ["leader", "follower"])
def test_epoch_end_checkpoint_of_one_side_only(
    local_spec: dict[str, Any], reference: tuple[float, dict[int, float]], loser: str
) -> None:
    """A party killed between the other's epoch-end checkpoint and its own: both roll back to step 28."""
    job = parse_job(local_spec)
    run_local(job, train_session)
    assert drop_newest(job, loser) == 30
    outcome = run_local(job, train_session)["leader"]
    assert outcome.start.step == 28 and [e for e, _, _ in outcome.epochs] == [1]
    assert_same_history(job, reference, 28)


def test_a_side_that_lost_all_its_checkpoints_rolls_both_back_to_the_start(
    local_spec: dict[str, Any], reference: tuple[float, dict[int, float]]
) -> None:
    job = parse_job(local_spec)
    run_local(job, train_session)
    for _ in range(2):
        drop_newest(job, "follower")  # run.json stays: the follower is still on the run, at step 0
    outcome = run_local(job, train_session)["leader"]
    assert outcome.resumed and outcome.start.step == 0 and len(outcome.epochs) == EPOCHS
    assert_same_history(job, reference, 0)


def test_restart_on_one_side_alone_is_refused_and_changes_nothing(local_spec: dict[str, Any]) -> None:
    job = parse_job(local_spec)
    first = run_local(job, train_session)["leader"]
    before = {role: held(job, role) for role in ("leader", "follower")}
    for restarting in ("leader", "follower"):
        with pytest.raises(ProtocolError, match="--restart on one side alone is refused") as caught:
            run_local(job, lambda run, r=restarting: train_session(run, restart=run.role == r))
        assert "holds run" in str(caught.value) and "holds no checkpoint" in str(caught.value)
        assert {role: held(job, role) for role in ("leader", "follower")} == before
    restarted = run_local(job, lambda run: train_session(run, restart=True))["leader"]
    assert not restarted.resumed and restarted.run_id != first.run_id and len(restarted.epochs) == EPOCHS
    assert abs(restarted.epochs[-1][2].score - first.epochs[-1][2].score) <= 1e-6  # deterministic from the seed


def test_different_runs_on_the_two_sides_are_refused(local_spec: dict[str, Any], tmp_path: Path) -> None:
    job = parse_job(local_spec)
    run_local(job, train_session)
    other = parse_job({**local_spec, "train": {**local_spec["train"], "run_dir": str(tmp_path / "other")}})
    run_local(other, train_session)
    follower_dir = job.train.run_dir / "follower"
    for path in follower_dir.iterdir():
        path.unlink()
    for path in (other.train.run_dir / "follower").iterdir():
        path.rename(follower_dir / path.name)  # the follower's files now belong to another run
    with pytest.raises(ProtocolError, match="the parties hold different training runs"):
        run_local(job, train_session)


@pytest.mark.parametrize("behind", ["leader", "follower"])
def test_eval_and_infer_refuse_checkpoints_of_different_steps(
    local_spec: dict[str, Any], tmp_path: Path, behind: str
) -> None:
    job = parse_job(local_spec)
    run_local(job, train_session)
    drop_newest(job, behind)
    ahead = next(r for r in job.parties if r != behind)
    needle = (f"checkpoints differ: the {ahead}'s is newer than the {behind}'s: run \\w{{8}} step 30 "
              r"\(end of epoch 1\) against step 28 \(epoch 1 step 13\)")
    with pytest.raises(ProtocolError, match=needle):
        run_local(job, lambda run: eval_session(run, job.train.run_dir, "test"))
    with pytest.raises(ProtocolError, match=needle):
        run_local(job, lambda run: infer_session(run, job.train.run_dir, "test", tmp_path / "p.csv"))
    assert not (tmp_path / "p.csv").exists()


def test_eval_without_any_checkpoint(local_spec: dict[str, Any]) -> None:
    job = parse_job(local_spec)
    with pytest.raises(CheckpointError, match="no checkpoint here; run `vfl train` first|has no usable checkpoint"):
        run_local(job, lambda run: eval_session(run, job.train.run_dir, "test"))


def test_cli_resumes_and_refuses_mismatched_eval(local_spec: dict[str, Any], tmp_path: Path) -> None:
    """As the user sees it: one line and exit code 5 for mismatched checkpoints; the resume line; same AUC."""
    job_path = str(write_job(tmp_path, local_spec))
    env = {**environment(), "PATH": "/usr/bin:/bin"}

    def vfl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*VFL, *args, "--role", "local", "--job", job_path], capture_output=True, text=True,
                              timeout=300, env=env)

    trained = vfl("train")
    assert trained.returncode == 0, trained.stderr
    auc = re.search(r"local test: AUC (\d\.\d+)", trained.stdout).group(1)
    drop_newest(parse_job(local_spec), "leader")
    refused = vfl("eval")
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 5 and len(lines) == 1, refused.stderr
    assert lines[0].startswith("error: checkpoints differ: the follower's is newer than the leader's")
    resumed = vfl("train")
    assert resumed.returncode == 0, resumed.stderr
    run_id = json.loads((tmp_path / "run" / "leader" / "run.json").read_text())["run_id"]
    assert f"resumed run {run_id} at step 28 (epoch 1 step 13)" in resumed.stderr  # said as it begins
    assert f"local test: AUC {auc}" in resumed.stdout


# -------------------------------------------------------------------------- two processes over mutual TLS


@pytest.fixture
def tls_resume(tmp_path: Path) -> tuple[dict[str, Any], str, float]:
    """A two-process job long enough to be killed mid-run (2 x 75 steps), its certificates, and the test AUC
    of an uninterrupted run (`--role local`, which equals two processes to 1e-6: test_two_party)."""
    spec = tls_job(tmp_path, checkpoint_every=10)
    spec["transport"]["timeout_s"] = 3
    write_planted_data(Path(spec["data"]["dir"]), rows=6000)
    job = write_job(tmp_path, spec)
    made = subprocess.run([*VFL, "certs", "--job", str(job)], capture_output=True, text=True, env=environment())
    assert made.returncode == 0, made.stderr
    reference = parse_job({**spec, "train": {**spec["train"], "run_dir": str(tmp_path / "reference")}})
    run_local(reference, train_session)
    return spec, str(job), final_auc(reference.train.run_dir)


def train_both(job: str) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    follower = start("follower", "train", "--job", job)
    leader = start("leader", "train", "--job", job)
    return finish(leader), finish(follower)


def last_logged_step(run_dir: Path) -> int:
    steps = [r["global_step"] for r in records(run_dir) if r["event"] == "step"]
    return steps[-1] if steps else 0


def kill_at_step(job: str, run_dir: Path, victim: str, step: int) -> int:
    """Start both sides, SIGKILL `victim` once the leader has logged global step `step`; the survivor must stop
    on its own within the timeout. Returns the last step the leader logged."""
    processes = {"follower": start("follower", "train", "--job", job), "leader": start("leader", "train", "--job", job)}
    metrics = run_dir / "leader" / "metrics.jsonl"
    deadline, reached = time.monotonic() + 120, 0
    while reached < step and time.monotonic() < deadline and processes["leader"].poll() is None:
        time.sleep(0.005)
        if metrics.exists():
            reached = last_logged_step(run_dir)
    processes[victim].kill()
    survivor = "leader" if victim == "follower" else "follower"
    code, _, err = finish(processes[survivor], timeout=60)
    finish(processes[victim])
    assert code == 4, f"the {survivor} should stop within the timeout (exit 4), got {code}: {err}"
    return last_logged_step(run_dir)


@pytest.mark.parametrize("victim", ["follower", "leader"])
def test_two_processes_killed_and_resumed_end_like_an_uninterrupted_run(
    tls_resume: tuple[dict[str, Any], str, float], victim: str
) -> None:
    spec, job, reference_auc = tls_resume
    run_dir = Path(spec["train"]["run_dir"])
    step = random.Random(f"kill-{victim}").randrange(5, 140)
    logged = kill_at_step(job, run_dir, victim, step)
    assert logged >= step
    (leader_code, _, leader_err), (follower_code, _, follower_err) = train_both(job)
    assert (leader_code, follower_code) == (0, 0), leader_err + follower_err
    resume = [r for r in records(run_dir) if r["event"] == "resume"][-1]
    # Each side holds every checkpoint up to the step before the other's last one, so they share one at most
    # one interval back; the leader may have saved one step past its last log line.
    assert logged - 10 <= resume["step"] <= logged + 1
    assert f"resumed run {resume['run_id']} at step {resume['step']}" in leader_err + follower_err
    assert abs(final_auc(run_dir) - reference_auc) <= 1e-6
    assert "Traceback" not in leader_err + follower_err


def test_two_processes_leader_lost_its_epoch_end_checkpoint(tls_resume: tuple[dict[str, Any], str, float]) -> None:
    """The leader killed between the follower's epoch-end checkpoint and its own: exactly this disk state."""
    spec, job, reference_auc = tls_resume
    run_dir = Path(spec["train"]["run_dir"])
    (leader_code, _, leader_err), (follower_code, _, follower_err) = train_both(job)
    assert (leader_code, follower_code) == (0, 0), leader_err + follower_err
    (run_dir / "leader" / "checkpoint-000000150.pt").unlink()

    # eval and infer first: the two newest checkpoints differ, both sides refuse with one line, exit 5
    for verb, extra in (("eval", ()), ("infer", ("--out", str(run_dir / "p.csv")))):
        follower = start("follower", verb, "--job", job)
        leader = start("leader", verb, "--job", job, *extra)
        for code, _, err in (finish(leader), finish(follower)):
            lines = [line for line in err.splitlines() if line.startswith("error: ")]
            assert code == 5 and len(lines) == 1, err
            assert "checkpoints differ: the follower's is newer than the leader's" in lines[0]
            assert "step 150 (end of epoch 1) against step 140 (epoch 1 step 65)" in lines[0]

    (leader_code, _, leader_err), (follower_code, _, follower_err) = train_both(job)
    assert (leader_code, follower_code) == (0, 0), leader_err + follower_err
    assert "at step 140 (epoch 1 step 65)" in leader_err and "at step 140 (epoch 1 step 65)" in follower_err
    assert abs(final_auc(run_dir) - reference_auc) <= 1e-6
    follower = start("follower", "eval", "--job", job)
    leader = start("leader", "eval", "--job", job)
    (code, out, err), (follower_code, _, _) = finish(leader), finish(follower)
    assert (code, follower_code) == (0, 0), err
    assert f"AUC {reference_auc:.6f}" in out
