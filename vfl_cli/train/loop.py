"""The split-learning loop of one party, written against `Grid` (in-memory or HTTPS, it cannot tell).

    follower f: cut = bottom(x_b); send(leader, embeddings, cut); g = receive(leader, gradients)
                cut.backward(g); step
    leader:     own = bottom(x_b); theirs_f = receive(f, embeddings) for every follower f
                loss = task.loss(top([own, theirs_1, ..., theirs_n]), y_b); backward through the top
                send(f, gradients, d loss / d theirs_f) to every follower at once; backward own bottom; step

The cut tensors are named by the model (`ModelSpec.cut_widths`: (wide, deep) for Wide&Deep, one
`cut` for an mlp bottom); a leader without feature columns has no bottom and no `own`. The task
(`vfl_cli.task`) owns the loss, the predictions and the metrics; the primary metric selects the best epoch.

Every follower computes its cut at the same time in its own process, and the leader waits for them in turn: the
wait is the slowest follower's, not their sum. The leader sends the followers' gradients before it
backpropagates through its own bottom, so the bottoms' backward passes run at the same time on every party.
Each follower's defences draw from their own stream (`CutLayerDefences.party`).

A party of several workers (`vfl_cli.train.workers`) runs this loop in every worker, each on its shard of every
batch, paired with the same worker of each peer; the workers sum their gradients before each optimiser step, and
rank 0 alone checkpoints, logs and evaluates.

All parties checkpoint at the same global steps (every `train.checkpoint_every` steps, and at each epoch
end after its test evaluation), so a resumed run finds a step both hold; see `vfl_cli.checkpoint`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from data_prep.store import PartyData, SplitArrays
from vfl_cli.checkpoint import CheckpointStore
from vfl_cli.errors import CheckpointError, ProtocolError
from vfl_cli.grid import Grid
from vfl_cli.job import JobSpec
from vfl_cli.party import PartyContext
from vfl_cli.privacy.cut_layer import CutLayerDefences
from vfl_cli.protocol import BatchKey, Phase, WireTensors, read_selection, selection_message
from vfl_cli.reporter import Reporter
from vfl_cli.task import Task
from vfl_cli.telemetry import Telemetry
from vfl_cli.train.batches import (
    Batch,
    Carve,
    Position,
    SplitView,
    carve_valid,
    checkpoint_due,
    iterate,
    steps_per_epoch,
    to_device,
    view_of,
)
from vfl_cli.train.metrics_log import MetricsLog
from vfl_cli.train.parties import PartyModel
from vfl_cli.train.selection import choose, stopped_before
from vfl_cli.train.workers import Workers


def job_carve(job: JobSpec, train_rows: int) -> Carve | None:
    """The job's validation carve of a stored train split of `train_rows` rows; None without validation."""
    data = job.data
    return carve_valid(train_rows, data.valid_fraction, job.seed, data.valid_split) if data.valid_fraction > 0 else None


@dataclass(frozen=True)
class EvalResult:
    scores: dict[str, float]  # every metric of the task, by name (NaN where undefined)
    primary: str  # the name of the one that selects the best epoch
    rows: int
    sample_ids: np.ndarray = field(repr=False)
    predictions: np.ndarray = field(repr=False)  # the task's: P(y=1) [N], P(class) [N, k] or values [N]

    @property
    def score(self) -> float:
        """The primary metric's value (AUC, accuracy or RMSE)."""
        return self.scores[self.primary]


@dataclass(frozen=True)
class TrainOutcome:
    """What one `vfl train` session did."""

    run_id: str
    start: Position  # where the session began: step 0 of a new run, or the agreed step of a resumed one
    resumed: bool  # continued a run already under way (possibly rolled back), rather than starting one
    epochs: list[tuple[int, float, EvalResult | None]]  # (epoch, train samples/s, valid or test result at leader)
    final_test: EvalResult | None = None  # with validation: the selected epoch on the test split (leader only)


