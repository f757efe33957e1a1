"""The `vfl` command line: one typer command per verb, each a thin shell over the library.

This is the only place that turns a `VflError` into a printed line and an exit code.
"""

from __future__ import annotations

import logging
import sys

import typer

from vfl_cli import __version__
from vfl_cli.commands import audit, certs, export, init, prep, psi, report, run, serve
from vfl_cli.console import console, print_error
from vfl_cli.errors import VflError


class OneLineFormatter(logging.Formatter):
    """Log records as one line each: tracebacks (from uvicorn, say) only with --verbose."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord(record.__dict__)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return super().format(record)


app = typer.Typer(
    name="vfl",
    help="Vertical federated learning by split learning: a label party and one or more followers train one model, "
    "each party on its own columns; only cut-layer tensors cross the wire, over mutually authenticated HTTPS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("init")(init.init)
app.add_typer(prep.app, name="prep")
app.command("certs")(certs.certs)
app.command("psi")(psi.psi)
app.command("train")(run.train)
app.command("eval")(run.evaluate)
app.command("infer")(run.infer)
app.command("audit")(audit.audit)
app.command("report")(report.report)
app.command("export")(export.export)
app.command("serve")(serve.serve)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug detail to stderr."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        console.print(f"vfl {__version__}")
        raise typer.Exit()
    handler = logging.StreamHandler()
    handler.setFormatter((logging.Formatter if verbose else OneLineFormatter)("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler])


def main() -> None:
    try:
        app()  # standalone: typer prints usage errors itself and exits 2
    except VflError as exc:
        print_error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print_error("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
