"""Checkpoints end with a SHA-256 digest of their bytes, checked on every load: in training a file that fails it
is not held (one warning naming it) and the run resumes from the older one to the uninterrupted run's AUC;
eval, infer and the baselines refuse it with one line (exit 6). Files from before the digest load, with a
warning."""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import job_dict, run_vfl, write_job, write_planted_data
from tests.test_checkpoint import JOB, RUN, state, store_at
from tests.test_resume import EVERY, Crash, CrashAfter, final_auc, held
from tests.test_two_party import VFL, environment
from vfl_cli.checkpoint import SELECTED_FILE, file_name
from vfl_cli.errors import CheckpointError
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.reporter import SilentReporter
from vfl_cli.train.baseline import evaluate_baseline_checkpoint, train_baseline
from vfl_cli.train.session import eval_session, infer_session, run_local, train_session

CORRUPT = "corrupt: its bytes do not match the SHA-256 digest saved with them"


def flip(path: Path) -> None:
    """What the probe did: invert 64 bytes in the middle of the file, in place (a hard link sees it too)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 - 32
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(data)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def spec_for(tmp_path: Path, **data: Any) -> dict[str, Any]:
    """The resume tests' job (15 steps per epoch, 2 epochs, a checkpoint every 4 steps)."""
    spec = job_dict(tmp_path, checkpoint_every=EVERY)
    spec["data"].update(data)
    write_planted_data(Path(spec["data"]["dir"]))
    return spec


def uninterrupted_auc(spec: dict[str, Any], tmp_path: Path) -> float:
    job = parse_job({**spec, "train": {**spec["train"], "run_dir": str(tmp_path / "reference")}})
    run_local(job, train_session)
    return final_auc(job.train.run_dir)


# ------------------------------------------------------------------------------------------- the store


def test_every_checkpoint_ends_with_the_digest_of_its_bytes_and_stays_a_torch_file(tmp_path: Path) -> None:
    store = store_at(tmp_path, [4])
    data = (store.directory / file_name(4)).read_bytes()
    content, tag, digest = data.rpartition(b"\nvfl-sha256:")[0], b"\nvfl-sha256:", data[-65:-1]
    assert data == content + tag + digest + b"\n"
    assert digest.decode() == hashlib.sha256(content).hexdigest()
    plain = torch.load(store.directory / file_name(4), weights_only=True)  # torch's zip reader ignores the trailer
    assert plain["step"] == 4 and torch.equal(plain["state"]["bottom"]["w"], torch.full((2, 2), 4.0))


def test_flipped_bytes_are_refused_on_every_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = store_at(tmp_path, [4, 8])
    store.select(RUN, 8, 0, 0.7)
    path = store.directory / file_name(8)
    flip(path)  # selected.pt is the same file (a hard link)
    with caplog.at_level(logging.WARNING):
        assert store.steps(RUN) == (4,)
    assert warnings(caplog) == [f"{path}: {CORRUPT}; not counted as held"]
    for read, name in ((store.newest, path), (lambda: store.load(RUN, 8), path),
                       (store.load_selected, store.directory / SELECTED_FILE)):
        with pytest.raises(CheckpointError) as caught:
            read()
        assert str(caught.value) == f"{name}: {CORRUPT}"


def test_a_checkpoint_without_its_digest_is_refused(tmp_path: Path) -> None:
    """A file of this format always carries one: a missing or damaged trailer is not taken for an old file."""
    store = store_at(tmp_path, [4, 8])
    path = store.directory / file_name(8)
    path.write_bytes(path.read_bytes().rpartition(b"\nvfl-sha256:")[0])
    assert store.steps(RUN) == (4,)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: corrupt: its SHA-256 digest is missing")):
        store.load(RUN, 8)


