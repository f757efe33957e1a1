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
from rich.text import Text

# Progress and logs go to stderr so that stdout carries only results (AUC lines, file paths).
console = Console(stderr=True, highlight=False)


def print_error(message: str) -> None:
    console.print(Text("error: ", style="bold red") + Text(message))


def print_warning(message: str) -> None:
    console.print(Text("warning: ", style="bold yellow") + Text(message))


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
