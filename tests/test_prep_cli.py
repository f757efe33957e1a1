"""`vfl prep` through the real entry point: summaries, and one error line with an exit code per bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_prep.reader import COLUMNS
from data_prep.store import open_party
from tests.conftest import run_vfl

REPO = Path(__file__).resolve().parents[1]


def line(label: object = 1, **values: object) -> str:
    fields = {"label": label, "I1": 1, "C1": "a", **values}
    return "\t".join(str(fields.get(column, "")) for column in COLUMNS) + "\n"




@pytest.fixture
def job(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    config = yaml.safe_load((REPO / "jobs/smoke.yaml").read_text())
    config["data"]["dir"] = str(tmp_path / "data")
    path.write_text(yaml.safe_dump(config))
    return path


def test_prep_both_roles_and_one_role(
    tmp_path: Path, job: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "train.txt"
    code, err = run_vfl(monkeypatch, capsys, "prep", "synth", "--rows", "2000", "--out", raw, "--seed", "1")
    assert code == 0 and "wrote 2,000 synthetic rows" in err
    code, err = run_vfl(monkeypatch, capsys, "prep", "criteo", "--input", raw, "--job", job, "--bench")
    assert code == 0, err
    assert f"prepared 2,000 rows into {tmp_path / 'data'}: train " in err
    assert "label rate 0.2" in err and "rows/s over both passes" in err and "peak RSS" in err
    assert open_party(tmp_path / "data", "leader").meta.threshold == 5  # the job's data.threshold
    assert open_party(tmp_path / "data", "follower").meta.fields[0] == "I8"

    out = tmp_path / "follower-only"
    code, err = run_vfl(
        monkeypatch, capsys, "prep", "criteo", "--input", raw, "--job", job, "--out", out,
        "--role", "follower", "--threshold", "2",
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["follower"]
    assert open_party(out, "follower").meta.threshold == 2
    assert "label rate" not in err


def bad_input_cases(tmp_path: Path) -> list[tuple[str, Path, str]]:
    """(case, input file, expected error line; a trailing ... means "starts with")."""
    good = [line(0), line(1, I1=5, C1="b")]
    files = {
        "missing": None,
        "column-count": good + ["1\t2\t3\n"] + good,
        "dense": good + [line(0, I1="abc")],
        "label": [line(label="x")] + good,
        "label-missing": good + [line(label="")],
        "not-finite": [line(I2="inf")],
        "empty": [],
    }
    expected = {
        "missing": "{path}: input file not found",
        "column-count": "{path}:3: expected 40 tab-separated columns, found 3",
        "dense": "{path}:3: I1 must be a number, found 'abc'",
        "label": "{path}:1: label must be 0 or 1, found 'x'",
        "label-missing": "{path}:3: label must be 0 or 1, it is missing",
        "not-finite": "{path}:1: I2 must be a finite number",
        "empty": "{path}: empty input, no rows",
    }
    cases = []
    for case, rows in files.items():
        path = tmp_path / f"{case}.txt"
        if rows is not None:
            path.write_text("".join(rows))
        cases.append((case, path, expected[case].format(path=path)))
    corrupt = tmp_path / "corrupt.txt.gz"
    corrupt.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    cases.append(("gzip", corrupt, f"{corrupt}: cannot read input (..."))  # the rest is zlib's wording
    return cases


def test_bad_inputs_give_one_error_line_and_exit_3(
    tmp_path: Path, job: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for case, path, message in bad_input_cases(tmp_path):
        code, err = run_vfl(monkeypatch, capsys, "prep", "criteo", "--input", path, "--job", job)
        assert code == 3, case
        assert len(err.strip().splitlines()) == 1, case
        if message.endswith("..."):
            assert err.startswith("error: " + message.removesuffix("...")), case
        else:
            assert err.strip() == "error: " + message, case
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_unwritable_output_dir(
    tmp_path: Path, job: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "train.txt"
    raw.write_text(line(0) + line(1))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "data"
    code, err = run_vfl(monkeypatch, capsys, "prep", "criteo", "--input", raw, "--job", job, "--out", out)
    assert code == 3
    assert err.startswith(f"error: {out}: cannot write the output directory") and err.count("\n") == 1


def test_job_with_unknown_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load((REPO / "jobs/smoke.yaml").read_text())
    config["parties"]["follower"]["fields"].append("C99")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config))
    raw = tmp_path / "train.txt"
    raw.write_text(line(0))
    code, err = run_vfl(monkeypatch, capsys, "prep", "criteo", "--input", raw, "--job", job)
    assert code == 2
    assert err.startswith(f"error: {job}: parties.follower: fields: unknown field(s) C99") and err.count("\n") == 1


def test_subprocess_exit_code_and_single_line(tmp_path: Path, job: Path) -> None:
    raw = tmp_path / "train.txt"
    raw.write_text(line(0) + line(1, I2="1.5.1"))
    env = {**os.environ, "VFL_NO_PROGRESS": "1", "COLUMNS": "1000"}
    done = subprocess.run(
        [sys.executable, "-m", "vfl_cli.app", "prep", "criteo", "--input", str(raw), "--job", str(job)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3
    assert done.stderr.strip().splitlines() == [f"error: {raw}:2: I2 must be a number, found '1.5.1'"]
