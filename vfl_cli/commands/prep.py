"""`vfl prep`: raw Criteo text -> each party's arrays (`criteo`); one party's own table -> its arrays (`table`);
one Criteo file -> two organisations' tables (`split`, a simulation); synthetic Criteo text (`synth`).

A thin shell over `data_prep`: it reads the job, wires the library's progress callbacks to rich bars and
prints a short summary. Errors travel as `VflError` to `vfl_cli.app.main`, which prints one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, TaskID

from data_prep.criteo import PassStats, PrepResult, prepare_criteo
from data_prep.split import split_parties
from data_prep.store import table_dir
from data_prep.synth import write_synth
from data_prep.table import TableResult, prepare_table
from vfl_cli.console import console, make_progress
from vfl_cli.errors import DataError
from vfl_cli.job import load_job

app = typer.Typer(
    help="Prepare data: encode raw Criteo text or one party's own table into arrays, split a Criteo file into two "
    "parties' tables, or write synthetic Criteo text.",
    no_args_is_help=True,
)



class _Bars:
    """Maps the library's (phase, rows done, rows total) reports onto one rich task per phase."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}
        self.labels = {"count": "pass 1/2 count", "ids": "pass 1/2 ids", "encode": "pass 2/2 encode"}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(self.labels.get(phase, phase), total=total)
        task_id = self.tasks[phase]
        # Pass 1's total is an estimate that moves with every batch, and Progress.update(total=...) clears the
        # samples behind the rows/s column whenever the total changes; so set the total on the task itself.
        task = next(task for task in self.progress.tasks if task.id == task_id)
        task.total = total
        self.progress.update(task_id, completed=done)


BenchOption = Annotated[bool, typer.Option("--bench", help="Also print rows/s and peak RSS for each pass.")]


def _say(line: str) -> None:
    console.print(line, soft_wrap=True)  # long paths stay on one line