@dataclass
class PartyRun:
    """Everything one party needs to run: spec, data, model, its peers, and where to write."""

    job: JobSpec
    role: str  # my key in the job: "leader", "follower", "follower2", ...
    data: PartyData
    party: PartyModel
    grid: Grid
    reporter: Reporter
    run_dir: Path  # <train.run_dir>/<role>
    telemetry: Telemetry  # counters for /metrics (steps, samples, step latency, test AUC, resumes)
    waited_s: float = 0.0  # the leader's time waiting for the followers' cuts in training, since the last log line
    workers: Workers = field(default_factory=Workers)  # this process's place among the party's workers

    @property
    def is_leader(self) -> bool:
        return self.job.is_leader(self.role)

    @cached_property
    def context(self) -> PartyContext:
        """This party's view of the job (its spec, its peers' keys and names)."""
        return PartyContext.of(self.job, self.role)

    @property
    def checkpoints(self) -> CheckpointStore:
        return CheckpointStore(self.run_dir, self.job.fingerprint())

    @cached_property
    def defences(self) -> dict[str, CutLayerDefences]:
        """The defences of each follower's cut, by its key: the leader's for every follower, a follower's own."""
        classes = self.party.task.width if self.party.task is not None and self.party.task.width > 1 else 2
        followers = self.context.followers if self.is_leader else (self.role,)
        # Worker i > 0 draws from streams of its own: its shard's rows are other customers than rank 0's.
        stream = "" if self.workers.is_main else f"/worker{self.workers.rank}"
        return {f: CutLayerDefences(self.job.privacy, self.job.seed, classes, f + stream) for f in followers}

    @property
    def own_defences(self) -> CutLayerDefences:
        """Defences that do not depend on a follower: the leader's label DP, a follower's own embeddings."""
        return next(iter(self.defences.values()))

    @property
    def task(self) -> Task:
        assert self.party.task is not None, "only the leader has the task"
        return self.party.task

    @property
    def validating(self) -> bool:
        """Model selection on a validation split (data.valid_fraction > 0)."""
        return self.job.data.valid_fraction > 0

    @cached_property
    def carve(self) -> Carve | None:
        """The job's validation carve of this party's train split; None without validation, or on data with no
        train split (new customers to score)."""
        train = self.data.meta.splits.get("train")
        return None if train is None else job_carve(self.job, train.rows)

    def view(self, name: str) -> SplitView:
        """The rows this run uses as split `name` (the same rows at both parties: the carve depends on the job
        alone)."""
        return view_of(self.data, name, self.carve)

    @property
    def steps_per_epoch(self) -> int:
        # From the metadata, not the arrays: every checkpoint asks.
        rows = self.data.meta.splits["train"].rows if self.carve is None else len(self.carve[0])
        return steps_per_epoch(rows, self.job.train.batch_size)

    @cached_property
    def metrics_log(self) -> MetricsLog:
        return MetricsLog(self.run_dir, self.role, self.job.train.tensorboard)

    def write_metrics(self, record: dict) -> None:
        if self.workers.is_main:  # the party's one log
            self.metrics_log.write(record)


def _received(tensors: WireTensors, key: BatchKey, rows: int, widths: dict[str, int],
              device: torch.device) -> dict[str, torch.Tensor]:
    floats = CutLayerDefences.received(tensors)
    for name, width in widths.items():
        if name not in floats or floats[name].shape != (rows, width):
            got = {n: tuple(t.shape) for n, t in floats.items()}
            raise ProtocolError(f"{key}: peer sent {got}, expected {name} of shape ({rows}, {width})")
    return {name: to_device(floats[name], device) for name in widths}


