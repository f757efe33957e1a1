"""Baselines without federation, same model family, hyperparameters, task and batches as the split run:

    central      one bottom over both parties' columns (pooled data: the ceiling)
    leader-only  one bottom over the leader's columns alone (what the leader has without a partner; with no
                 columns of its own, the head's bias alone: the label's prior)

The head is the job's top over that one bottom's cut (`CentralModel`; Wide&Deep's own logit = wide + deep for
the Criteo preset). They show what vertical federation gains and what it costs, scored by the same task.
Checkpoints go to <run_dir>/<kind>/ in the same store and on the same schedule as a party's, and a rerun
resumes the same way (`--restart` starts over).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.store import PartyData, open_party
from vfl_cli.checkpoint import SELECTED_FILE, CheckpointStore, file_name, new_run_id
from vfl_cli.errors import CheckpointError, DataError
from vfl_cli.job import JobSpec
from vfl_cli.model.build import CentralModel
from vfl_cli.model.optimizers import build_optimizers
from vfl_cli.task import Task
from vfl_cli.train.batches import (
    Batch,
    Carve,
    Position,
    batch_rows,
    checkpoint_due,
    steps_per_epoch,
    take_batch,
    view_of,
)
from vfl_cli.train.loop import (
    EvalResult,
    Reporter,
    TrainOutcome,
    job_carve,
    log_line,
    score,
)
from vfl_cli.train.metrics_log import MetricsLog
from vfl_cli.train.parties import bf16_autocast, use_bf16
from vfl_cli.train.selection import choose, stopped_before
from vfl_cli.train.session import leader_task


@dataclass(frozen=True)
class BaselineData:
    """The parties' prepared data side by side; the follower's ids shifted past the leader's vocabulary."""

    parties: list[PartyData]
    offsets: list[int]
    carve: Carve | None = None  # with data.valid_fraction: the validation carve, as the parties' runs have it

    @property
    def vocab_size(self) -> int:
        return self.offsets[-1] + self.parties[-1].meta.vocab_size

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(kind for p in self.parties for kind in p.meta.kinds)

    def batches(
        self, split: str, batch_size: int, seed: int, epoch: int, shuffle: bool, start: int = 0
    ) -> Iterator[Batch]:
        """As `batches.iterate`, every party's columns side by side."""
        views = [view_of(p, split, self.carve) for p in self.parties]
        for positions in batch_rows(len(views[0]), batch_size, seed, epoch, shuffle)[start:]:
            parts = [take_batch(v.arrays, v.stored(positions)) for v in views]
            yield Batch(
                ids=torch.cat([part.ids + offset for part, offset in zip(parts, self.offsets, strict=True)], dim=1),
                vals=torch.cat([part.vals for part in parts], dim=1),
                labels=parts[0].labels,
                sample_ids=parts[0].sample_ids,
            )


def open_baseline_data(job: JobSpec, kind: str) -> BaselineData:
    """The leader's prepared data, and for `central` every follower's beside it (the rows aligned)."""
    leader = open_party(job.data.dir, job.label_party)
    parties = [leader]
    if kind == "central":
        for key in job.followers:
            follower = open_party(job.data.dir, key)
            for split in leader.meta.splits:
                if leader.fingerprint(split) != follower.fingerprint(split):
                    raise DataError(f"{job.data.dir}: {job.label_party} and {key} {split} rows are not aligned")
            parties.append(follower)
    offsets = [0]
    for party in parties[:-1]:
        offsets.append(offsets[-1] + party.meta.vocab_size)
    train = leader.meta.splits.get("train")  # none in data of new customers to score
    return BaselineData(parties, offsets, None if train is None else job_carve(job, train.rows))


def baseline_task(job: JobSpec, data: BaselineData) -> Task:
    """The leader's task, as its split run has it."""
    return leader_task(job, data.parties[0])


def build_model(job: JobSpec, data: BaselineData, task: Task) -> CentralModel:
    return CentralModel(job.model, job.seed, data.vocab_size, data.kinds, task.width)


def logits(model: CentralModel, job: JobSpec, batch: Batch) -> torch.Tensor:
    """[B, width] float32 logits, the matmuls under bfloat16 autocast when the job's precision is bf16 (as a
    party's)."""
    cpu = torch.device("cpu")
    with bf16_autocast(use_bf16(job.train.precision, cpu), cpu):
        return model(batch.ids, batch.vals).float()  # a no-op in fp32


@torch.no_grad()
def evaluate_baseline(model: CentralModel, data: BaselineData, job: JobSpec, task: Task, split: str) -> EvalResult:
    model.eval()
    predictions = [task.predict(logits(model, job, batch))
                   for batch in data.batches(split, job.train.batch_size, job.seed, 0, shuffle=False)]
    found = torch.cat(predictions).numpy() if predictions else task.empty_predictions()
    return score(view_of(data.parties[0], split, data.carve), found, task)


