"""`vfl audit`: play the curious follower on a real training run and report what the labels leak."""

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
    """Train the job locally as it runs (both parties in this process, its privacy defences, validation and model
    selection on) while recording every gradient the follower receives, then attack the labels with them: every
    attack we know (unsupervised per batch and pooled, with 1% and 5% of the labels known, and each averaged over
    the epochs kept), scored as leak AUC (0.5 = nothing learnt, 1.0 = every label). Prints the run's test AUC and,
    per epoch, the strongest attack, named. Needs both parties' prepared data, so it is for simulations and joint
    reviews; the job's own checkpoints are not touched."""
    from vfl_cli import audit as auditing
    from vfl_cli.train.session import set_threads

    spec = load_job(job)
    target = out or spec.train.run_dir.parent / "audit"
    set_threads(sum(p.threads or 0 for p in spec.parties.values()) or None)
    started = time.perf_counter()
    if not sweep:
        target.mkdir(parents=True, exist_ok=True)
        result = auditing.audit_run(spec, target, RichReporter())
        console.print(_epoch_table(result, f"{spec.name} ({result.setting}): label leakage per epoch, test AUC "
                                   f"{result.test_auc:.4f}"))
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


def _epoch_table(result: AuditResult, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("epoch", "scored AUC", "strongest attack", "leak AUC", "direction", "norm"):
        table.add_column(name, justify="left" if name == "strongest attack" else "right")
    for e in result.epochs:
        attack, leak = e.strongest
        table.add_row(str(e.epoch), f"{e.scored_auc:.4f}", attack, _fmt(leak),
                      _fmt(e.leaks.get("direction per batch", math.nan)), _fmt(e.leaks.get("norm per batch", math.nan)))
    return table


def _sweep_table(rows: list[AuditResult], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("setting", "test AUC", "cost", "strongest attack (epoch)", "leak AUC", "direction", "norm"):
        table.add_column(name, justify="left" if name in ("setting", "strongest attack (epoch)") else "right")
    none = next((r for r in rows if r.setting == "none"), None)
    for r in rows:
        cost = none.test_auc - r.test_auc if none else math.nan
        attack, leak, epoch = r.strongest
        last = r.epochs[-1].leaks if r.epochs else {}
        table.add_row(r.setting, f"{r.test_auc:.4f}", f"{cost:+.4f}", f"{attack} ({epoch})" if epoch >= 0 else "-",
                      _fmt(leak), _fmt(last.get("direction per batch", math.nan)),
                      _fmt(last.get("norm per batch", math.nan)))
    return table
