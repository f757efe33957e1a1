"""`vfl psi`: find the customers both parties hold and align each party's table to them (a thin shell over
`vfl_cli.psi.session`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vfl_cli.commands.run import (
    PARTY_ROLE_HELP,
    JobOption,
    PartyOption,
    PartyRole,
    connected,
    pick_party,
    waiting_for_peer,
)
from vfl_cli.console import RichReporter
from vfl_cli.job import Role, load_job

if TYPE_CHECKING:
    from vfl_cli.psi.session import PsiOutcome


def psi(
    job: JobOption,
    role: Annotated[PartyRole | None, typer.Option("--role", help=PARTY_ROLE_HELP, show_default=False)] = None,
    party: PartyOption = None,
    table: Annotated[
        Path | None,
        typer.Option("--table", help="The table `vfl prep table` wrote (default: <data.dir>/tables/<party>); "
                     "with --role local, a directory holding one table per party (leader/, follower/, ...)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="New customers to score: write the aligned rows to <out>/<role> as one split "
                     "`all` (for `vfl infer --data <out> --split all`), not over the training data."),
    ] = None,
) -> None:
    """Private set intersection of the parties' customer ids (ECDH on ristretto255, over the same mutually
    authenticated HTTPS as training), then each party writes its rows of the customers every party holds, in
    one order all agree on, as its training data (<data.dir>/<party>). The leader runs one PSI with each
    follower: it learns which of its customers each follower also has, and each follower's number of
    customers; a follower learns which of its customers every party holds, and the leader's number; nothing
    else."""
    from vfl_cli.party import PartyContext
    from vfl_cli.psi.session import psi_locally, psi_session

    spec = load_job(job)
    key = pick_party(spec, role.value if role else None, party)
    if key is None:
        tables: dict[Role, Path] | None = {r: table / r for r in spec.parties} if table else None
        outcomes = psi_locally(spec, tables, out)
    else:
        ctx = PartyContext.of(spec, key)
        waiting = waiting_for_peer(ctx)
        with connected(ctx) as grid, waiting:
            outcomes = {ctx.role: psi_session(ctx, grid, RichReporter(waiting=waiting, unit="ids"), table, out)}
    for name, outcome in outcomes.items():
        typer.echo(_summary(name, outcome))


def _summary(role: str, outcome: PsiOutcome) -> str:
    if list(outcome.rows) == ["all"]:
        written = f"{outcome.rows['all']:,} rows (one split, `all`, to score)"
    else:
        written = " and ".join(f"{rows:,} {name}" for name, rows in outcome.rows.items()) + " rows"
    peers = ", ".join(f"{size:,} at the {key}" for key, size in outcome.peer_sizes.items())
    return (f"{role}: {outcome.size:,} customers in common, of {outcome.my_size:,} here and {peers}; "
            f"wrote {written} to {outcome.data_dir} (common-set digest {outcome.digest[:16]}; "
            f"PSI on {outcome.threads} thread{'s' if outcome.threads > 1 else ''})")