def _restore(
    model: CentralModel, optimizers: list[torch.optim.Optimizer] | None, payload: dict, path: Path
) -> None:
    """Load the model (and the optimisers, to train on; not needed to evaluate) from a checkpoint."""
    try:
        model.load_state_dict(payload["state"]["model"])
        if optimizers is not None:
            for optimizer, state in zip(optimizers, payload["state"]["optimizers"], strict=True):
                optimizer.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: does not fit this {path.parent.name} model ({exc})") from exc


def train_baseline(job: JobSpec, kind: str, reporter: Reporter, restart: bool = False) -> TrainOutcome:
    """Train (or resume, as `vfl train` does, from the newest checkpoint of the recorded run) one baseline."""
    data = open_baseline_data(job, kind)
    task = baseline_task(job, data)
    model = build_model(job, data, task)
    optimizers = build_optimizers(
        model.wide_parameters(), model.deep_parameters(), job.train.wide_optimizer, job.train.deep_optimizer,
        job.train.l2_coef, model.embedding_tables(),
    )
    rows = len(view_of(data.parties[0], "train", data.carve))
    total = steps_per_epoch(rows, job.train.batch_size)
    validating = data.carve is not None

    # One party, so no agreement to reach: resume at the newest checkpoint of the recorded run.
    store = CheckpointStore(job.train.run_dir / kind, job.fingerprint())
    recorded = None if restart else store.run_id()
    held = store.steps(recorded) if recorded else ()
    run_id, start = recorded or new_run_id(), Position.at(held[-1] if held else 0, total)
    if start.step > 0:
        path = store.directory / file_name(start.step)
        _restore(model, optimizers, store.load(run_id, start.step), path)
    store.begin(run_id, start.step, held)
    if recorded:
        reporter.log(f"resumed run {run_id} at {start}")

    write = MetricsLog(store.directory, kind, job.train.tensorboard).write  # the records a party writes

    write({"event": "resume" if recorded else "start", "run_id": run_id, "step": start.step})

    def save(step: int) -> None:
        at = Position.at(step, total)
        state = {"model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                 "task": task.scale_state()}
        store.save(run_id, step, at.epoch, at.epoch_step, state)

    results: list[tuple[int, float, EvalResult | None]] = []
    last_epoch = start.epoch if validating and stopped_before(store, job, run_id, start) else job.train.epochs
    for epoch in range(start.epoch, last_epoch):
        first = start.epoch_step if epoch == start.epoch else 0
        model.train()
        reporter.begin(f"{kind} epoch {epoch}", rows - min(first * job.train.batch_size, rows))
        started, samples = time.perf_counter(), 0
        batches = data.batches("train", job.train.batch_size, job.seed, epoch, shuffle=True, start=first)
        for step, batch in enumerate(batches, start=first):
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            assert batch.labels is not None  # the leader's split always has labels
            loss = task.loss(logits(model, job, batch), batch.labels)
            loss.backward()  # the L2 term is Adam's weight decay (`build_optimizers`)
            for optimizer in optimizers:
                optimizer.step()
            samples += len(batch)
            if checkpoint_due(epoch * total + step + 1, total, job.train.checkpoint_every):
                save(epoch * total + step + 1)
            reporter.advance(len(batch))
            if (step + 1) % job.train.log_every == 0 or step + 1 == total:
                l2 = model.l2_value(job.train.l2_coef)
                reporter.log(log_line(epoch, step + 1, total, loss.item(), loss.item() + l2))
                write({"event": "step", "epoch": epoch, "step": step + 1, "global_step": epoch * total + step + 1,
                       "wide_loss": loss.item(), "deep_loss": loss.item() + l2})
        reporter.end()
        samples_per_s = samples / max(time.perf_counter() - started, 1e-9)
        scored = "valid" if validating else "test"
        result = evaluate_baseline(model, data, job, task, scored)
        results.append((epoch, samples_per_s, result))
        save((epoch + 1) * total)
        write({"event": "epoch", "epoch": epoch, "train_samples_per_s": samples_per_s, "metric": result.primary,
               **{f"{scored}_{name}": value for name, value in result.scores.items()}})
        if validating and choose(store, run_id, job, task, epoch, (epoch + 1) * total, result.scores).stop:
            reporter.log(f"early stop after epoch {epoch}")
            break
    final = None
    if validating:  # the selected epoch's weights on the test split, once
        payload = store.load_selected()
        if payload is not None:
            _restore(model, None, payload, store.directory / SELECTED_FILE)
            final = evaluate_baseline(model, data, job, task, "test")
            write({"event": "final_test", "epoch": payload["step"] // total - 1, "step": payload["step"],
                   "metric": final.primary, **final.scores, "rows": final.rows})
    return TrainOutcome(run_id, start, recorded is not None, results, final)


def evaluate_baseline_checkpoint(job: JobSpec, kind: str, run_dir: Path, split: str) -> EvalResult:
    data = open_baseline_data(job, kind)
    task = baseline_task(job, data)
    model = build_model(job, data, task)
    store = CheckpointStore(run_dir / kind, job.fingerprint())
    payload = store.load_selected() or store.newest()
    _restore(model, None, payload, store.directory / file_name(payload["step"]))
    return evaluate_baseline(model, data, job, task.with_scale(payload["state"].get("task")), split)
