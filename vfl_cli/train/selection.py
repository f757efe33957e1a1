"""Model selection's rule, one for the leader of a split run and for the baselines: after each epoch's
validation, the best epoch so far by the task's primary metric (ties by its tiebreak), kept as the selected
checkpoint, and whether `train.early_stopping` ends training. (How the leader tells the followers is the
loop's `select`.)"""

from __future__ import annotations

from dataclasses import dataclass

from vfl_cli.checkpoint import CheckpointStore
from vfl_cli.job import JobSpec
from vfl_cli.task import Task
from vfl_cli.train.batches import Position


@dataclass(frozen=True)
class Selection:
    step: int  # the best epoch's checkpoint so far
    epoch: int
    valid_score: float  # its validation score (the task's primary metric)
    stop: bool  # early stopping ends training here


def choose(store: CheckpointStore, run_id: str, job: JobSpec, task: Task, epoch: int, step: int,
           scores: dict[str, float]) -> Selection:
    """After epoch `epoch` (checkpointed at `step`, validation `scores`): the best epoch so far by the task's
    primary metric (ties by its tiebreak metric), kept as the selected checkpoint when it is this one, and
    whether `train.early_stopping` ends training. One rule for the leader of a split run and for the baselines."""
    best = store.selected(run_id)
    value, tie = scores[task.primary.name], scores[task.tiebreak.name]
    if best is None or task.better(value, best["valid_score"], tie, best.get("valid_tiebreak")):  # NaN never wins
        store.select(run_id, step, epoch, value, tie)
        best = {"step": step, "epoch": epoch, "valid_score": value}
    patience = job.train.early_stopping
    stop = patience is not None and epoch - best["epoch"] >= patience.patience
    return Selection(best["step"], best["epoch"], best["valid_score"], stop)


def stopped_before(store: CheckpointStore, job: JobSpec, run_id: str, start: Position) -> bool:
    """Whether a resumed run had already stopped early, read from the store's own selection record (so both
    parties, and a baseline, decide alike)."""
    patience, held = job.train.early_stopping, store.selected(run_id)
    if patience is None or held is None or start.epoch_step != 0 or start.epoch == 0:
        return False
    return start.epoch - 1 - held["epoch"] >= patience.patience
