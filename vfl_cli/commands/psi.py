"""`vfl psi`: find the customers both parties hold and align each party's table to them (a thin shell over
`vfl_cli.psi.session`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vfl_cli.commands.run import JobOption, PartyRole, connected, waiting_for_peer
from vfl_cli.console import RichReporter
from vfl_cli.job import Role, load_job

if TYPE_CHECKING:
    from vfl_cli.psi.session import PsiOutcome


def psi(
    role: Annotated[PartyRole, typer.Option("--role", help="leader | follower | local.", show_default=False)],
    job: JobOption,
    table: Annotated[
        Path | None,
        typer.Option("--table", help="The table `vfl prep table` wrote (default: <data.dir>/tables/<role>); "
                     "with --role local, a directory holding leader/ and follower/ tables."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="New customers to score: write the aligned rows to <out>/<role> as one split "
                     "`all` (for `vfl infer --data <out> --split all`), not over the training data."),
    ] = None,
) -> None:
    """Private set intersection of the two parties' customer ids (ECDH on ristretto255, over the same
    mutually authenticated HTTPS as training), then each party writes its rows of the intersection, in one
    order both agree on, as its training data (<data.dir>/<role>). Both parties learn which of their own
    customers the other also has, and the other's number of customers; nothing else."""
    from vfl_cli.party import PartyContext
    from vfl_cli.psi.session import psi_locally, psi_session

    spec = load_job(job)
    if role == PartyRole.local:
        tables: dict[Role, Path] | None = {r: table / r for r in ("leader", "follower")} if table else None
        outcomes = psi_locally(spec, tables, out)
    else:
        ctx = PartyContext.of(spec, role.value)
        waiting = waiting_for_peer(ctx)
        with connected(ctx) as peer, waiting:
            outcomes = {ctx.role: psi_session(ctx, peer, RichReporter(waiting=waiting, unit="ids"), table, out)}
    for name, outcome in outcomes.items():
        typer.echo(_summary(name, spec.peer_role(name), outcome))


def _summary(role: str, peer_role: str, outcome: PsiOutcome) -> str:
    found = outcome.intersection
    if list(outcome.rows) == ["all"]:
        written = f"{outcome.rows['all']:,} rows (one split, `all`, to score)"
    else:
        written = " and ".join(f"{rows:,} {name}" for name, rows in outcome.rows.items()) + " rows"
    return (f"{role}: {found.size:,} customers in common, of {found.my_size:,} here and {found.peer_size:,} at the "
            f"{peer_role}; wrote {written} to {outcome.data_dir} (intersection digest {found.digest()[:16]})")
