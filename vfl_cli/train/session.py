"""A party's session: open its data, build its model, shake hands with its peers, then train, evaluate or
infer. `run_local` runs every party in one process (a thread each, joined by a `LocalGrid`).

Training first agrees with every party on one history (`vfl_cli.checkpoint.agree`) and rolls back to it;
evaluation and inference first check that every party holds the same checkpoint."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from data_prep.store import PartyData, open_party
from vfl_cli.checkpoint import (
    Agreement,
    CheckpointStore,
    agree,
    agreed_hello,
    file_name,
    new_run_id,
    same_checkpoint,
)
from vfl_cli.errors import CheckpointError, DataError
from vfl_cli.grid import Grid, LocalGrid, run_all
from vfl_cli.job import JobSpec
from vfl_cli.party import PartyContext
from vfl_cli.protocol import Answer, Hello, meet
from vfl_cli.reporter import Reporter, SilentReporter
from vfl_cli.task import Task
from vfl_cli.telemetry import Telemetry
from vfl_cli.train.batches import Position, view_of
from vfl_cli.train.loop import (
    EvalResult,
    PartyRun,
    TrainOutcome,
    final_test,
    forward_split,
    job_carve,
    train,
)
from vfl_cli.train.parties import build_party, pick_device
from vfl_cli.train.workers import Workers

T = TypeVar("T")


def open_run(
    ctx: PartyContext, grid: Grid, reporter: Reporter | None = None, telemetry: Telemetry | None = None,
    workers: Workers | None = None,
) -> PartyRun:
    job, role, spec = ctx.job, ctx.role, ctx.spec
    data = open_party(job.data.dir, role)
    prepared, expected = tuple(zip(data.meta.fields, data.meta.kinds, strict=True)), tuple(spec.columns.items())
    if prepared != expected:
        raise DataError(f"{data.dir}: prepared for {len(prepared)} columns, the job gives the {role} {len(expected)} "
                        f"({_first_difference(prepared, expected)}); run `vfl prep` again")
    if ctx.is_leader and data.meta.has_labels and (data.meta.task or "binary") != spec.task:
        raise DataError(f"{data.dir}: prepared for a {data.meta.task} label, but the job's task is {spec.task}")
    task = leader_task(job, data) if ctx.is_leader else None
    workers = workers or Workers()
    device = workers.device if workers.device.type == "cuda" else pick_device(spec.device)  # a worker's own GPU
    party = build_party(job, role, data.meta, device, task)
    run = PartyRun(job, role, data, party, grid, reporter or SilentReporter(), job.train.run_dir / role,
                   telemetry or Telemetry(role), workers=workers)
    run.context = ctx  # the cached view: the same object the caller built, not a second one
    return run


def _first_difference(prepared: tuple[tuple[str, str], ...], expected: tuple[tuple[str, str], ...]) -> str:
    def show(column: tuple[str, str] | None) -> str:
        return "none" if column is None else f"{column[0]} ({column[1]})"

    for i in range(max(len(prepared), len(expected))):
        mine, theirs = (cols[i] if i < len(cols) else None for cols in (prepared, expected))
        if mine != theirs:
            return f"column {i + 1}: prepared {show(mine)}, the job {show(theirs)}"
    return "the same columns"


def leader_task(job: JobSpec, data: PartyData) -> Task:
    """The leader's task; a regression label's scale from this run's training rows (the validation carve left
    out), where the data has them (a checkpoint carries it to data without)."""
    labels = None
    train = data.meta.splits.get("train")
    if job.leader.task == "regression" and data.meta.has_labels and train is not None:
        carve = job_carve(job, train.rows)
        labels = view_of(data, "train", carve).labels
    return Task.of(job.leader.task, tuple(data.meta.classes), None if labels is None else np.asarray(labels))


def handshake(
    run: PartyRun, command: str, run_id: str = "", checkpoint_steps: tuple[int, ...] = (),
    extra: dict[str, str] | None = None, answer: Answer | None = None,
) -> tuple[Hello, list[Hello]]:
    """Exchange Hellos; any difference in what all parties must share stops the run here. The leader checks
    every follower's and answers with `answer(its own, theirs)` (default its own). Returns (the leader's Hello, the
    followers' that this party saw): at the leader its own and every follower's, at a follower the leader's
    answer and its own."""
    mine = Hello(
        role=run.role,
        name=run.context.name,
        job_fingerprint=run.job.fingerprint(),
        data_fingerprint={split: run.data.fingerprint(split) for split in run.data.meta.splits},
        command=command,
        run_id=run_id,
        checkpoint_steps=checkpoint_steps,
        extra=extra or {},
    )
    theirs = meet(run.context, run.grid, mine, answer)
    if run.is_leader:
        return mine, [theirs[key] for key in run.context.followers]
    return theirs[run.context.leader], [mine]


def restore(run: PartyRun, payload: dict[str, Any], path: Path) -> None:
    try:
        run.party.load_state_dict(payload["state"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def roll_back(run: PartyRun, agreed: Agreement, held: tuple[int, ...]) -> Position:
    """Bring this party to the agreed step: load its checkpoint (step 0 is the model as built from the seed),
    then drop the files of any other history. Loading first, so a bad file leaves the disk untouched."""
    store = run.checkpoints
    if agreed.step > 0:
        restore(run, store.load(agreed.run_id, agreed.step), store.directory / file_name(agreed.step))
    store.begin(agreed.run_id, agreed.step, held)
    return Position.at(agreed.step, run.steps_per_epoch)


def require_labels(run: PartyRun) -> None:
    """Training and evaluation need the leader's labels; scoring new customers does not."""
    if run.is_leader and not run.data.meta.has_labels:
        raise DataError(f"{run.data.dir}: the leader's data has no labels")


