"""`vfl report`: metrics.jsonl written by hand (resumed, restarted, with and without validation) and from a real
tiny run, reported through the CLI in-process; the PNGs checked by their header, the page by its text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest

from tests.conftest import run_vfl, write_job
from vfl_cli.job import JobSpec
from vfl_cli.report import PLOTS, read_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir: Path, records: list[dict[str, Any]], role: str = "leader") -> Path:
    path = run_dir / role / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"time": 1.0, "role": role, **r}) + "\n" for r in records))
    return path


def step(global_step: int, loss: float, epoch: int = 0) -> dict[str, Any]:
    return {"event": "step", "epoch": epoch, "step": global_step, "global_step": global_step,
            "wide_loss": loss, "deep_loss": loss + 0.001}


def epoch(number: int, **figures: float) -> dict[str, Any]:
    return {"event": "epoch", "epoch": number, "train_samples_per_s": 1000.0 + number, "seconds": 2.5, **figures}


def validated_run() -> list[dict[str, Any]]:
    """Three epochs with validation, interrupted after epoch 1 and resumed from a checkpoint at step 4, which
    replays steps 5-6 and epoch 1 with other figures; then a selected and a final_test record."""
    return [
        {"event": "start", "run_id": "r1"},
        step(2, 0.69), step(4, 0.60), epoch(0, valid_auc=0.61, valid_log_loss=0.66),
        step(6, 0.99, 1), epoch(1, valid_auc=0.1111, valid_log_loss=0.9),  # replaced by the resume below
        {"event": "resume", "run_id": "r1", "step": 4, "epoch": 1, "epoch_step": 0},
        step(6, 0.55, 1), step(8, 0.52, 1), epoch(1, valid_auc=0.7123, valid_log_loss=0.58),
        {"event": "future_event", "whatever": [1, 2]},  # unknown events are ignored
        step(10, 0.50, 2), step(12, 0.49, 2), epoch(2, valid_auc=0.7011, valid_log_loss=0.57),
        {"event": "selected", "epoch": 1, "step": 8, "valid_auc": 0.7123},
        {"event": "final_test", "epoch": 1, "auc": 0.7345, "log_loss": 0.5432, "rows": 1583},
    ]


def plain_run() -> list[dict[str, Any]]:
    """Today's records: test figures per epoch, no validation, no selection, a NaN AUC (one-class split)."""
    return [
        {"event": "start", "run_id": "r2"},
        step(1, 0.7), step(2, 0.65), epoch(0, test_auc=float("nan"), test_log_loss=0.64),
        step(3, 0.6, 1), step(4, 0.58, 1), epoch(1, test_auc=0.6789, test_log_loss=0.61),
    ]


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name}: not a PNG"
    assert data[12:16] == b"IHDR", f"{path.name}: no IHDR chunk first"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 300 <= width <= 4000 and 300 <= height <= 4000, f"{path.name}: {width}x{height}"
    assert 5_000 <= len(data) <= 2_000_000, f"{path.name}: {len(data)} bytes"


class KeepOutput:
    """capsys for `run_vfl`, which reads stderr only: keeps stdout too (where `vfl report` prints the page)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys, self.out = capsys, ""

    def readouterr(self) -> Any:
        captured = self.capsys.readouterr()
        self.out = captured.out
        return captured


def report(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: object) -> str:
    """Run `vfl report <args>`; check the three PNGs; return the page's text."""
    keep = KeepOutput(capsys)
    code, err = run_vfl(monkeypatch, cast(pytest.CaptureFixture[str], keep), "report", *args)
    assert code == 0, err
    page = Path(keep.out.strip())
    assert page.name == "report.html", f"printed {keep.out!r}"
    for name in PLOTS:
        check_png(page.parent / name)
    html = page.read_text()
    for name in PLOTS:
        assert f'<img src="{name}"' in html
    assert "<script" not in html and "http://" not in html and "https://" not in html
    return html


def test_resumed_run_with_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    write_metrics(run_dir, validated_run())
    write_metrics(run_dir, [{"event": "start", "run_id": "r1"}, epoch(0), epoch(1)], role="follower")
    html = report(monkeypatch, capsys, "--run", run_dir)
    assert (run_dir / "report" / "report.html").exists()  # the default --out
    for auc in ("0.610000", "0.712300", "0.701100"):
        assert auc in html
    assert "0.111100" not in html, "the epoch record replaced by the resume is still shown"
    assert "<tr class=sel><td class=l>1</td>" in html and ">selected<" in html
    assert "0.734500" in html and "0.543200" in html and "final test (epoch 1, 1,583 rows)" in html
    assert "resumed 1 time" in html
    assert html.count("not run") == 2  # central and leader-only


