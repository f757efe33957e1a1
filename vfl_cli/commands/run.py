"""`vfl train`, `vfl eval`, `vfl infer`: pick the role, wire the peer and the console, run the session."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from vfl_cli.console import RichReporter, console, epoch_table
from vfl_cli.errors import JobError
from vfl_cli.job import load_job

if TYPE_CHECKING:
    from rich.status import Status

    from vfl_cli.party import PartyContext
    from vfl_cli.peer import Peer
    from vfl_cli.telemetry import Telemetry
    from vfl_cli.train.loop import EvalResult, PartyRun
    from vfl_cli.transport.https_peer import HttpsPeer

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
    "leader | follower: this party, talking to the other over HTTPS. "
    "local: both parties in this process. central | leader-only: baselines without federation."
)
JobOption = Annotated[Path, typer.Option("--job", help="Job spec YAML, e.g. jobs/criteo.yaml.", show_default=False)]
CheckpointOption = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="Run directory written by `vfl train` (default: the job's train.run_dir)."),
]
SplitOption = Annotated[str, typer.Option("--split", help="Prepared split to read: test or train.")]


@contextmanager
def connected(ctx: PartyContext) -> Iterator[HttpsPeer]:
    """The HTTPS peer for a two-process run, and the metrics listener when the job names one; on any failure
    here, tell the peer before leaving."""
    from vfl_cli.telemetry import Telemetry, start_metrics_server
    from vfl_cli.train.session import set_threads
    from vfl_cli.transport.https_peer import HttpsPeer

    job, role = ctx.job, ctx.role
    set_threads(ctx.spec.threads)
    telemetry = Telemetry(role)
    peer = HttpsPeer(ctx, telemetry)
    console.print(f"{role} listening on {ctx.spec.listen}")
    try:
        metrics = start_metrics_server(job, role, telemetry, lambda: _health(telemetry))
    except BaseException:
        peer.close()
        raise
    if metrics is not None:
        console.print(f"{role} metrics on http://{metrics.host}:{metrics.port}/metrics")
    try:
        yield peer
    except BaseException as exc:
        peer.abort(f"{role} stopped: {exc}" if str(exc) else f"{role} stopped")
        raise
    finally:
        peer.close()
        if metrics is not None:
            metrics.stop()


def _health(telemetry: Telemetry) -> dict[str, str]:
    return {"status": "ok", "role": telemetry.role, "steps": f"{telemetry.value('vfl_steps_total'):.0f}"}


def waiting_for_peer(ctx: PartyContext) -> Status:
    """The console spinner shown until the peer answers the handshake."""
    return console.status(f"waiting for the {ctx.peer_role} at {ctx.peer.connect_to} "
                          f"(up to {ctx.job.transport.connect_timeout_s:g} s)")


def _two_party(ctx: PartyContext, session: Callable[[PartyRun], T]) -> tuple[T, Peer]:
    from vfl_cli.train.session import open_run

    waiting = waiting_for_peer(ctx)
    with connected(ctx) as peer, waiting:
        # The spinner runs through the handshake; the reporter stops it when the first batch starts.
        return session(open_run(ctx, peer, RichReporter(waiting=waiting), peer.telemetry)), peer


def _print_result(label: str, result: EvalResult) -> None:
    from vfl_cli.task import describe

    typer.echo(f"{label}: {describe(result.scores)}  rows {result.rows}")


def _traffic(peer: Peer, role: str) -> str:
    sent, received = getattr(peer, "bytes_sent", 0), getattr(peer, "bytes_received", 0)
    return f"{role} sent {sent / 1e6:,.2f} MB, received {received / 1e6:,.2f} MB"


def train(
    role: Annotated[RunRole, typer.Option("--role", help=ROLE_HELP, show_default=False)],
    job: JobOption,
    restart: Annotated[
        bool,
        typer.Option("--restart", help="Start a new run at step 0 (drops this side's checkpoints once the peer "
                                       "agrees; pass it on both sides)."),
    ] = False,
) -> None:
    """Train the job's model. Both parties checkpoint every train.checkpoint_every steps and at each epoch end;
    a rerun resumes at the newest step both hold, with the same batches an uninterrupted run would see."""
    from vfl_cli.party import PartyContext
    from vfl_cli.train.baseline import train_baseline
    from vfl_cli.train.session import local_threads, run_local, set_threads, train_session

    spec = load_job(job)
    started = time.perf_counter()
    if role in (RunRole.central, RunRole.leader_only):
        outcome = train_baseline(spec, role.value, RichReporter(), restart)
        peer = None
    elif role == RunRole.local:
        set_threads(local_threads(spec))
        outcome = run_local(spec, lambda run: train_session(run, restart), {"leader": RichReporter()})["leader"]
        peer = None
    else:
        outcome, peer = _two_party(PartyContext.of(spec, role.value), lambda run: train_session(run, restart))
    results = outcome.epochs  # (a resumed session said so on the console when it began)
    rows = [(e, speed, r.scores if r else None) for e, speed, r in results]
    validating = spec.data.valid_fraction > 0
    if rows:
        console.print(epoch_table(rows, f"{spec.name}: {role.value}", "valid" if validating else "test"))
    final = outcome.final_test if validating else (results[-1][2] if results else None)
    if final is not None:
        if validating:
            typer.echo("selected: the best validation epoch's checkpoint is the one eval and infer use")
        _print_result(f"{role.value} test", final)
    elif not results:
        typer.echo("nothing to train: the checkpoint has all epochs (use --restart on both sides to train again)")
    if peer is not None:
        typer.echo(_traffic(peer, role.value))
    typer.echo(f"checkpoint: {spec.train.run_dir}  ({time.perf_counter() - started:,.1f} s)")


def evaluate(
    role: Annotated[RunRole, typer.Option("--role", help=ROLE_HELP, show_default=False)],
    job: JobOption,
    checkpoint: CheckpointOption = None,
    split: SplitOption = "test",
) -> None:
    """Evaluate the newest checkpoint: the task's metrics at the leader (AUC, log loss, KS; accuracy, macro-F1,
    log loss; RMSE, MAE, R²); the follower only contributes.
    Both sides' newest checkpoints must be of the same run and step; otherwise both stop and say which is newer."""
    from vfl_cli.party import PartyContext
    from vfl_cli.train.baseline import evaluate_baseline_checkpoint
    from vfl_cli.train.session import eval_session, local_threads, run_local, set_threads

    spec = load_job(job)
    run_dir = checkpoint or spec.train.run_dir
    if role in (RunRole.central, RunRole.leader_only):
        result: EvalResult | None = evaluate_baseline_checkpoint(spec, role.value, run_dir, split)
    elif role == RunRole.local:
        set_threads(local_threads(spec))
        result = run_local(spec, lambda run: eval_session(run, run_dir, split))["leader"]
    else:
        result, _ = _two_party(PartyContext.of(spec, role.value), lambda run: eval_session(run, run_dir, split))
    if result is not None:
        _print_result(f"{role.value} {split}", result)
    else:
        typer.echo(f"follower: sent its part of the {split} split to the leader")


