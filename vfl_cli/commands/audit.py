"""`vfl audit`: play the curious follower on a real training run and report what the labels leak."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from vfl_cli.console import RichReporter, console
from vfl_cli.job import load_job

if TYPE_CHECKING:
    from vfl_cli.audit import SweepRow  # torch loads only inside the command


def audit(
    job: Annotated[Path, typer.Option("--job", help="Job spec YAML; its data must be prepared (vfl prep).",
                                      show_default=False)],
    sweep: Annotated[
        bool,
        typer.Option("--sweep", help="Audit a fixed list of defences (none; label DP eps 0.5/1/2/4; gradient "
                     "noise x1/x4/x16; Marvell; embedding DP and 1-bit RR; 6- and 2-bit quantisation) and the "
                     "leader-only baseline, instead of the job's own privacy section; writes sweep.csv and "
                     "sweep.png."),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where the audit writes (default: audit/ beside the job's train.run_dir)."),
    ] = None,
) -> None:
    """Train the job locally (both parties in this process, its privacy defences on) while recording every
    gradient the follower receives, then attack the labels with them: per epoch, the leader's test AUC and the
    leak AUC of the direction and norm attacks (0.5 = nothing learnt, 1.0 = every label). Needs both parties'
    prepared data, so it is for simulations and joint reviews; the job's own checkpoints are not touched."""
    from vfl_cli import audit as auditing
    from vfl_cli.train.session import set_threads

    spec = load_job(job)
    target = out or spec.train.run_dir.parent / "audit"
    set_threads(sum(p.threads or 0 for p in spec.parties.values()) or None)
    started = time.perf_counter()
    if not sweep:
        target.mkdir(parents=True, exist_ok=True)
        epochs = auditing.audit_run(spec, target, RichReporter())
        rows = [auditing.SweepRow(", ".join(spec.privacy.enabled) or "none", epochs)]
        console.print(_epoch_table(rows[0], f"{spec.name}: label leakage per epoch"))
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


def _epoch_table(row: SweepRow, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("epoch", "test AUC", "direction leak AUC", "norm leak AUC"):
        table.add_column(name, justify="right")
    for e in row.epochs:
        table.add_row(str(e.epoch), f"{e.test_auc:.4f}", _fmt(e.direction_leak), _fmt(e.norm_leak))
    return table


def _sweep_table(rows: list[SweepRow], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("setting", "test AUC", "cost", "direction leak", "norm leak", "worst epoch: dir / norm"):
        table.add_column(name, justify="left" if name == "setting" else "right")
    none = next((r for r in rows if r.setting == "none"), None)
    for r in rows:
        cost = none.final.test_auc - r.final.test_auc if none else float("nan")
        table.add_row(r.setting, f"{r.final.test_auc:.4f}", f"{cost:+.4f}", _fmt(r.final.direction_leak),
                      _fmt(r.final.norm_leak), f"{_fmt(r.worst_direction)} / {_fmt(r.worst_norm)}")
    return table