def follower_train_step(run: PartyRun, batch: Batch, key: BatchKey) -> None:
    party, leader = run.party, run.context.leader
    cut = party.bottom_forward(batch.ids, batch.vals)  # name -> (B, width)
    run.grid.send(leader, "embeddings", key, run.own_defences.embeddings_out(cut, key))
    grads = _received(run.grid.receive(leader, "gradients", key), key, len(batch), run.context.cut_widths,
                      party.device)
    party.zero_grad()
    torch.autograd.backward(list(cut.values()), [grads[name] for name in cut])  # L2: Adam's weight decay
    run.workers.sum_gradients(party.optimizers)
    party.step()


def gather_cuts(run: PartyRun, key: BatchKey, rows: int) -> dict[str, dict[str, torch.Tensor]]:
    """Every follower's cut of this batch at the leader, by key in the job's order. Each follower sent its own
    as soon as it had computed it, so the waits overlap: the whole gather takes as long as the slowest."""
    started = time.perf_counter()
    cuts = {f: _received(run.grid.receive(f, "embeddings", key), key, rows, run.context.cut_widths, run.party.device)
            for f in run.context.followers}
    run.waited_s += time.perf_counter() - started
    return cuts


def leader_train_step(run: PartyRun, batch: Batch, key: BatchKey, batch_rows: int | None = None) -> float:
    """One step at the leader on `batch` (this worker's shard of a batch of `batch_rows`, by default all of it);
    returns the whole batch's loss."""
    party = run.party
    assert party.top is not None and batch.labels is not None
    labels = run.own_defences.training_labels(batch.labels, batch.sample_ids)  # the true ones unless label_dp
    own = party.bottom_forward(batch.ids, batch.vals)  # name -> (B, width); {} without feature columns
    theirs = gather_cuts(run, key, len(batch))
    # Cut the graph at every party's outputs: the top's backward yields the followers' gradients first.
    own_cut = {name: t.detach().requires_grad_() for name, t in own.items()}
    for cut in theirs.values():
        for t in cut.values():
            t.requires_grad_()
    party.zero_grad()
    loss = run.task.loss(party.top([own_cut, *theirs.values()]), labels)
    share = len(batch) / batch_rows if batch_rows else 1.0  # the workers' gradients sum to the whole batch's
    (loss * share if share != 1.0 else loss).backward()
    grads = {f: {name: t.grad for name, t in cut.items()} for f, cut in theirs.items()}
    assert all(g is not None for cut in grads.values() for g in cut.values())
    run.grid.send_each("gradients", key, {f: run.defences[f].gradients_out(g, labels, key)  # type: ignore[arg-type]
                                          for f, g in grads.items()})
    if own:
        torch.autograd.backward(list(own.values()), [own_cut[name].grad for name in own])  # L2: Adam's decay
    whole = run.workers.sum_gradients(party.optimizers, loss.item() * share)
    party.step()
    return whole


def idle_step(run: PartyRun) -> float:
    """A worker whose shard of a batch is empty (a last batch of fewer rows than workers) adds nothing to the sum,
    and steps with the others; its peers' workers of the same rank idle too."""
    run.party.zero_grad()
    whole = run.workers.sum_gradients(run.party.optimizers)
    run.party.step()
    return whole


def deep_loss(run: PartyRun, loss: float) -> float:
    """The seed's deep_loss: the log loss plus the leader's L2 term (computed for log lines only: a pass over
    the whole table)."""
    return loss + run.party.l2_value(run.job.train.l2_coef)


def save_checkpoint(run: PartyRun, run_id: str, step: int) -> None:
    if not run.workers.is_main:  # rank 0 writes the party's one state (every worker holds it after the all-reduce)
        return
    at = Position.at(step, run.steps_per_epoch)
    run.checkpoints.save(run_id, step, at.epoch, at.epoch_step, run.party.state_dict())