def test_steps_and_epochs_keep_the_last_record(tmp_path: Path) -> None:
    run = read_run(write_metrics(tmp_path, validated_run()))
    assert [s.global_step for s in run.steps] == [2, 4, 6, 8, 10, 12]
    assert run.steps[2].wide_loss == 0.55
    assert [e.epoch for e in run.epochs] == [0, 1, 2] and run.epochs[1].valid_auc == 0.7123
    assert run.selected is not None and run.selected.epoch == 1
    assert run.final() == ("final test (epoch 1, 1,583 rows)", 0.7345, 0.5432)


def test_restart_reports_only_the_newest_run(tmp_path: Path) -> None:
    old = [{"event": "start", "run_id": "old"}, step(1, 0.9), step(2, 0.8), step(3, 0.7), epoch(0, test_auc=0.5)]
    run = read_run(write_metrics(tmp_path, old + plain_run()))
    assert run.run_id == "r2" and [s.global_step for s in run.steps] == [1, 2, 3, 4]
    assert run.steps[0].wide_loss == 0.7


def test_plain_run_without_validation_and_a_baseline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    write_metrics(run_dir, plain_run())
    write_metrics(run_dir, [{"event": "start", "run_id": "c"}, step(1, 0.6), epoch(0, test_auc=0.7777)],
                  role="central")
    html = report(monkeypatch, capsys, "--run", run_dir, "--out", tmp_path / "out")
    assert (tmp_path / "out" / "report.html").exists()
    assert "0.678900" in html and "(last epoch 1)" in html
    assert "class=sel" not in html
    assert "<td class=l>central</td><td>0.777700</td>" in html
    assert "<td class=l>leader-only</td><td>not run</td>" in html


def test_strings_are_escaped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "<b>run&"
    write_metrics(run_dir, [{"event": "start", "run_id": "<script>x</script>"}, *plain_run()[1:]])
    html = report(monkeypatch, capsys, "--run", run_dir)
    assert "<b>run" not in html and "&lt;b&gt;run&amp;" in html
    assert "&lt;script&gt;" in html


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no metrics here"),
        ("", "empty"),
        ('{"event": "start", "run_id": "r"}\n{"event": "step", "glob', "metrics.jsonl:2: not a JSON record"),
        ('[1, 2]\n', "metrics.jsonl:1: not a metrics record"),
        ('{"event": "step", "wide_loss": 0.5}\n', "without an integer global_step"),
        ('{"event": "epoch", "epoch": 0, "test_auc": "high"}\n', "test_auc is 'high'"),
        ('{"event": "start", "run_id": "r"}\n', "no step or epoch records"),
    ],
    ids=["missing", "empty", "truncated", "not-an-object", "step-without-global-step", "auc-not-a-number",
         "no-training-records"],
)
def test_bad_metrics_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str], content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / "leader").mkdir()
        (tmp_path / "leader" / "metrics.jsonl").write_text(content)
    code, err = run_vfl(monkeypatch, capsys, "report", "--run", tmp_path)
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "report" / "report.html").exists()


def test_run_or_job_is_required(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_vfl(monkeypatch, capsys, "report")
    assert code == 2 and err.startswith("error: ") and "--run" in err


def test_report_of_a_real_run(tmp_path: Path, planted_job: JobSpec, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    from vfl_cli.train.session import run_local, train_session

    outcome = run_local(planted_job, train_session)["leader"]
    last_auc = outcome.epochs[-1][2].auc if outcome.epochs[-1][2] else None
    job = write_job(tmp_path, planted_job.model_dump(mode="json"))
    html = report(monkeypatch, capsys, "--job", job)  # --run defaults to the job's train.run_dir
    assert (planted_job.train.run_dir / "report" / "report.html").exists()
    assert last_auc is not None and f"{last_auc:.6f}" in html
    assert "leader: 20 fields" in html and "follower: 19 fields" in html
    assert "emb_dim 4, deep_layers [16, 8]" in html and "2 epochs, batch size 64, fp32" in html
    assert "<td>none</td>" in html  # no privacy defences
    assert "train 960, test 240" in html  # rows per split, from each party's meta.json
