"""`vfl serve`: this party's part of the trained model, online (a thin shell over `vfl_cli.serve.run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vfl_cli.commands.run import PARTY_ROLE_HELP, CheckpointOption, JobOption, PartyOption, PartyRole, pick_party
from vfl_cli.console import console
from vfl_cli.errors import JobError
from vfl_cli.job import load_job

StoreOption = Annotated[
    Path | None,
    typer.Option("--store", help="Prepared party directory to look customers up in (default: <data.dir>/<party>), "
                 "e.g. new customers prepared with `vfl prep table --vocab-from` and aligned with `vfl psi`.",
                 show_default=False),
]
StepOption = Annotated[
    int | None,
    typer.Option("--step", help="Serve this step of the run (default: the selected checkpoint, else the newest).",
                 show_default=False),
]


def serve(
    job: JobOption,
    role: Annotated[PartyRole | None, typer.Option("--role", help=PARTY_ROLE_HELP, show_default=False)] = None,
    party: PartyOption = None,
    checkpoint: CheckpointOption = None,
    store: StoreOption = None,
    step: StepOption = None,
) -> None:
    """Serve this party's part of the trained model until SIGTERM or Ctrl-C; start every party.

    The label party answers its applications' POST /v1/predict {"ids": [...]} on serve.listen (HTTPS; a bearer
    token from serve.token_env or serve.token_file, or a client certificate named in serve.clients; docs at /docs),
    asking each follower for its part in one round trip per batch. A follower answers the label party alone, on
    its listen address (or serve.follower_listen). SIGHUP at the label party, or POST /v1/admin/reload, moves every
    party to the selected checkpoint."""
    from vfl_cli.party import PartyContext
    from vfl_cli.serve.run import serve_follower, serve_leader
    from vfl_cli.train.session import set_threads

    spec = load_job(job)
    key = pick_party(spec, role.value if role else None, party)
    if key is None:
        raise JobError("--role local: serving runs one process per party (--party KEY)")
    ctx = PartyContext.of(spec, key)
    set_threads(ctx.spec.threads)
    run_dir = checkpoint or spec.train.run_dir
    store_dir = store or spec.data.dir / key
    if ctx.is_leader:
        serve_leader(ctx, run_dir, store_dir, step, console.print)
    else:
        if step is not None:
            raise JobError("--step: given at the label party, which asks every follower for that step")
        serve_follower(ctx, run_dir, store_dir, console.print)
