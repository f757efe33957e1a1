"""The split-learning loop of one party, written against `Peer` (in-memory or HTTPS, it cannot tell).

    follower: out = bottom(x_b); send(embeddings, out); g = receive(gradients); out.backward(g); step
    leader:   own = bottom(x_b); theirs = receive(embeddings); loss = top(own, theirs, y_b)
              backward through the top; send(gradients, d loss / d theirs); backward own bottom; step

The leader sends the follower's gradients before it backpropagates through its own bottom, so the two
bottoms' backward passes run at the same time on the two sides.

Both parties checkpoint at the same global steps (every `train.checkpoint_every` steps, and at each epoch
end after its test evaluation), so a resumed run finds a step both hold; see `vfl_cli.checkpoint`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.store import PartyData, SplitArrays
from vfl_cli.checkpoint import CheckpointStore
from vfl_cli.errors import CheckpointError, ProtocolError
from vfl_cli.job import JobSpec
from vfl_cli.metrics import log_loss, roc_auc
from vfl_cli.peer import BatchKey, Peer, Phase, WireTensors
from vfl_cli.privacy.cut_layer import CutLayerDefences
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
    view_of,
)
from vfl_cli.train.metrics_log import MetricsLog
from vfl_cli.train.parties import PartyModel


class Reporter(Protocol):
    """How the loop tells the outside world what it is doing (the CLI draws it with rich)."""

    def begin(self, description: str, total_samples: int) -> None: ...
    def advance(self, samples: int) -> None: ...
    def log(self, line: str) -> None: ...
    def end(self) -> None: ...


class SilentReporter:
    def begin(self, description: str, total_samples: int) -> None:
        pass

    def advance(self, samples: int) -> None:
        pass

    def log(self, line: str) -> None:
        pass

    def end(self) -> None:
        pass


def job_carve(job: JobSpec, train_rows: int) -> Carve | None:
    """The job's validation carve of a stored train split of `train_rows` rows; None without validation."""
    data = job.data
    return carve_valid(train_rows, data.valid_fraction, job.seed, data.valid_split) if data.valid_fraction > 0 else None


@dataclass(frozen=True)
class EvalResult:
    auc: float
    log_loss: float
    rows: int
    sample_ids: np.ndarray = field(repr=False)
    probabilities: np.ndarray = field(repr=False)


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
    """Everything one party needs to run: spec, data, model, the other party, and where to write."""

    job: JobSpec
    role: str  # "leader" or "follower"
    data: PartyData
    party: PartyModel
    peer: Peer
    reporter: Reporter
    run_dir: Path  # <train.run_dir>/<role>
    telemetry: Telemetry  # counters for /metrics (steps, samples, step latency, test AUC, resumes)

    @property
    def is_leader(self) -> bool:
        return self.role == "leader"

    @property
    def checkpoints(self) -> CheckpointStore:
        return CheckpointStore(self.run_dir, self.job.fingerprint())

    @cached_property
    def defences(self) -> CutLayerDefences:
        return CutLayerDefences(self.job.privacy, self.job.seed)

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
        self.metrics_log.write(record)


def _received(tensors: WireTensors, key: BatchKey, rows: int, device: torch.device) -> list[torch.Tensor]:
    floats = CutLayerDefences.received(tensors)
    wide, deep = floats["wide"], floats["deep"]
    if wide.shape != (rows, 1) or deep.shape != (rows, 1):
        raise ProtocolError(f"{key}: peer sent shapes {tuple(wide.shape)}/{tuple(deep.shape)}, expected ({rows}, 1)")
    return [wide.to(device), deep.to(device)]


def follower_train_step(run: PartyRun, batch: Batch, key: BatchKey) -> None:
    party = run.party
    wide, deep = party.bottom_forward(batch.ids, batch.vals)  # (B, 1), (B, 1)
    run.peer.send("embeddings", key, run.defences.embeddings_out(wide, deep, key))
    grad_wide, grad_deep = _received(run.peer.receive("gradients", key), key, len(batch), party.device)
    party.zero_grad()
    torch.autograd.backward([wide, deep], [grad_wide, grad_deep])  # (the L2 term is Adam's weight decay)
    party.step()


def leader_train_step(run: PartyRun, batch: Batch, key: BatchKey) -> float:
    """One step at the leader; returns the batch's log loss."""
    party = run.party
    assert party.top is not None and batch.labels is not None
    labels = run.defences.training_labels(batch.labels, batch.sample_ids)  # the true ones unless privacy.label_dp
    own_wide, own_deep = party.bottom_forward(batch.ids, batch.vals)  # (B, 1), (B, 1)
    theirs = _received(run.peer.receive("embeddings", key), key, len(batch), party.device)
    # Cut the graph at both parties' outputs: the top's backward yields the follower's gradients first.
    cut = [own_wide.detach().requires_grad_(), own_deep.detach().requires_grad_()]
    cut += [t.requires_grad_() for t in theirs]
    party.zero_grad()
    logits = party.top(*cut)  # (B,)
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    loss.backward()
    assert cut[2].grad is not None and cut[3].grad is not None
    run.peer.send("gradients", key, run.defences.gradients_out(cut[2].grad, cut[3].grad, labels, key))
    torch.autograd.backward([own_wide, own_deep], [cut[0].grad, cut[1].grad])  # L2: Adam's weight decay
    party.step()
    return loss.item()