def _speed(rows_per_s: float, passes: Sequence[PassStats], bench: bool) -> None:
    _say(f"  {rows_per_s:,.0f} rows/s over both passes")
    if bench:
        for stats in passes:
            rate, rss = stats.rows / max(stats.seconds, 1e-9), stats.peak_rss_mb
            _say(f"  bench {stats.phase}: {rate:,.0f} rows/s, {stats.seconds:.2f} s, peak RSS {rss:,.0f} MB")


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
    _speed(result.rows_per_s, result.passes, bench)


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
        str | None,
        typer.Option("--party", "--role", help="Prepare only this party's view (its key in `parties:`), reading only "
                     "its columns. Default: every party."),
    ] = None,
    bench: BenchOption = False,
    test: Annotated[
        list[Path] | None,
        typer.Option("--test", help="A held-out raw Criteo file to use as the test split (repeat for several, e.g. "
                     "dev.txt and test.txt); then every --input row trains and data.test_fraction is not used."),
    ] = None,
) -> None:
    """Encode raw Criteo text into each party's ids/vals arrays, in two streaming passes."""
    spec = load_job(job)
    roles = (spec.party_key(role),) if role is not None else tuple(spec.parties)
    schemas = [spec.table_schema(r) for r in roles]
    if threshold is not None:
        schemas = [replace(schema, threshold=threshold) for schema in schemas]
    with make_progress("rows") as progress:
        result = prepare_criteo(
            input,
            schemas,
            out if out is not None else spec.data.dir,
            seed=spec.seed,
            test_fraction=spec.data.test_fraction,
            on_progress=_Bars(progress),
            test_files=test or (),
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


_DELIMITERS = {",": ",", "comma": ",", "\t": "\t", "\\t": "\t", "tab": "\t"}


@app.command()
def table(
    role: Annotated[str, typer.Option("--party", "--role", help="Whose table this is: the party's key in "
                                      "`parties:` (leader, follower, follower2, ...).", show_default=False)],
    input: Annotated[
        Path,
        typer.Option(
            "--input",
            help="The party's table: CSV or TSV with a header row (plain or .gz), or Parquet (.parquet, .pq); the "
            "id column, the party's columns by name and (leader) the label column; other columns are ignored.",
        ),
    ],
    job: Annotated[Path, typer.Option("--job", help="Job file; gives the columns and their kinds, the id and label "
                                      "columns, the task, the threshold and the scaling.")],
    delimiter: Annotated[
        str | None,
        typer.Option("--delimiter", help="',' or tab ('\\t' or 'tab'). Default: tab if the header has one, else ','."),
    ] = None,
    vocab_from: Annotated[
        Path | None,
        typer.Option(
            "--vocab-from",
            help="Encode with this prepared party directory's vocab.json, dense_max.json and classes (e.g. a "
            "trained model's) instead of fitting them; unseen values get the OOV id; the leader's label is optional.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output directory (written whole). Default: <data.dir>/tables/<role>."),
    ] = None,
    bench: BenchOption = False,
) -> None:
    """Encode one party's own table (keyed by customer id) into its arrays, in two streaming passes."""
    spec = load_job(job)
    if delimiter is not None and delimiter not in _DELIMITERS:
        raise DataError(f"--delimiter must be ',' or tab ('\\t' or 'tab'), got {delimiter!r}")
    key = spec.party_key(role)
    target = out if out is not None else table_dir(spec.data.dir, key)
    with make_progress("rows") as progress:
        result = prepare_table(
            input,
            spec.table_schema(key),
            target,
            delimiter=_DELIMITERS[delimiter] if delimiter is not None else None,
            vocab_from=vocab_from,
            on_progress=_Bars(progress),
        )
    _table_summary(key, spec.is_leader(key), result, vocab_from, bench)


def _table_summary(role: str, leader: bool, result: TableResult, vocab_from: Path | None, bench: bool) -> None:
    fitted = f"vocabulary of {vocab_from}" if vocab_from is not None else "vocabulary fitted on these rows"
    _say(f"prepared the {role}'s table, {result.rows:,} rows, into {result.out}")
    _say(f"  {fitted}: {result.vocab_size:,} ids; customer ids up to {result.id_width} bytes")
    if result.label_rate is not None:
        _say(f"  label rate {result.label_rate:.4f}")
    elif result.task == "multiclass":
        shown = ", ".join(result.classes[:10]) + (", ..." if len(result.classes) > 10 else "")
        _say(f"  {len(result.classes)} classes: {shown}")
    elif result.task == "regression":
        _say("  regression labels")
    elif leader:
        _say("  no label column: unlabelled rows (scoring)")
    _speed(result.rows_per_s, result.passes, bench)


@app.command()
def split(
    input: Annotated[
        Path, typer.Option("--input", help="Raw Criteo train.txt (label, I1..I13, C1..C26, tab separated; or .gz).")
    ],
    job: Annotated[Path, typer.Option("--job", help="Job file; gives each party's fields and id/label column names.")],
    overlap: Annotated[
        float,
        typer.Option(
            "--overlap",
            min=0.0,
            max=1.0,
            help="Share of source rows every table holds; the rest go to one table only, an equal share each.",
        ),
    ],
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seeds membership, row orders and customer ids. Default: the job's.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Directory for <party>.tsv per party (leader.tsv, follower.tsv, ...). Default: "
                     "<data.dir>/../organisations."),
    ] = None,
) -> None:
    """Simulate the organisations: cut one Criteo file into each party's own table (TSV)."""
    spec = load_job(job)
    target = out if out is not None else spec.data.dir.parent / "organisations"
    with make_progress("rows") as progress:
        schemas = [spec.table_schema(r) for r in spec.keys]
        result = split_parties(input, schemas, overlap, spec.seed if seed is None else seed, target,
                               on_progress=_Bars(progress))
    for role, (path, rows) in result.tables.items():
        _say(f"{role}: {rows:,} rows -> {path}")
    _say(f"shared: {result.shared:,} customers of {result.source_rows:,} source rows (overlap {overlap:g})")
