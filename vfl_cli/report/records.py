"""A training run's metrics.jsonl read back into typed records (see `vfl_cli.report` for what the file holds).

The file is appended to by every `vfl train` on the run dir, so it may hold several runs (`--restart`) and,
within one run, records repeated by a resume (it replays steps after the last checkpoint). The report keeps
the run of the newest start/resume record, and within it the last record per global step and per epoch.
Unknown events and missing optional keys are ignored; a missing, empty or unparseable file is one DataError.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfl_cli.errors import DataError

BASELINES = ("central", "leader-only")


@dataclass(frozen=True)
class StepPoint:
    global_step: int
    wide_loss: float | None  # log loss of the batch
    deep_loss: float | None  # log loss + the L2 term


@dataclass(frozen=True)
class EpochRow:
    epoch: int
    samples_per_s: float | None
    seconds: float | None
    valid_auc: float | None
    valid_log_loss: float | None
    test_auc: float | None
    test_log_loss: float | None


@dataclass(frozen=True)
class Selected:
    """The epoch chosen by validation AUC (a `selected` record)."""

    epoch: int
    step: int | None
    valid_auc: float | None


@dataclass(frozen=True)
class FinalTest:
    """The test split scored once, at the end (a `final_test` record)."""

    epoch: int | None
    auc: float | None
    log_loss: float | None
    rows: int | None


@dataclass(frozen=True)
class RunMetrics:
    run_id: str | None  # of the newest start/resume record; None for a file without one
    resumes: int  # resume records of that run
    steps: list[StepPoint]  # by global step
    epochs: list[EpochRow]  # by epoch
    selected: Selected | None
    final_test: FinalTest | None

    def final(self) -> tuple[str, float | None, float | None]:
        """(where the figures come from, test AUC, test log loss): final_test, else the selected, else the last
        epoch's test figures."""
        if self.final_test is not None:
            rows = f", {self.final_test.rows:,} rows" if self.final_test.rows is not None else ""
            return f"final test (epoch {self.final_test.epoch}{rows})", self.final_test.auc, self.final_test.log_loss
        by_epoch = {e.epoch: e for e in self.epochs}
        chosen = by_epoch.get(self.selected.epoch) if self.selected else None
        if chosen is not None:
            return f"selected epoch {chosen.epoch}", chosen.test_auc, chosen.test_log_loss
        if self.epochs:
            last = self.epochs[-1]
            return f"last epoch {last.epoch}", last.test_auc, last.test_log_loss
        return "no epoch finished", None, None


def _number(record: dict[str, Any], key: str, where: str) -> float | None:
    """An optional number; None when absent, null or not finite (an AUC is NaN on a one-class split)."""
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{where}: {key} is {value!r}, expected a number")
    return float(value) if math.isfinite(value) else None


def _integer(record: dict[str, Any], key: str, where: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: {record.get('event')} record without an integer {key}")
    return value


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every line of a metrics.jsonl as a dict; a missing, empty or unparseable file is a DataError."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no metrics here; has `vfl train` run with this run dir?") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from exc
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: not a JSON record ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("event"), str):
            raise DataError(f"{path}:{number}: not a metrics record (no \"event\")")
        records.append(record | {"_line": number})
    if not records:
        raise DataError(f"{path}: empty; no metrics recorded yet")
    return records


def _newest_run(records: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """The run id of the newest start/resume record, and the records written under that run id."""
    current: str | None = None
    tagged = []
    for record in records:
        if record["event"] in ("start", "resume"):
            current = record.get("run_id")
        tagged.append((current, record))
    return current, [record for run_id, record in tagged if run_id == current]


def parse_run(records: list[dict[str, Any]], source: Path) -> RunMetrics:
    run_id, mine = _newest_run(records)
    steps: dict[int, StepPoint] = {}
    epochs: dict[int, EpochRow] = {}
    selected, final_test, resumes = None, None, 0
    for r in mine:  # later records replace earlier ones: a resume replays the steps after its checkpoint
        where, event = f"{source}:{r['_line']}", r["event"]
        if event == "resume":
            resumes += 1
        elif event == "step":
            step = _integer(r, "global_step", where)
            steps[step] = StepPoint(step, _number(r, "wide_loss", where), _number(r, "deep_loss", where))
        elif event == "epoch":
            epoch = _integer(r, "epoch", where)
            epochs[epoch] = EpochRow(
                epoch, _number(r, "train_samples_per_s", where), _number(r, "seconds", where),
                _number(r, "valid_auc", where), _number(r, "valid_log_loss", where),
                _number(r, "test_auc", where), _number(r, "test_log_loss", where),
            )
        elif event == "selected":
            step_value = r.get("step")
            selected = Selected(_integer(r, "epoch", where), step_value if isinstance(step_value, int) else None,
                                _number(r, "valid_auc", where))
        elif event == "final_test":
            epoch_value, rows = r.get("epoch"), r.get("rows")
            final_test = FinalTest(epoch_value if isinstance(epoch_value, int) else None, _number(r, "auc", where),
                                   _number(r, "log_loss", where), rows if isinstance(rows, int) else None)
    if not steps and not epochs:
        raise DataError(f"{source}: no step or epoch records yet; nothing to report")
    return RunMetrics(run_id, resumes, [steps[k] for k in sorted(steps)], [epochs[k] for k in sorted(epochs)],
                      selected, final_test)


def read_run(path: Path) -> RunMetrics:
    return parse_run(read_records(path), path)


def baseline_auc(run_dir: Path, kind: str) -> str:
    """A baseline's test AUC (its final test with validation, else its last epoch's), or why there is none."""
    path = run_dir / kind / "metrics.jsonl"
    if not path.exists():
        return "not run"
    try:
        run = read_run(path)
    except DataError:
        return "not run"  # an empty or stepless file: started, never finished an epoch
    if run.final_test is not None and run.final_test.auc is not None:
        return f"{run.final_test.auc:.6f}"
    aucs = [e.test_auc for e in run.epochs if e.test_auc is not None]
    return f"{aucs[-1]:.6f}" if aucs else "not run"