def train_session(run: PartyRun, restart: bool = False) -> TrainOutcome:
    """Agree with every party on where training stands, roll back to it, and train the remaining steps.
    Our Hello offers the run in run.json and the checkpoints held for it; --restart offers a new run. The
    leader answers with the agreement over every follower's Hello (`agreed_hello`)."""
    require_labels(run)
    if not run.workers.is_main:
        return worker_session(run)
    run.metrics_log  # noqa: B018 - opened first: a missing optional package stops before the peer is contacted
    store = run.checkpoints
    recorded = None if restart else store.run_id()
    held = store.steps(recorded) if recorded else ()
    leader, followers = handshake(run, "train", recorded or new_run_id(), held, run.workers.hello_extra(),
                                  answer=lambda mine, theirs: agreed_hello(mine, list(theirs.values())))
    agreed = agree(leader, *followers)
    start = roll_back(run, agreed, held)
    if run.workers.many:  # the other workers start where rank 0 does
        held_bytes = (store.directory / file_name(agreed.step)).read_bytes() if agreed.step > 0 else None
        run.workers.broadcast_start(agreed.run_id, agreed.step, held_bytes)
    choice = run.party.gemm
    gemm = {} if choice is None else {"gemm": choice.path, "gemm_detail": choice.describe()}  # the CPU GEMM it runs
    if agreed.resumed:
        run.reporter.log(f"resumed run {agreed.run_id} at {start}")
        run.telemetry.resumed(start.step)
        run.write_metrics({"event": "resume", "run_id": agreed.run_id, "step": start.step, "epoch": start.epoch,
                           "epoch_step": start.epoch_step, **gemm})
    else:
        run.write_metrics({"event": "start", "run_id": agreed.run_id, **gemm})
    epochs = list(train(run, agreed.run_id, start))
    final = final_test(run) if run.validating else None
    return TrainOutcome(agreed.run_id, start, agreed.resumed, epochs, final)


def worker_session(run: PartyRun) -> TrainOutcome:
    """Worker i > 0 of a party: start where rank 0 agreed with the peers (its checkpoint, sent as bytes, read as
    rank 0 reads it), shake hands with worker i of each peer over this worker's own channel, and train its shards.
    The Hellos carry the agreed start, so paired workers that disagree stop here."""
    run_id, step, held = run.workers.broadcast_start("", 0, None)
    if held is not None:
        with tempfile.TemporaryDirectory(prefix="vfl-worker-") as temp:
            path = Path(temp) / file_name(step)
            path.write_bytes(held)
            restore(run, CheckpointStore(Path(temp), run.job.fingerprint()).load(run_id, step), path)
    handshake(run, "train", run_id, (step,) if step else (), run.workers.hello_extra() | {"start": f"{run_id}@{step}"})
    start = Position.at(step, run.steps_per_epoch)
    return TrainOutcome(run_id, start, step > 0, list(train(run, run_id, start)))


