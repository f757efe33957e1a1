"""How long work (training, evaluation, the PSI) tells the outside world what it is doing: the `Reporter`
protocol the loops call, and `SilentReporter` for tests and background runs. The CLI draws it with rich
(`vfl_cli.console.RichReporter`)."""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    """How the loop tells the outside world what it is doing (the CLI draws it with rich)."""

    def begin(self, description: str, total_samples: int) -> None: ...
    def advance(self, samples: int) -> None: ...
    def log(self, line: str) -> None: ...
    def end(self) -> None: ...


class SilentReporter:
    def begin(self, description: str, total_samples: int) -> None:
        pass

    def advance(self, samples: int) -> None:
        pass

    def log(self, line: str) -> None:
        pass

    def end(self) -> None:
        pass
