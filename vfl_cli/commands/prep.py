"""`vfl prep`: turn raw Criteo text into each party's arrays (`criteo`), or write synthetic Criteo text (`synth`).

A thin shell over `data_prep`: it reads the job, wires the library's progress callbacks to rich bars and
prints a short summary. Errors travel as `VflError` to `vfl_cli.app.main`, which prints one line.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, TaskID

from data_prep.criteo import PrepResult, prepare_criteo
from data_prep.synth import write_synth
from vfl_cli.console import console, make_progress
from vfl_cli.job import ROLES, Role, load_job

app = typer.Typer(
    help="Prepare data: encode raw Criteo text into each party's arrays, or write synthetic Criteo text.",
    no_args_is_help=True,
)


class RoleChoice(str, enum.Enum):
    leader = "leader"
    follower = "follower"


class _Bars:
    """Maps the library's (phase, rows done, rows total) reports onto one rich task per phase."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}
        self.labels = {"count": "pass 1/2 count", "encode": "pass 2/2 encode"}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(self.labels.get(phase, phase), total=total)
        task_id = self.tasks[phase]
        # Pass 1's total is an estimate that moves with every batch, and Progress.update(total=...) clears the
        # samples behind the rows/s column whenever the total changes; so set the total on the task itself.
        task = next(task for task in self.progress.tasks if task.id == task_id)
        task.total = total
        self.progress.update(task_id, completed=done)


def _say(line: str) -> None:
    console.print(line, soft_wrap=True)  # long paths stay on one line


def _summary(result: PrepResult, bench: bool) -> None:
    rows = result.split_rows
    _say(
        f"prepared {rows['train'] + rows['test']:,} rows into {result.out}: "
        f"train {rows['train']:,}, test {rows['test']:,}"
    )
    for role, size in result.vocab_sizes.items():
        _say(f"  {role}: vocabulary {size:,} ids")
    if result.label_rate is not None:
        _say(f"  label rate {result.label_rate:.4f}")
    _say(f"  {result.rows_per_s:,.0f} rows/s over both passes")
    if bench:
        for stats in result.passes:
            rate = stats.rows / max(stats.seconds, 1e-9)
            rss = stats.peak_rss_mb
            _say(f"  bench {stats.phase}: {rate:,.0f} rows/s, {stats.seconds:.2f} s, peak RSS {rss:,.0f} MB")


@app.command()
def criteo(
    input: Annotated[
        Path,
        typer.Option("--input", help="Raw Criteo train.txt: label, I1..I13, C1..C26, tab separated; plain or .gz."),
    ],
    job: Annotated[Path, typer.Option("--job", help="Job file; gives the parties' fields, seed and data settings.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output directory; <out>/<role>/ is written. Default: the job's data.dir."),
    ] = None,
    threshold: Annotated[
        int | None,
        typer.Option(
            "--threshold",
            min=0,
            help="A categorical value seen more than this many times gets its own id. "
            "Default: the job's data.threshold.",
        ),
    ] = None,
    role: Annotated[
        RoleChoice | None,
        typer.Option("--role", help="Prepare only this party's view, reading only its columns. Default: both parties."),
    ] = None,
    bench: Annotated[bool, typer.Option("--bench", help="Also print rows/s and peak RSS for each pass.")] = False,
) -> None:
    """Encode raw Criteo text into each party's ids/vals arrays, in two streaming passes."""
    spec = load_job(job)
    roles: tuple[Role, ...] = (role.value,) if role is not None else ROLES
    with make_progress("rows") as progress:
        result = prepare_criteo(
            input,
            spec,
            out if out is not None else spec.data.dir,
            threshold if threshold is not None else spec.data.threshold,
            roles,
            on_progress=_Bars(progress),
        )
    _summary(result, bench)


@app.command()
def synth(
    rows: Annotated[int, typer.Option("--rows", min=1, help="Number of lines to write.")],
    out: Annotated[Path, typer.Option("--out", help="Output file in Criteo train.txt format; a .gz name writes gzip.")],
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed and rows give the same file.")] = 0,
) -> None:
    """Write synthetic Criteo-format text with a learnable signal spread over both parties' fields."""
    with make_progress("rows") as progress:
        task = progress.add_task("synth", total=rows)
        write_synth(out, rows, seed, on_rows=lambda count: progress.advance(task, count))
    _say(f"wrote {rows:,} synthetic rows to {out}")
