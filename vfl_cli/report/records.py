"""A training run's metrics.jsonl read back into typed records (see `vfl_cli.report` for what the file holds).

The file is appended to by every `vfl train` on the run dir, so it may hold several runs (`--restart`) and,
within one run, records repeated by a resume (it replays steps after the last checkpoint). The report keeps
the run of the newest start/resume record, and within it the last record per global step and per epoch.
Unknown events and missing optional keys are ignored; a missing, empty or unparseable file is one DataError.

The run's task is read from its records: their `"metric"` names the primary metric (auc, accuracy or rmse;
absent, as in files written before tasks existed, it is auc), and the task's other metrics (`vfl_cli.task`)
are read by name: `valid_<name>` / `test_<name>` in epoch records, `<name>` in the final_test record. Only the
metrics some record holds are reported, so an old binary file without KS shows no empty KS column.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfl_cli.errors import DataError
from vfl_cli.metric_names import TASK_METRICS, TITLES

BASELINES = ("central", "leader-only")
DEFAULT_METRIC = "auc"  # records without "metric": binary runs written before tasks existed


Scores = dict[str, float | None]  # metric name -> value; None where absent, null or not finite


@dataclass(frozen=True)
class StepPoint:
    global_step: int
    wide_loss: float | None  # the task's loss on the batch
    deep_loss: float | None  # the task's loss + the L2 term


@dataclass(frozen=True)
class EpochRow:
    epoch: int
    samples_per_s: float | None
    seconds: float | None
    valid: Scores = field(default_factory=dict)  # every metric found as valid_<name>
    test: Scores = field(default_factory=dict)  # every metric found as test_<name>


@dataclass(frozen=True)
class Selected:
    """The epoch chosen by the validation score of the primary metric (a `selected` record)."""

    epoch: int
    step: int | None
    valid_score: float | None


@dataclass(frozen=True)
class FinalTest:
    """The test split scored once, at the end (a `final_test` record)."""

    epoch: int | None
    scores: Scores
    rows: int | None


@dataclass(frozen=True)
class RunMetrics:
    run_id: str | None  # of the newest start/resume record; None for a file without one
    resumes: int  # resume records of that run
    steps: list[StepPoint]  # by global step
    epochs: list[EpochRow]  # by epoch
    selected: Selected | None
    final_test: FinalTest | None
    metric: str = DEFAULT_METRIC  # the primary metric: auc, accuracy or rmse
    metrics: tuple[str, ...] = (DEFAULT_METRIC,)  # the metrics reported, primary first, in the task's order

    @property
    def title(self) -> str:
        """The primary metric's title, e.g. "AUC", "accuracy", "RMSE"."""
        return TITLES.get(self.metric, self.metric)

    def final(self) -> tuple[str, Scores]:
        """(where the figures come from, test scores by metric): final_test, else the selected, else the last
        epoch's test figures."""
        if self.final_test is not None:
            rows = f", {self.final_test.rows:,} rows" if self.final_test.rows is not None else ""
            return f"final test (epoch {self.final_test.epoch}{rows})", self.final_test.scores
        by_epoch = {e.epoch: e for e in self.epochs}
        chosen = by_epoch.get(self.selected.epoch) if self.selected else None
        if chosen is not None:
            return f"selected epoch {chosen.epoch}", chosen.test
        if self.epochs:
            last = self.epochs[-1]
            return f"last epoch {last.epoch}", last.test
        return "no epoch finished", {}

    def final_score(self) -> float | None:
        """The primary metric's final test value (see `final`), None without one."""
        return self.final()[1].get(self.metric)


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


def _scores(record: dict[str, Any], prefix: str, where: str) -> Scores:
    """Every known metric the record holds as `<prefix><name>` (unknown keys are ignored)."""
    return {name: _number(record, prefix + name, where) for name in TITLES if prefix + name in record}


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


def _primary(records: list[dict[str, Any]], source: Path) -> str:
    """The run's primary metric: the "metric" of its last record naming one (absent: auc)."""
    named = [(r["_line"], r["metric"]) for r in records if "metric" in r]
    if not named:
        return DEFAULT_METRIC
    line, metric = named[-1]
    if not isinstance(metric, str) or metric not in TITLES:
        raise DataError(f"{source}:{line}: metric is {metric!r}, expected one of {', '.join(TITLES)}")
    return metric


def task_metrics(primary: str) -> tuple[str, ...]:
    """Every metric of the task whose primary metric is `primary`, primary first."""
    return next((names for names in TASK_METRICS.values() if names[0] == primary), (primary,))


def _reported(metric: str, epochs: list[EpochRow], final: FinalTest | None) -> tuple[str, ...]:
    """The primary metric, then the task's other metrics that some record holds, in the task's order."""
    task = task_metrics(metric)
    found = {name for e in epochs for name in (*e.valid, *e.test)} | set(final.scores if final else ())
    return (metric, *(name for name in task[1:] if name in found))


def parse_run(records: list[dict[str, Any]], source: Path) -> RunMetrics:
    run_id, mine = _newest_run(records)
    metric = _primary(mine, source)
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
            epochs[epoch] = EpochRow(epoch, _number(r, "train_samples_per_s", where), _number(r, "seconds", where),
                                     _scores(r, "valid_", where), _scores(r, "test_", where))
        elif event == "selected":
            step_value = r.get("step")
            selected = Selected(_integer(r, "epoch", where), step_value if isinstance(step_value, int) else None,
                                _number(r, f"valid_{metric}", where))
        elif event == "final_test":
            epoch_value, rows = r.get("epoch"), r.get("rows")
            final_test = FinalTest(epoch_value if isinstance(epoch_value, int) else None, _scores(r, "", where),
                                   rows if isinstance(rows, int) else None)
    if not steps and not epochs:
        raise DataError(f"{source}: no step or epoch records yet; nothing to report")
    by_epoch = [epochs[k] for k in sorted(epochs)]
    return RunMetrics(run_id, resumes, [steps[k] for k in sorted(steps)], by_epoch, selected, final_test, metric,
                      _reported(metric, by_epoch, final_test))


def read_run(path: Path) -> RunMetrics:
    return parse_run(read_records(path), path)


def baseline_score(run_dir: Path, kind: str, metric: str = DEFAULT_METRIC) -> str:
    """A baseline's test `metric` (its final test with validation, else its last epoch's), or why there is none."""
    path = run_dir / kind / "metrics.jsonl"
    if not path.exists():
        return "not run"
    try:
        run = read_run(path)
    except DataError:
        return "not run"  # an empty or stepless file: started, never finished an epoch
    if run.metric != metric:
        return f"scored by {run.title}"  # a baseline of another task, left from an earlier job in this run dir
    if run.final_test is not None and run.final_test.scores.get(metric) is not None:
        return f"{run.final_test.scores[metric]:.6f}"
    values = [value for e in run.epochs if (value := e.test.get(metric)) is not None]
    return f"{values[-1]:.6f}" if values else "not run"

