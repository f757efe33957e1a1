"""`vfl train`, `vfl eval`, `vfl infer`: pick the party, wire its grid and the console, run the session."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from vfl_cli.console import RichReporter, console, epoch_table
from vfl_cli.errors import JobError
from vfl_cli.job import load_job

if TYPE_CHECKING:
    from rich.status import Status

    from vfl_cli.grid import Grid
    from vfl_cli.job import JobSpec
    from vfl_cli.party import PartyContext
    from vfl_cli.telemetry import Telemetry
    from vfl_cli.train.loop import EvalResult, PartyRun
    from vfl_cli.train.workers import Workers
    from vfl_cli.transport.https_grid import HttpsGrid

# torch, the model and the transport load inside the commands that use them, so that `vfl prep`,
# `vfl certs` and `--help` start in a fraction of a second and without torch's memory.

T = TypeVar("T")


class RunRole(str, Enum):
    leader = "leader"
    follower = "follower"
    local = "local"
    central = "central"
    leader_only = "leader-only"


class PartyRole(str, Enum):
    leader = "leader"
    follower = "follower"
    local = "local"


ROLE_HELP = (
    "leader | follower: this party of a two-party job, talking to the other over HTTPS (or name it with --party). "
    "local: every party in this process. central | leader-only: baselines without federation."
)
PARTY_ROLE_HELP = "leader | follower: this party of a two-party job (or name it with --party). local: every party."
PARTY_HELP = "This party's key in the job's `parties:` (or its name), e.g. follower2; instead of --role."
JobOption = Annotated[Path, typer.Option("--job", help="Job spec YAML, e.g. jobs/criteo.yaml.", show_default=False)]
PartyOption = Annotated[str | None, typer.Option("--party", help=PARTY_HELP, show_default=False)]
CheckpointOption = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="Run directory written by `vfl train` (default: the job's train.run_dir)."),
]
SplitOption = Annotated[str, typer.Option("--split", help="Prepared split to read: test or train.")]


def pick_party(spec: JobSpec, role: str | None, party: str | None) -> str | None:
    """The key of the party this process runs, from `--party` (a key or a name) or `--role leader|follower`;
    None for `--role local` and the baselines. One line (JobError) for anything else."""
    if party is not None:
        if role is not None:
            raise JobError("give --role or --party, not both")
        return spec.party_key(party)
    if role is None:
        raise JobError(f"name this party: --party {' | '.join(spec.keys)} (or --role local)")
    if role == "leader":
        return spec.label_party
    if role == "follower":
        if len(spec.followers) > 1:
            raise JobError(f"--role follower: this job has {len(spec.followers)} followers "
                           f"({', '.join(spec.followers)}); name yours with --party")
        return spec.followers[0]
    return None


@contextmanager
def connected(ctx: PartyContext, main: bool = True) -> Iterator[HttpsGrid]:
    """This party's HTTPS grid, and the metrics listener when the job names one (`main`: the party's first worker,
    which alone has one and prints); on any failure here, tell the peers before leaving."""
    from vfl_cli.telemetry import Telemetry, start_metrics_server
    from vfl_cli.train.session import set_threads
    from vfl_cli.transport.https_grid import HttpsGrid

    job, role = ctx.job, ctx.role
    set_threads(ctx.spec.threads)
    telemetry = Telemetry(role)
    grid = HttpsGrid(ctx, telemetry)
    if main:
        console.print(f"{role} listening on {ctx.spec.listen}")
    try:
        metrics = start_metrics_server(job, role, telemetry, lambda: _health(telemetry)) if main else None
    except BaseException:
        grid.close()
        raise
    if metrics is not None:
        console.print(f"{role} metrics on http://{metrics.host}:{metrics.port}/metrics")
    try:
        yield grid
    except BaseException as exc:
        grid.abort(f"{role} stopped: {exc}" if str(exc) else f"{role} stopped")
        raise
    finally:
        grid.close()
        if metrics is not None:
            metrics.stop()


def _health(telemetry: Telemetry) -> dict[str, str]:
    return {"status": "ok", "role": telemetry.role, "steps": f"{telemetry.value('vfl_steps_total'):.0f}"}


def waiting_for_peer(ctx: PartyContext) -> Status:
    """The console spinner shown until the peers answer the handshake."""
    peers = ", ".join(f"the {key} at {peer.connect_to}" for key, peer in ctx.peers.items())
    return console.status(f"waiting for {peers} (up to {ctx.job.transport.connect_timeout_s:g} s)")


def _networked(ctx: PartyContext, session: Callable[[PartyRun], T], workers: Workers | None = None) -> tuple[T, Grid]:
    """Run `session` for this party (worker `workers.rank` of it, on its own ports) over HTTPS; only the party's
    first worker shows the spinner, the progress and the listening line."""
    from vfl_cli.reporter import SilentReporter
    from vfl_cli.train.session import open_run

    main = workers is None or workers.is_main
    ctx = ctx if workers is None else ctx.for_worker(workers.rank)
    waiting: AbstractContextManager[Status | None] = waiting_for_peer(ctx) if main else nullcontext()
    with connected(ctx, main) as grid, waiting as status:
        # The spinner runs through the handshake; the reporter stops it when the first batch starts.
        reporter = RichReporter(waiting=status) if status is not None else SilentReporter()
        return session(open_run(ctx, grid, reporter, grid.telemetry, workers)), grid


def _print_result(label: str, result: EvalResult) -> None:
    from vfl_cli.task import describe

    typer.echo(f"{label}: {describe(result.scores)}  rows {result.rows}")


def _traffic(grid: Grid, role: str) -> str:
    sent, received = getattr(grid, "bytes_sent", 0), getattr(grid, "bytes_received", 0)
    return f"{role} sent {sent / 1e6:,.2f} MB, received {received / 1e6:,.2f} MB"


def train(
    job: JobOption,
    role: Annotated[RunRole | None, typer.Option("--role", help=ROLE_HELP, show_default=False)] = None,
    party: PartyOption = None,
    restart: Annotated[
        bool,
        typer.Option("--restart", help="Start a new run at step 0 (drops this party's checkpoints once the others "
                                       "agree; pass it to every party)."),
    ] = False,
) -> None:
    """Train the job's model. Every party checkpoints every train.checkpoint_every steps and at each epoch end;
    a rerun of every party's command resumes at the newest step all hold, with the same batches an
    uninterrupted run would see."""
    from vfl_cli.party import PartyContext
    from vfl_cli.train.baseline import train_baseline
    from vfl_cli.train.session import local_threads, run_local, set_threads, train_session
    from vfl_cli.train.workers import launched_worker

    spec = load_job(job)
    key = pick_party(spec, role.value if role else None, party)
    label = key or (role.value if role else "")
    started = time.perf_counter()
    grid = None
    workers = spec.parties[key].workers if key is not None else 1
    if key is not None and workers > 1 and not launched_worker():  # start this party's workers, each this command
        from vfl_cli.train.launcher import launch

        console.print(f"{key}: starting {workers} workers (worker i listens on {spec.parties[key].listen} + i)")
        raise typer.Exit(launch(["train", "--job", str(job), "--party", key, *(["--restart"] if restart else [])],
                                workers))
    if role in (RunRole.central, RunRole.leader_only):
        outcome = train_baseline(spec, role.value, RichReporter(), restart)
    elif key is None:
        set_threads(local_threads(spec))
        outcome = run_local(spec, lambda run: train_session(run, restart),
                            {spec.label_party: RichReporter()})[spec.label_party]
    else:
        ctx = PartyContext.of(spec, key)
        worker = _join_workers(ctx)
        try:
            outcome, grid = _networked(ctx, lambda run: train_session(run, restart), worker)
        finally:
            worker.close()
        if not worker.is_main:  # the party's first worker reports for it
            return
    results = outcome.epochs  # (a resumed session said so on the console when it began)
    rows = [(e, speed, r.scores if r else None) for e, speed, r in results]
    validating = spec.data.valid_fraction > 0
    if rows:
        console.print(epoch_table(rows, f"{spec.name}: {label}", "valid" if validating else "test"))
    final = outcome.final_test if validating else (results[-1][2] if results else None)
    if final is not None:
        if validating:
            typer.echo("selected: the best validation epoch's checkpoint is the one eval and infer use")
        _print_result(f"{label} test", final)
    elif not results:
        typer.echo("nothing to train: the checkpoint has all epochs (use --restart on every party to train again)")
    if grid is not None:
        typer.echo(_traffic(grid, label))
    typer.echo(f"checkpoint: {spec.train.run_dir}  ({time.perf_counter() - started:,.1f} s)")


def _join_workers(ctx: PartyContext) -> Workers:
    """This process's place among the party's workers (a party of one outside torchrun and `vfl train`'s own
    launch). A worker stops on SIGTERM as on Ctrl-C: it tells its peers first."""
    from vfl_cli.train.parties import pick_device
    from vfl_cli.train.workers import join_workers, launched_worker

    if launched_worker():
        signal.signal(signal.SIGTERM, _interrupt)
    return join_workers(ctx.spec.workers, pick_device(ctx.spec.device))


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def evaluate(
    job: JobOption,
    role: Annotated[RunRole | None, typer.Option("--role", help=ROLE_HELP, show_default=False)] = None,
    party: PartyOption = None,
    checkpoint: CheckpointOption = None,
    split: SplitOption = "test",
) -> None:
    """Evaluate the newest checkpoint: the task's metrics at the leader (AUC, log loss, KS; accuracy, macro-F1,
    log loss; RMSE, MAE, R²); the followers only contribute. Every party's newest checkpoint must be of the
    same run and step; otherwise all stop and say which is newer."""
    from vfl_cli.party import PartyContext
    from vfl_cli.train.baseline import evaluate_baseline_checkpoint
    from vfl_cli.train.session import eval_session, local_threads, run_local, set_threads

    spec = load_job(job)
    key = pick_party(spec, role.value if role else None, party)
    run_dir = checkpoint or spec.train.run_dir
    if role in (RunRole.central, RunRole.leader_only):
        result: EvalResult | None = evaluate_baseline_checkpoint(spec, role.value, run_dir, split)
    elif key is None:
        set_threads(local_threads(spec))
        result = run_local(spec, lambda run: eval_session(run, run_dir, split))[spec.label_party]
    else:
        result, _ = _networked(PartyContext.of(spec, key), lambda run: eval_session(run, run_dir, split))
    if result is not None:
        _print_result(f"{key or (role.value if role else '')} {split}", result)
    else:
        typer.echo(f"{key}: sent its part of the {split} split to the leader")


def infer(
    job: JobOption,
    role: Annotated[PartyRole | None, typer.Option("--role", help=PARTY_ROLE_HELP, show_default=False)] = None,
    party: PartyOption = None,
    checkpoint: CheckpointOption = None,
    split: SplitOption = "test",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="CSV of id and the prediction: probability (binary), p_<class> per class "
                     "(multiclass) or value (regression); sample_id instead of id for data without customer ids; "
                     "the leader and local only."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Prepared data to score instead of the job's data.dir, e.g. new customers "
                     "aligned by `vfl psi --out DIR` (then --split all)."),
    ] = None,
) -> None:
    """Predict a prepared split with the newest checkpoint (the same run and step at every party). The leader
    writes the predictions to --out; the followers only compute and send their parts."""
    from vfl_cli.party import PartyContext
    from vfl_cli.reporter import SilentReporter
    from vfl_cli.train.session import infer_session, local_threads, run_local, set_threads

    spec = load_job(job)
    if data is not None:  # a local setting: the job fingerprint leaves data.dir out
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"dir": data})})
    run_dir = checkpoint or spec.train.run_dir
    key = pick_party(spec, role.value if role else None, party)
    follower = key is not None and not spec.is_leader(key)
    if follower and out is not None:
        raise JobError(f"--out: the {key} has no predictions to write; only the leader sees them")
    if not follower and out is None:
        raise JobError("--out: name the CSV file the predictions go to")
    if key is None:
        set_threads(local_threads(spec))
        result = run_local(spec, lambda run: infer_session(run, run_dir, split, out),
                           {spec.label_party: SilentReporter()})[spec.label_party]
    else:
        result, _ = _networked(PartyContext.of(spec, key), lambda run: infer_session(run, run_dir, split, out))
    if result is not None:
        typer.echo(f"wrote {result.rows:,} predictions to {out}")
    else:
        typer.echo(f"{key}: sent its part of the {split} split to the leader")
