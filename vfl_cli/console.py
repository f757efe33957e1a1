"""Everything rich: the shared console, error lines, progress bars. Library code never imports this module;
it reports through callbacks that the CLI wires to these functions."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.status import Status
from rich.table import Table
from rich.text import Text

# Progress and logs go to stderr so that stdout carries only results (AUC lines, file paths).
console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_error(message: str) -> None:
    console.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)


def print_warning(message: str) -> None:
    console.print(Text("warning: ", style="bold yellow") + Text(message), soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second, e.g. `412,000 rows/s`."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


def make_progress(unit: str) -> Progress:
    """A progress bar with a rate in `unit`/s and an ETA; plain (no live redraw) when not on a terminal."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=bool(os.environ.get("VFL_NO_PROGRESS")),
        transient=False,
    )


class RichReporter:
    """Draws the training loop's progress: a bar per phase with samples/s (or `unit`/s) and ETA, and the
    seed's log lines."""

    def __init__(self, waiting: Status | None = None, unit: str = "samples") -> None:
        self._progress: Progress | None = None
        self._waiting = waiting  # a spinner to stop once work begins (rich shows one live display at a time)
        self._unit = unit

    def begin(self, description: str, total_samples: int) -> None:
        if self._waiting is not None:
            self._waiting.stop()
            self._waiting = None
        self._progress = make_progress(self._unit)
        self._progress.start()
        self._task = self._progress.add_task(description, total=total_samples)

    def advance(self, samples: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, samples)

    def log(self, line: str) -> None:
        console.print(line, soft_wrap=True)

    def end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def epoch_table(rows: list[tuple[int, float, dict[str, float] | None]], title: str, scored: str = "test") -> Table:
    """Epoch, train samples/s, and the task's metrics on the split scored each epoch (valid, or test)."""
    from vfl_cli.metric_names import TITLES

    names = next((list(scores) for _, _, scores in rows if scores), [])
    table = Table(title=title, title_justify="left")
    for name in ("epoch", "samples/s", *(f"{scored} {TITLES.get(n, n)}" for n in names)):
        table.add_column(name, justify="right")
    for epoch, speed, scores in rows:
        table.add_row(str(epoch), f"{speed:,.0f}", *("-" if scores is None else f"{scores[n]:.6f}" for n in names))
    return table
