"""The `vfl` command as a user runs it: real subprocesses, one-line errors, exit codes, local train/eval/infer."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import job_dict, write_job, write_planted_data

VFL = [sys.executable, "-m", "vfl_cli.app"]


def vfl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VFL, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={"VFL_NO_PROGRESS": "1", "PATH": "/usr/bin:/bin"})


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], done.stderr


def test_help_lists_every_verb() -> None:
    done = vfl("--help")
    assert done.returncode == 0
    for verb in ("prep", "certs", "train", "eval", "infer"):
        assert verb in done.stdout


def test_missing_job_file(tmp_path: Path) -> None:
    assert_one_line_error(vfl("train", "--role", "local", "--job", str(tmp_path / "no.yaml")), 2, "job file not found")


def test_malformed_job(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: [unclosed\n")
    assert_one_line_error(vfl("train", "--role", "local", "--job", str(path)), 2, "malformed YAML")


def test_job_with_unknown_key(tmp_path: Path) -> None:
    spec = job_dict(tmp_path)
    spec["train"]["epochz"] = 3
    assert_one_line_error(vfl("train", "--role", "local", "--job", str(write_job(tmp_path, spec))), 2,
                          "train.epochz: unknown key")


def test_train_without_prepared_data(tmp_path: Path) -> None:
    job = write_job(tmp_path, job_dict(tmp_path))
    assert_one_line_error(vfl("train", "--role", "local", "--job", str(job)), 3, "run `vfl prep criteo` first")


def test_follower_cannot_write_predictions(tmp_path: Path) -> None:
    job = write_job(tmp_path, job_dict(tmp_path))
    done = vfl("infer", "--role", "follower", "--job", str(job), "--out", str(tmp_path / "p.csv"))
    assert_one_line_error(done, 2, "only the leader sees them")


def test_unknown_role_is_a_usage_error(tmp_path: Path) -> None:
    done = vfl("train", "--role", "referee", "--job", str(write_job(tmp_path, job_dict(tmp_path))))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "referee" in done.stderr


def test_local_train_eval_infer(tmp_path: Path) -> None:
    spec = job_dict(tmp_path)
    write_planted_data(Path(spec["data"]["dir"]))
    job = str(write_job(tmp_path, spec))
    trained = vfl("train", "--role", "local", "--job", job)
    assert trained.returncode == 0, trained.stderr
    assert re.search(r"epoch 1 step \d+/\d+ wide_loss: \d\.\d{6} deep_loss: \d\.\d{6}", trained.stderr)
    auc = float(re.search(r"local test: AUC (\d\.\d+)", trained.stdout).group(1))
    assert auc > 0.75
    evaluated = vfl("eval", "--role", "local", "--job", job)
    assert f"AUC {auc:.6f}" in evaluated.stdout
    out = tmp_path / "preds.csv"
    inferred = vfl("infer", "--role", "local", "--job", job, "--out", str(out))
    assert inferred.returncode == 0, inferred.stderr
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 240 and all(0 < float(r["probability"]) < 1 for r in rows)
    again = vfl("train", "--role", "local", "--job", job)
    assert "nothing to train" in again.stdout  # resumed: all epochs were done


@pytest.mark.parametrize("role", ["central", "leader-only"])
def test_baselines_train_and_evaluate(tmp_path: Path, role: str) -> None:
    spec = job_dict(tmp_path, epochs=1)
    write_planted_data(Path(spec["data"]["dir"]))
    job = str(write_job(tmp_path, spec))
    trained = vfl("train", "--role", role, "--job", job)
    assert trained.returncode == 0, trained.stderr
    auc = re.search(rf"{role} test: AUC (\d\.\d+)", trained.stdout).group(1)
    assert f"AUC {auc}" in vfl("eval", "--role", role, "--job", job).stdout