def train_epoch(run: PartyRun, run_id: str, epoch: int, start: int = 0) -> float:
    """One pass over the training split from step `start` on; returns samples per second."""
    job, split = run.job, run.view("train")
    total = run.steps_per_epoch
    run.party.train(True)
    run.reporter.begin(f"{run.role} epoch {epoch}", len(split) - min(start * job.train.batch_size, len(split)))
    started, samples, logged = time.perf_counter(), 0, start
    run.waited_s = 0.0
    batches = iterate(split, job.train.batch_size, job.seed, epoch, shuffle=True, start=start)
    for step, batch in enumerate(batches, start=start):
        key = BatchKey("train", epoch, step)
        step_started = time.perf_counter()
        rows = len(batch)
        batch = (batch.part(run.workers.shard(rows)) if run.workers.many else batch).to(run.party.device)
        if not len(batch):
            loss = idle_step(run)
        elif run.is_leader:
            loss = leader_train_step(run, batch, key, rows)
        else:
            follower_train_step(run, batch, key)
        samples += rows  # the party's rate: every worker's shard
        run.telemetry.step_done(time.perf_counter() - step_started, rows)
        done = epoch * total + step + 1  # global steps done, the name of the state we now hold
        if checkpoint_due(done, total, job.train.checkpoint_every):
            save_checkpoint(run, run_id, done)
        run.reporter.advance(rows)
        if run.is_leader and ((step + 1) % job.train.log_every == 0 or step + 1 == total):
            with_l2 = deep_loss(run, loss)
            run.reporter.log(log_line(epoch, step + 1, total, loss, with_l2))
            # cut_wait_s: per step since the last line, the leader's wait for the slowest follower's cut
            run.write_metrics({"event": "step", "epoch": epoch, "step": step + 1, "global_step": done,
                               "wide_loss": loss, "deep_loss": with_l2,
                               "cut_wait_s": run.waited_s / (step + 1 - logged)})
            run.waited_s, logged = 0.0, step + 1
    run.reporter.end()
    return samples / max(time.perf_counter() - started, 1e-9)


@torch.no_grad()
def forward_split(run: PartyRun, split_name: str, phase: Phase, epoch: int) -> EvalResult | None:
    """Predict a whole split together: every follower sends its cut, the leader predicts.
    Returns the leader's result (the task's metrics where it has labels); None at a follower."""
    split = run.view(split_name)
    batch_size = run.job.train.batch_size
    run.party.train(False)
    run.reporter.begin(f"{run.role} {phase} {split_name}", len(split))
    predictions: list[torch.Tensor] = []
    for step, batch in enumerate(iterate(split, batch_size, run.job.seed, epoch, shuffle=False)):
        key = BatchKey(phase, epoch, step)
        batch = batch.to(run.party.device)
        cut = run.party.bottom_forward(batch.ids, batch.vals)
        if run.is_leader:
            assert run.party.top is not None
            theirs = gather_cuts(run, key, len(batch))
            predictions.append(run.task.predict(run.party.top([cut, *theirs.values()])).cpu())
        else:
            run.grid.send(run.context.leader, "embeddings", key, run.own_defences.embeddings_out(cut, key))
        run.reporter.advance(len(batch))
    run.reporter.end()
    if not run.is_leader:
        return None
    found = torch.cat(predictions).numpy() if predictions else run.task.empty_predictions()
    return score(split, found, run.task)


def score(split: SplitArrays | SplitView, predictions: np.ndarray, task: Task) -> EvalResult:
    """The task's metrics of `predictions` against the split's labels (NaN where they are undefined)."""
    labels = None if split.labels is None else np.asarray(split.labels)
    return EvalResult(task.score(labels, predictions), task.primary.name, len(split), np.asarray(split.sample_ids),
                      predictions)


def log_line(epoch: int, step: int, total: int, wide_loss: float, deep_loss: float) -> str:
    """The seed's log line: `epoch 0 step 100/2582 wide_loss: 0.528141 deep_loss: 0.528339`."""
    return f"epoch {epoch} step {step}/{total} wide_loss: {wide_loss:.6f} deep_loss: {deep_loss:.6f}"