def deep_loss(run: PartyRun, loss: float) -> float:
    """The seed's deep_loss: the log loss plus the leader's L2 term (computed for log lines only: a pass over
    the whole table)."""
    return loss + run.party.bottom.l2_value(run.job.train.l2_coef)


def save_checkpoint(run: PartyRun, run_id: str, step: int) -> None:
    at = Position.at(step, run.steps_per_epoch)
    run.checkpoints.save(run_id, step, at.epoch, at.epoch_step, run.party.state_dict())


def train_epoch(run: PartyRun, run_id: str, epoch: int, start: int = 0) -> float:
    """One pass over the training split from step `start` on; returns samples per second."""
    job, split = run.job, run.view("train")
    total = run.steps_per_epoch
    run.party.train(True)
    run.reporter.begin(f"{run.role} epoch {epoch}", len(split) - min(start * job.train.batch_size, len(split)))
    started, samples = time.perf_counter(), 0
    batches = iterate(split, job.train.batch_size, job.seed, epoch, shuffle=True, start=start)
    for step, batch in enumerate(batches, start=start):
        key = BatchKey("train", epoch, step)
        step_started = time.perf_counter()
        batch = batch.to(run.party.device)
        if run.is_leader:
            loss = leader_train_step(run, batch, key)
        else:
            follower_train_step(run, batch, key)
        samples += len(batch)
        run.telemetry.step_done(time.perf_counter() - step_started, len(batch))
        done = epoch * total + step + 1  # global steps done, the name of the state we now hold
        if checkpoint_due(done, total, job.train.checkpoint_every):
            save_checkpoint(run, run_id, done)
        run.reporter.advance(len(batch))
        if run.is_leader and ((step + 1) % job.train.log_every == 0 or step + 1 == total):
            with_l2 = deep_loss(run, loss)
            run.reporter.log(log_line(epoch, step + 1, total, loss, with_l2))
            run.write_metrics({"event": "step", "epoch": epoch, "step": step + 1, "global_step": done,
                               "wide_loss": loss, "deep_loss": with_l2})
    run.reporter.end()
    return samples / max(time.perf_counter() - started, 1e-9)


@torch.no_grad()
def forward_split(run: PartyRun, split_name: str, phase: Phase, epoch: int) -> EvalResult | None:
    """Predict a whole split together: the follower sends embeddings, the leader scores.
    Returns the leader's result (AUC and log loss where it has labels); None at the follower."""
    split = run.view(split_name)
    batch_size = run.job.train.batch_size
    run.party.train(False)
    run.reporter.begin(f"{run.role} {phase} {split_name}", len(split))
    probabilities: list[torch.Tensor] = []
    for step, batch in enumerate(iterate(split, batch_size, run.job.seed, epoch, shuffle=False)):
        key = BatchKey(phase, epoch, step)
        batch = batch.to(run.party.device)
        wide, deep = run.party.bottom_forward(batch.ids, batch.vals)
        if run.is_leader:
            assert run.party.top is not None
            theirs = _received(run.peer.receive("embeddings", key), key, len(batch), run.party.device)
            probabilities.append(torch.sigmoid(run.party.top(wide, deep, *theirs)).cpu())
        else:
            run.peer.send("embeddings", key, run.defences.embeddings_out(wide, deep, key))
        run.reporter.advance(len(batch))
    run.reporter.end()
    if not run.is_leader:
        return None
    probs = torch.cat(probabilities).numpy() if probabilities else np.zeros(0, dtype=np.float32)
    return score(split, probs)


def score(split: SplitArrays | SplitView, probs: np.ndarray) -> EvalResult:
    """AUC and log loss of `probs` against the split's labels (NaN where they are undefined)."""
    labels = split.labels
    has_both_classes = labels is not None and len(labels) > 0 and 0 < float(np.sum(labels)) < len(labels)
    return EvalResult(
        auc=roc_auc(np.asarray(labels), probs) if has_both_classes else float("nan"),
        log_loss=log_loss(np.asarray(labels), probs) if labels is not None and len(labels) else float("nan"),
        rows=len(split),
        sample_ids=np.asarray(split.sample_ids),
        probabilities=probs,
    )


