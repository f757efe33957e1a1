"""`vfl audit`: play each curious follower on a real training run and report what the labels leak to it (binary:
leak AUC of every attack; multiclass: the clustering attack's label-inference accuracy against the majority share),
one table per follower when there are several."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from vfl_cli.console import RichReporter, console
from vfl_cli.job import load_job

if TYPE_CHECKING:
    from vfl_cli.audit import AuditResult  # torch loads only inside the command


def audit(
    job: Annotated[Path, typer.Option("--job", help="Job spec YAML; its data must be prepared (vfl prep).",
                                      show_default=False)],
    sweep: Annotated[
        bool,
        typer.Option("--sweep", help="Audit a fixed list of defences (none; label DP eps 0.5/1/2; gradient "
                     "noise x1/x4/x16; Marvell power 4/16/32/64, alone and with label DP; embedding DP; 6-bit "
                     "quantisation) and the leader-only baseline, instead of the job's own privacy section; "
                     "writes sweep.csv and sweep.png."),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where the audit writes (default: audit/ beside the job's train.run_dir)."),
    ] = None,
) -> None:
    """Train the job locally as it runs (every party in this process, its privacy defences, validation and model
    selection on) while recording every gradient each follower receives, then attack the labels with each
    follower's own gradients (what that follower holds); with more than one follower, one table per follower. Binary
    labels: every attack we know (unsupervised per batch and pooled, with 1% and 5% of the labels known, and each
    averaged over the epochs kept), scored as leak AUC (0.5 = nothing learnt, 1.0 = every label); prints the run's
    test AUC and, per epoch, the strongest attack, named. Multiclass labels: each batch's gradients clustered into
    one group per class, scored as label-inference accuracy under the best cluster-to-class mapping; prints it per
    epoch beside the majority class's share (what guessing gets) and how far above that share it is. Regression
    labels are refused (exit 2). Needs every party's prepared data, so it is for simulations and joint reviews; the
    job's own checkpoints are not touched. The sweep's table names, per setting, the strongest attack over every
    follower."""
    from vfl_cli import audit as auditing
    from vfl_cli.train.session import local_threads, set_threads

    spec = load_job(job)
    auditing.check_auditable(spec, sweep)  # before any training
    target = out or spec.train.run_dir.parent / "audit"
    set_threads(local_threads(spec))
    started = time.perf_counter()
    if not sweep:
        target.mkdir(parents=True, exist_ok=True)
        result = auditing.audit_run(spec, target, RichReporter())
        several = len(result.followers) > 1
        for key in result.followers:  # one table per follower, each attacked on its own gradients
            one = result.of(key)
            whose = f"follower {key}'s " if several else ""
            title = (f"{spec.name} ({result.setting}): {whose}label leakage per epoch, test {_title(result.metric)} "
                     f"{result.test_score:.4f}")
            if result.task == "multiclass":
                console.print(_clustering_table(one, title))
                console.print(_clustering_summary(one, key if several else ""))
            else:
                console.print(_epoch_table(one, title))
        typer.echo(f"audit: {target}  ({time.perf_counter() - started:,.1f} s)")
        return

    def progress(index: int, total: int, name: str) -> RichReporter:
        console.print(f"[{index}/{total}] {name}")
        return RichReporter()

    target.mkdir(parents=True, exist_ok=True)
    results = auditing.sweep(spec, target, progress)
    auditing.plot(results, target / "sweep.png", f"{spec.name}: test AUC against label leakage")
    console.print(_sweep_table(results, f"{spec.name}: defences against a curious follower"))
    typer.echo(f"table: {target / 'sweep.csv'}\nplot: {target / 'sweep.png'}  ({time.perf_counter() - started:,.1f} s)")


def _fmt(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"  # NaN: no gradients (the leader-only row)


def _title(metric: str) -> str:
    from vfl_cli.metric_names import TITLES

    return TITLES.get(metric, metric)


def _clustering_table(result: AuditResult, title: str) -> Table:
    """Multiclass: per epoch, the clustering attack's inference accuracy beside what guessing gets."""
    table = Table(title=title, title_justify="left")
    for name in ("epoch", f"scored {_title(result.metric)}", "inference accuracy", "majority share",
                 "above majority", "labels shuffled"):
        table.add_column(name, justify="right")
    for e in result.epochs:
        accuracy = e.strongest[1]  # the one attack: k-means per batch
        table.add_row(str(e.epoch), f"{e.scored:.4f}", _fmt(accuracy), _fmt(e.majority),
                      _signed(accuracy - e.majority), _fmt(e.floor))
    return table


def _clustering_summary(result: AuditResult, whose: str = "") -> str:
    """One line: the best epoch's inference accuracy and how far above the majority share it is (`whose`: the
    follower's key, when there are several)."""
    attack, accuracy, epoch = result.strongest
    if epoch < 0:
        return f"label inference{f' (follower {whose})' if whose else ''}: no batch with more rows than classes to " \
            "cluster"
    at = next(e for e in result.epochs if e.epoch == epoch)
    named = f"follower {whose}, {attack}" if whose else attack
    return (f"label inference ({named}): accuracy {accuracy:.3f} at epoch {epoch}, {_signed(accuracy - at.majority)} "
            f"above the majority share {at.majority:.3f} (the same clusters against shuffled labels: {at.floor:.3f})")


def _signed(value: float) -> str:
    return "-" if value != value else f"{value:+.3f}"


def _epoch_table(result: AuditResult, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("epoch", f"scored {_title(result.metric)}", "strongest attack", "leak AUC", "direction", "norm"):
        table.add_column(name, justify="left" if name == "strongest attack" else "right")
    for e in result.epochs:
        attack, leak = e.strongest
        table.add_row(str(e.epoch), f"{e.scored:.4f}", attack, _fmt(leak),
                      _fmt(e.leaks.get("direction per batch", math.nan)), _fmt(e.leaks.get("norm per batch", math.nan)))
    return table


def _sweep_table(rows: list[AuditResult], title: str) -> Table:
    """A line per setting; with more than one follower, the strongest attack over every follower, named."""
    several = any(len(r.followers) > 1 for r in rows)
    table = Table(title=title, title_justify="left")
    strongest = "strongest attack over all followers (follower: attack, epoch)" if several else \
        "strongest attack (epoch)"
    for name in ("setting", "test AUC", "cost", strongest, "leak AUC", "direction", "norm"):
        table.add_column(name, justify="left" if name in ("setting", strongest) else "right")
    none = next((r for r in rows if r.setting == "none"), None)
    for r in rows:
        cost = none.test_score - r.test_score if none else math.nan
        follower, attack, leak, epoch = r.leakiest if r.followers else ("-", *r.strongest)
        epochs = r.followers[follower] if follower in r.followers else r.epochs
        last = epochs[-1].leaks if epochs else {}
        at = f"{follower}: {attack}" if several else attack
        table.add_row(r.setting, f"{r.test_score:.4f}", f"{cost:+.4f}", f"{at} ({epoch})" if epoch >= 0 else "-",
                      _fmt(leak), _fmt(last.get("direction per batch", math.nan)),
                      _fmt(last.get("norm per batch", math.nan)))
    return table