def train(run: PartyRun, run_id: str, start: Position) -> Iterator[tuple[int, float, EvalResult | None]]:
    """Train from `start` to the last epoch (or an early stop); after each epoch, score the validation split
    (the test split when there is none), checkpoint, and with validation agree on the best epoch so far.
    Yields (epoch, train samples/s, that epoch's result at the leader) as each epoch ends."""
    scored, main = "valid" if run.validating else "test", run.workers.is_main
    if run.validating and run.workers.broadcast_flag(main and stopped_before(run.checkpoints, run.job, run_id, start)):
        return
    for epoch in range(start.epoch, run.job.train.epochs):
        started = time.perf_counter()
        samples_per_s = train_epoch(run, run_id, epoch, start.epoch_step if epoch == start.epoch else 0)
        result = forward_split(run, scored, "eval", epoch) if main else None  # rank 0 evaluates for the party
        step = (epoch + 1) * run.steps_per_epoch
        save_checkpoint(run, run_id, step)
        record = {"event": "epoch", "epoch": epoch, "train_samples_per_s": samples_per_s,
                  "seconds": time.perf_counter() - started}
        if result is not None:
            record |= {"metric": result.primary, **{f"{scored}_{name}": v for name, v in result.scores.items()}}
            run.telemetry.evaluated(result.scores)
        run.write_metrics(record)
        # The other workers wait here for rank 0's evaluation and selection.
        stop = run.validating and run.workers.broadcast_flag(main and select(run, run_id, epoch, step, result))
        yield epoch, samples_per_s, result
        if stop:
            run.reporter.log(f"early stop after epoch {epoch}: no better validation score since the best epoch")
            return


def select(run: PartyRun, run_id: str, epoch: int, step: int, result: EvalResult | None) -> bool:
    """After epoch `epoch` (checkpointed at `step`): the leader, which alone sees the validation score, picks the
    best epoch so far and whether to stop, and tells every follower (one `selection` message each: two
    integers); all keep the best epoch's checkpoint as the selected one. Returns whether to stop.

    What a follower learns from it: which epoch scored best on validation, one number per epoch."""
    store, key = run.checkpoints, BatchKey("eval", epoch, 0)
    if run.is_leader:
        assert result is not None
        chosen = choose(store, run_id, run.job, run.task, epoch, step, result.scores)
        message = selection_message(chosen.step, chosen.stop)
        run.grid.send_each("selection", key, dict.fromkeys(run.context.followers, message))
        run.write_metrics({"event": "selected", "epoch": chosen.epoch, "step": chosen.step,
                           "metric": result.primary, f"valid_{result.primary}": chosen.valid_score})
        return chosen.stop
    best_step, stop = read_selection(run.grid.receive(run.context.leader, "selection", key))
    held = store.selected(run_id)
    if best_step == step:
        store.select(run_id, step, epoch, None)
    elif held is None or held["step"] != best_step:
        raise ProtocolError(f"the leader selected step {best_step}, which this side never selected "
                            f"(it holds {held['step'] if held else 'none'}); rerun every party with --restart")
    return stop


def final_test(run: PartyRun) -> EvalResult | None:
    """With validation: load the selected checkpoint and score the test split, once. The leader's result;
    None at the follower. A side without a selected checkpoint (no epoch ended) stops with CheckpointError."""
    payload = run.checkpoints.load_selected()
    if payload is None:
        raise CheckpointError(f"{run.checkpoints.directory}: no selected checkpoint to score the test split with")
    run.party.load_state_dict(payload["state"])
    result = forward_split(run, "test", "eval", run.job.train.epochs)  # an epoch number no training eval uses
    if result is not None:
        epoch = payload["step"] // run.steps_per_epoch - 1  # selected checkpoints are epoch ends
        run.write_metrics({"event": "final_test", "epoch": epoch, "step": payload["step"], "metric": result.primary,
                           **result.scores, "rows": result.rows})
    return result