def log_line(epoch: int, step: int, total: int, wide_loss: float, deep_loss: float) -> str:
    """The seed's log line: `epoch 0 step 100/2582 wide_loss: 0.528141 deep_loss: 0.528339`."""
    return f"epoch {epoch} step {step}/{total} wide_loss: {wide_loss:.6f} deep_loss: {deep_loss:.6f}"


def train(run: PartyRun, run_id: str, start: Position) -> Iterator[tuple[int, float, EvalResult | None]]:
    """Train from `start` to the last epoch (or an early stop); after each epoch, score the validation split
    (the test split when there is none), checkpoint, and with validation agree on the best epoch so far.
    Yields (epoch, train samples/s, that epoch's result at the leader) as each epoch ends."""
    scored = "valid" if run.validating else "test"
    if run.validating and stopped_before(run.checkpoints, run.job, run_id, start):
        return
    for epoch in range(start.epoch, run.job.train.epochs):
        started = time.perf_counter()
        samples_per_s = train_epoch(run, run_id, epoch, start.epoch_step if epoch == start.epoch else 0)
        result = forward_split(run, scored, "eval", epoch)
        step = (epoch + 1) * run.steps_per_epoch
        save_checkpoint(run, run_id, step)
        record = {"event": "epoch", "epoch": epoch, "train_samples_per_s": samples_per_s,
                  "seconds": time.perf_counter() - started}
        if result is not None:
            record |= {f"{scored}_auc": result.auc, f"{scored}_log_loss": result.log_loss}
            run.telemetry.evaluated(result.auc)
        run.write_metrics(record)
        stop = run.validating and select(run, run_id, epoch, step, result)
        yield epoch, samples_per_s, result
        if stop:
            run.reporter.log(f"early stop after epoch {epoch}: no better validation AUC since the best epoch")
            return


@dataclass(frozen=True)
class Selection:
    step: int  # the best epoch's checkpoint so far
    epoch: int
    valid_auc: float
    stop: bool  # early stopping ends training here


def choose(store: CheckpointStore, run_id: str, job: JobSpec, epoch: int, step: int, auc: float) -> Selection:
    """After epoch `epoch` (checkpointed at `step`, validation AUC `auc`): the best epoch so far, kept as the
    selected checkpoint when it is this one, and whether `train.early_stopping` ends training. One rule for the
    leader of a split run and for the baselines."""
    best = store.selected(run_id)
    if best is None or auc > best["valid_auc"]:  # NaN (one class) is never better
        store.select(run_id, step, epoch, auc)
        best = {"step": step, "epoch": epoch, "valid_auc": auc}
    patience = job.train.early_stopping
    stop = patience is not None and epoch - best["epoch"] >= patience.patience
    return Selection(best["step"], best["epoch"], best["valid_auc"], stop)


def select(run: PartyRun, run_id: str, epoch: int, step: int, result: EvalResult | None) -> bool:
    """After epoch `epoch` (checkpointed at `step`): the leader, which alone sees the validation AUC, picks the
    best epoch so far and whether to stop, and tells the follower (one `selection` message: two integers);
    both keep the best epoch's checkpoint as the selected one. Returns whether to stop.

    What the follower learns from it: which epoch scored best on validation, one number per epoch."""
    store, key = run.checkpoints, BatchKey("eval", epoch, 0)
    if run.is_leader:
        assert result is not None
        chosen = choose(store, run_id, run.job, epoch, step, result.auc)
        run.peer.send("selection", key, {"best_step": torch.tensor([chosen.step]),
                                         "stop": torch.tensor([int(chosen.stop)])})
        run.write_metrics({"event": "selected", "epoch": chosen.epoch, "step": chosen.step,
                           "valid_auc": chosen.valid_auc})
        return chosen.stop
    message = run.peer.receive("selection", key)
    best_step, stop = int(message["best_step"][0]), bool(message["stop"][0])  # type: ignore[index]
    held = store.selected(run_id)
    if best_step == step:
        store.select(run_id, step, epoch, None)
    elif held is None or held["step"] != best_step:
        raise ProtocolError(f"the leader selected step {best_step}, which this side never selected "
                            f"(it holds {held['step'] if held else 'none'}); rerun both sides with --restart")
    return stop


def stopped_before(store: CheckpointStore, job: JobSpec, run_id: str, start: Position) -> bool:
    """Whether a resumed run had already stopped early, read from the store's own selection record (so both
    parties, and a baseline, decide alike)."""
    patience, held = job.train.early_stopping, store.selected(run_id)
    if patience is None or held is None or start.epoch_step != 0 or start.epoch == 0:
        return False
    return start.epoch - 1 - held["epoch"] >= patience.patience


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
        run.write_metrics({"event": "final_test", "epoch": epoch, "step": payload["step"],
                           "auc": result.auc, "log_loss": result.log_loss, "rows": result.rows})
    return result
