"""`vfl report`: metrics.jsonl written by hand (resumed, restarted, with and without validation; binary files from
before tasks, multiclass and regression runs) and from a real tiny run, reported through the CLI in-process; the
PNGs checked by their header, the page by its text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from tests.conftest import REPO, run_vfl, write_job
from vfl_cli.job import JobSpec
from vfl_cli.metric_names import TASK_METRICS, TITLES
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
    assert "AUC <b>0.734500</b>, log loss <b>0.543200</b>" in html and "<th>last test AUC</th>" in html
    assert "<th>valid AUC</th><th>valid log loss</th><th></th>" in html  # no test columns: validation only
    assert "KS" not in html  # a file from before tasks has no KS: no empty KS column


def test_steps_and_epochs_keep_the_last_record(tmp_path: Path) -> None:
    run = read_run(write_metrics(tmp_path, validated_run()))
    assert [s.global_step for s in run.steps] == [2, 4, 6, 8, 10, 12]
    assert run.steps[2].wide_loss == 0.55
    assert [e.epoch for e in run.epochs] == [0, 1, 2] and run.epochs[1].valid == {"auc": 0.7123, "log_loss": 0.58}
    assert run.selected is not None and run.selected.epoch == 1 and run.selected.valid_score == 0.7123
    assert run.final() == ("final test (epoch 1, 1,583 rows)", {"auc": 0.7345, "log_loss": 0.5432})
    assert (run.metric, run.metrics, run.title) == ("auc", ("auc", "log_loss"), "AUC")  # no "metric": binary


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


def multiclass_run() -> list[dict[str, Any]]:
    """A multiclass run as the loop writes it: every metric per epoch on validation, accuracy selects."""
    def scored(number: int, accuracy: float, f1: float, loss: float) -> dict[str, Any]:
        return epoch(number, metric="accuracy", valid_accuracy=accuracy, valid_macro_f1=f1, valid_log_loss=loss)

    return [
        {"event": "start", "run_id": "m1"},
        step(1, 1.09), step(2, 0.95), scored(0, 0.6543, 0.6012, 0.91),
        {"event": "selected", "epoch": 0, "step": 2, "metric": "accuracy", "valid_accuracy": 0.6543},
        step(3, 0.81, 1), step(4, 0.77, 1), scored(1, 0.7321, 0.7004, 0.74),
        {"event": "selected", "epoch": 1, "step": 4, "metric": "accuracy", "valid_accuracy": 0.7321},
        {"event": "final_test", "epoch": 1, "step": 4, "metric": "accuracy", "accuracy": 0.8012, "macro_f1": 0.7777,
         "log_loss": 0.6111, "rows": 240},
    ]


def test_multiclass_run_reports_accuracy_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    write_metrics(run_dir, multiclass_run())
    write_metrics(run_dir, [{"event": "start", "run_id": "c"}, step(1, 0.9),
                            epoch(0, metric="accuracy", test_accuracy=0.7001, test_macro_f1=0.6, test_log_loss=0.8),
                            {"event": "final_test", "epoch": 0, "metric": "accuracy", "accuracy": 0.7555,
                             "macro_f1": 0.7, "log_loss": 0.7, "rows": 240}], role="central")
    run = read_run(run_dir / "leader" / "metrics.jsonl")
    assert (run.metric, run.metrics, run.title) == ("accuracy", ("accuracy", "macro_f1", "log_loss"), "accuracy")
    assert run.selected is not None and run.selected.valid_score == 0.7321
    assert run.final_score() == 0.8012
    html = report(monkeypatch, capsys, "--run", run_dir)
    assert "accuracy <b>0.801200</b>, macro-F1 <b>0.777700</b>, log loss <b>0.611100</b>" in html
    assert "final test (epoch 1, 240 rows)" in html
    assert "<th>valid accuracy</th><th>valid macro-F1</th><th>valid log loss</th><th></th>" in html
    assert "<tr class=sel><td class=l>1</td><td>1,001</td><td>2.5</td><td>0.732100</td><td>0.700400</td>" in html
    assert "<th>last test accuracy</th>" in html
    assert "<td class=l>vertical federated (this run)</td><td>0.801200</td>" in html
    assert "<td class=l>central</td><td>0.755500</td>" in html  # its final test, not its last epoch's
    assert "<td class=l>leader-only</td><td>not run</td>" in html
    assert "AUC" not in html and "KS" not in html


def test_regression_run_without_validation_reports_rmse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    write_metrics(run_dir, [
        {"event": "start", "run_id": "g1"},
        step(1, 1.2), epoch(0, metric="rmse", test_rmse=3.25, test_mae=2.5, test_r2=0.41),
        step(2, 0.9, 1), epoch(1, metric="rmse", test_rmse=2.75, test_mae=2.125, test_r2=float("nan")),
    ])
    write_metrics(run_dir, [{"event": "start", "run_id": "o"}, step(1, 0.6), epoch(0, test_auc=0.7)],
                  role="leader-only")  # left from a binary job in the same run dir
    run = read_run(run_dir / "leader" / "metrics.jsonl")
    assert (run.metric, run.metrics) == ("rmse", ("rmse", "mae", "r2"))
    assert run.final() == ("last epoch 1", {"rmse": 2.75, "mae": 2.125, "r2": None})
    html = report(monkeypatch, capsys, "--run", run_dir)
    assert "RMSE <b>2.750000</b>, MAE <b>2.125000</b>, R² <b>-</b>" in html and "(last epoch 1)" in html
    assert "<th>test RMSE</th><th>test MAE</th><th>test R²</th><th></th>" in html and "valid" not in html
    assert "<th>last test RMSE</th>" in html
    assert "<td class=l>leader-only</td><td>scored by AUC</td>" in html
    assert "<td class=l>central</td><td>not run</td>" in html


def test_an_unknown_metric_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    write_metrics(tmp_path, [step(1, 0.5), epoch(0, metric="bleu", test_bleu=0.3)])
    code, err = run_vfl(monkeypatch, capsys, "report", "--run", tmp_path)
    assert code == 3 and "metrics.jsonl:2: metric is 'bleu'" in err


def test_the_metric_names_are_the_tasks() -> None:
    """The report reads the names the tasks compute (vfl_cli.metric_names, which imports no torch)."""
    from vfl_cli.task import METRICS, Task

    assert {kind: tuple(m.name for m in metrics) for kind, metrics in METRICS.items()} == TASK_METRICS
    assert Task("regression").primary.title == TITLES["rmse"] and not Task("regression").primary.higher_is_better


def test_the_report_imports_no_torch() -> None:
    code = "import sys, vfl_cli.report, vfl_cli.commands.report; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


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
    last_auc = outcome.epochs[-1][2].score if outcome.epochs[-1][2] else None
    job = write_job(tmp_path, planted_job.model_dump(mode="json"))
    html = report(monkeypatch, capsys, "--job", job)  # --run defaults to the job's train.run_dir
    assert (planted_job.train.run_dir / "report" / "report.html").exists()
    assert last_auc is not None and f"{last_auc:.6f}" in html
    assert "leader: 20 fields" in html and "follower: 19 fields" in html
    assert "emb_dim 4, deep_layers [16, 8]" in html and "2 epochs, batch size 64, fp32" in html
    assert "<td>none</td>" in html  # no privacy defences
    assert "train 960, test 240" in html  # rows per split, from each party's meta.json
    assert "<td>binary</td>" in html and "<th>test AUC</th><th>test log loss</th><th>test KS</th>" in html