def test_a_checkpoint_from_before_the_digest_loads_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run trained before this change resumes and evaluates as it did: nothing to check, and it says so."""
    store = store_at(tmp_path, [4])
    path = store.directory / file_name(8)
    torch.save({"format": 2, "job": JOB, "run_id": RUN, "step": 8, "epoch": 0, "epoch_step": 8,
                "state": state(8)}, path)  # what vfl wrote before checkpoints carried a digest
    with caplog.at_level(logging.WARNING):
        assert store.steps(RUN) == (4, 8)
        assert store.load(RUN, 8)["step"] == 8
    assert warnings(caplog) == [f"{path}: written before checkpoints carried a digest; loaded unchecked"]


# ------------------------------------------------------------------------------ resume, eval and infer


@pytest.mark.parametrize("corrupted", ["leader", "follower"])
def test_a_corrupt_newest_checkpoint_is_refused_and_the_run_resumes_from_the_older_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, corrupted: str
) -> None:
    spec = spec_for(tmp_path)
    job = parse_job(spec)
    with pytest.raises(Crash):  # batch 25: step 21 of 30, after the checkpoints at 16 and 20
        run_local(job, train_session, {"follower": CrashAfter(25)})
    assert held(job, "leader") == held(job, "follower") == [16, 20]
    newest = job.train.run_dir / corrupted / file_name(20)
    flip(newest)
    with caplog.at_level(logging.WARNING):
        outcome = run_local(job, train_session)["leader"]
    assert warnings(caplog) == [f"{newest}: {CORRUPT}; not counted as held"]
    assert outcome.resumed and outcome.start.step == 16
    assert final_auc(job.train.run_dir) == uninterrupted_auc(spec, tmp_path)  # exactly: same batches, same seed


def test_eval_and_infer_refuse_a_corrupt_selected_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = spec_for(tmp_path, valid_fraction=0.25)
    job = parse_job(spec)
    run_local(job, train_session)
    for role in ("leader", "follower"):  # both, so that whichever side stops first names its file
        flip(job.train.run_dir / role / SELECTED_FILE)
    job_path = write_job(tmp_path, spec)
    for verb, extra in (("eval", ()), ("infer", ("--out", tmp_path / "p.csv"))):
        code, err = run_vfl(monkeypatch, capsys, verb, "--role", "local", "--job", job_path, *extra)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 6 and len(lines) == 1, err
        assert re.fullmatch(rf"error: \S+/(leader|follower)/{SELECTED_FILE}: {CORRUPT}", lines[0]), err
    assert not (tmp_path / "p.csv").exists()
    with pytest.raises(CheckpointError, match=CORRUPT):
        run_local(job, lambda run: infer_session(run, job.train.run_dir, "test", None))


def test_cli_refuses_then_resumes_past_a_corrupt_checkpoint(tmp_path: Path) -> None:
    """As the user sees it, in real subprocesses: eval stops with one line (exit 6); train says one warning
    line naming the file, resumes from the older checkpoint and prints the uninterrupted run's AUC."""
    spec = spec_for(tmp_path)
    job_path = str(write_job(tmp_path, spec))

    def vfl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*VFL, *args, "--role", "local", "--job", job_path], capture_output=True, text=True,
                              timeout=300, env={**environment(), "PATH": "/usr/bin:/bin"})

    trained = vfl("train")
    assert trained.returncode == 0, trained.stderr
    auc = re.search(r"local test: AUC (\d\.\d+)", trained.stdout).group(1)
    newest = tmp_path / "run" / "leader" / file_name(30)
    flip(newest)
    refused = vfl("eval")
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 6 and len(lines) == 1, refused.stderr
    # One process, two parties: the first to stop is reported, the leader naming its file or the follower
    # saying the leader has none it can use.
    assert lines[0] in (f"error: {newest}: {CORRUPT}", "error: the leader has no usable checkpoint (missing, or "
                        "refused there: its own error names the file): run `vfl train` on every party first")
    resumed = vfl("train")
    assert resumed.returncode == 0, resumed.stderr
    warned = [line for line in resumed.stderr.splitlines() if "WARNING" in line]
    assert warned == [f"WARNING vfl_cli.checkpoint: {newest}: {CORRUPT}; not counted as held"], resumed.stderr
    assert "at step 28 (epoch 1 step 13)" in resumed.stderr and f"local test: AUC {auc}" in resumed.stdout


# ------------------------------------------------------------------------------------------ baselines


def baseline_job(tmp_path: Path, **data: Any) -> JobSpec:
    return parse_job(spec_for(tmp_path, **data))


def test_a_baseline_resumes_past_a_corrupt_checkpoint_and_eval_refuses_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job = baseline_job(tmp_path)
    first = train_baseline(job, "central", SilentReporter())
    newest = job.train.run_dir / "central" / file_name(30)
    flip(newest)
    with pytest.raises(CheckpointError, match=re.escape(f"{newest}: {CORRUPT}")):
        evaluate_baseline_checkpoint(job, "central", job.train.run_dir, "test")
    with caplog.at_level(logging.WARNING):
        again = train_baseline(job, "central", SilentReporter())
    assert warnings(caplog) == [f"{newest}: {CORRUPT}; not counted as held"]
    assert again.start.step == 28 and [e for e, _, _ in again.epochs] == [1]
    assert again.epochs[-1][2].score == first.epochs[-1][2].score


def test_a_baseline_refuses_a_corrupt_selected_checkpoint(tmp_path: Path) -> None:
    job = baseline_job(tmp_path, valid_fraction=0.25)
    train_baseline(job, "leader-only", SilentReporter())
    selected = job.train.run_dir / "leader-only" / SELECTED_FILE
    flip(selected)
    with pytest.raises(CheckpointError, match=re.escape(f"{selected}: {CORRUPT}")):
        evaluate_baseline_checkpoint(job, "leader-only", job.train.run_dir, "test")


def test_eval_session_reads_the_digest_too(tmp_path: Path) -> None:
    """The in-process path `vfl eval --role local` takes, without validation: the newest checkpoint."""
    job = parse_job(spec_for(tmp_path))
    run_local(job, train_session)
    for role in ("leader", "follower"):
        flip(job.train.run_dir / role / file_name(30))
    with pytest.raises(CheckpointError, match=CORRUPT):
        run_local(job, lambda run: eval_session(run, job.train.run_dir, "test"))
