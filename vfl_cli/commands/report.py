"""`vfl report`: PNG plots and a one-page HTML summary of a training run, from its leader's metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vfl_cli.errors import JobError
from vfl_cli.job import load_job

# No torch on this path: the report reads JSON lines and meta.json and draws with matplotlib (loaded lazily).


def report(
    run: Annotated[
        Path | None,
        typer.Option("--run", help="The run dir `vfl train` wrote (the job's train.run_dir; reads "
                     "<run>/leader/metrics.jsonl). Default with --job: the job's train.run_dir.", show_default=False),
    ] = None,
    job: Annotated[
        Path | None,
        typer.Option("--job", help="Job spec YAML: adds the parties, model, training settings, privacy defences "
                     "and prepared data sizes to the page.", show_default=False),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where to write report.html and the PNGs (default: <run>/report).",
                     show_default=False),
    ] = None,
) -> None:
    """Plot a training run (loss.png: losses per step; metric.png: the task's primary metric, AUC, accuracy or
    RMSE, on validation and test per epoch, the selected epoch marked; speed.png: train samples/s per epoch) and
    write report.html beside them: the job, data sizes, every metric of the task per epoch, the final test's and
    the baselines' where they ran. Prints the page's path."""
    from vfl_cli.report import build_report

    spec = load_job(job) if job is not None else None
    run_dir = run or (spec.train.run_dir if spec is not None else None)
    if run_dir is None:
        raise JobError("vfl report: give --run DIR (the job's train.run_dir) or --job J")
    typer.echo(build_report(run_dir, out or run_dir / "report", spec))