def infer(
    role: Annotated[PartyRole, typer.Option("--role", help="leader | follower | local.", show_default=False)],
    job: JobOption,
    checkpoint: CheckpointOption = None,
    split: SplitOption = "test",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="CSV of id and the prediction: probability (binary), p_<class> per class "
                     "(multiclass) or value (regression); sample_id instead of id for data without customer ids; "
                     "leader and local only."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Prepared data to score instead of the job's data.dir, e.g. new customers "
                     "aligned by `vfl psi --out DIR` (then --split all)."),
    ] = None,
) -> None:
    """Predict a prepared split with the newest checkpoint (the same run and step on both sides). The leader
    writes the predictions to --out; the follower only computes and sends its part."""
    from vfl_cli.party import PartyContext
    from vfl_cli.reporter import SilentReporter
    from vfl_cli.train.session import infer_session, local_threads, run_local, set_threads

    spec = load_job(job)
    if data is not None:  # a local setting: the job fingerprint leaves data.dir out
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"dir": data})})
    run_dir = checkpoint or spec.train.run_dir
    if role == PartyRole.follower and out is not None:
        raise JobError("--out: the follower has no predictions to write; only the leader sees them")
    if role != PartyRole.follower and out is None:
        raise JobError("--out: name the CSV file the predictions go to")
    if role == PartyRole.local:
        set_threads(local_threads(spec))
        result = run_local(spec, lambda run: infer_session(run, run_dir, split, out),
                           {"leader": SilentReporter()})["leader"]
    else:
        result, _ = _two_party(PartyContext.of(spec, role.value), lambda run: infer_session(run, run_dir, split, out))
    if result is not None:
        typer.echo(f"wrote {result.rows:,} predictions to {out}")
    else:
        typer.echo(f"follower: sent its part of the {split} split to the leader")