def load_agreed_model(run: PartyRun, run_dir: Path, command: str, extra: dict[str, str]) -> None:
    """Load this party's newest checkpoint, once the handshake shows every other party's is the same run and
    step (the leader checks every follower's, a follower the leader's). A party without one still shakes hands
    (run id ""), so that every party stops with the reason."""
    store = CheckpointStore(run_dir / run.role, run.job.fingerprint())
    payload: dict[str, Any] | None = None
    problem: CheckpointError | None = None
    try:
        # With validation, the best epoch's checkpoint (model selection); else the newest.
        payload = store.load_selected() or store.newest()
    except CheckpointError as exc:
        problem = exc
    run_id, steps = (payload["run_id"], (payload["step"],)) if payload else ("", ())
    leader, followers = handshake(run, command, run_id, steps, extra)
    if problem is not None:
        raise problem
    steps_per_epoch = run.steps_per_epoch if "train" in run.data.meta.splits else None
    same_checkpoint(leader, *followers, steps_per_epoch=steps_per_epoch)
    assert payload is not None
    restore(run, payload, store.directory / file_name(payload["step"]))


def eval_session(run: PartyRun, run_dir: Path, split: str) -> EvalResult | None:
    require_labels(run)
    load_agreed_model(run, run_dir, "eval", {"split": split})
    return forward_split(run, split, "eval", 0)


def infer_session(run: PartyRun, run_dir: Path, split: str, out: Path | None) -> EvalResult | None:
    load_agreed_model(run, run_dir, "infer", {"split": split})
    result = forward_split(run, split, "infer", 0)
    if result is not None and out is not None:
        write_predictions(out, result, run.task, view_customer_ids(run, split))
    return result


def view_customer_ids(run: PartyRun, split: str) -> np.ndarray | None:
    """The customer ids of the rows the run uses as `split` (with a validation carve, "train" and "valid" are
    parts of the stored train split), or None where the data has none."""
    view = run.view(split)
    ids = run.data.customer_ids("train" if split == "valid" else split)
    return ids if ids is None or view.rows is None else ids[view.rows]


def write_predictions(out: Path, result: EvalResult, task: Task, customer_ids: np.ndarray | None = None) -> None:
    """id, then the task's prediction columns (probability; p_<class> per class; value) per row, where the data
    has customer ids (aligned by `vfl psi`), else sample_id first; written to a temp file and renamed, so a
    crash leaves no half file."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    except OSError as exc:
        raise DataError(f"{out}: cannot write predictions ({exc.strerror})") from exc
    try:
        with os.fdopen(handle, "w", newline="") as file:
            writer = csv.writer(file)
            values = result.predictions.reshape(len(result.predictions), -1).tolist()
            cells = ([f"{v:.6f}" for v in row] for row in values)
            if customer_ids is None:
                writer.writerow(["sample_id", *task.columns()])
                ids: Iterable[Any] = result.sample_ids.tolist()
            else:
                writer.writerow(["id", *task.columns()])
                ids = (cid.decode() for cid in customer_ids.tolist())
            writer.writerows([row_id, *row] for row_id, row in zip(ids, cells, strict=True))
        os.replace(temp_name, out)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def run_local(
    job: JobSpec,
    session: Callable[[PartyRun], T],
    reporters: dict[str, Reporter] | None = None,
) -> dict[str, T]:
    """Run `session` for every party in this process, joined in memory (`vfl_cli.grid.run_all`); results by party
    key (the leader's under `job.label_party`)."""
    grids = LocalGrid.star(job.label_party, job.followers, job.transport.timeout_s)
    reporters = reporters or {}
    runs = {  # opened before any party starts, so that a data problem is reported as it is
        key: open_run(PartyContext.of(job, key), grid, reporters.get(key)) for key, grid in grids.items()
    }
    return run_all({key: (partial(session, run), run.grid) for key, run in runs.items()}, job.label_party)


def local_threads(job: JobSpec) -> int | None:
    """Torch's threads for `--role local`, where every party shares one process and torch's thread count is the
    process's: the parties' own setting, so that each party computes what its own process computes (another
    count changes the summation order inside matmuls, and after thousands of steps the result: 0.057 apart in
    predictions on default_credit with 2 threads against 1); the larger where the two settings differ."""
    given = [p.threads for p in job.parties.values() if p.threads]
    return max(given) if given else None


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
