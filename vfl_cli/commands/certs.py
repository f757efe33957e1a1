"""`vfl certs`: make a dev CA and one certificate + key per party for a job (a thin shell over
`vfl_cli.transport.tls.make_dev_certs`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vfl_cli.console import console, print_warning
from vfl_cli.job import load_job
from vfl_cli.transport.tls import make_dev_certs


def certs(
    job: Annotated[
        Path, typer.Option("--job", help="Job YAML file: party names, listen hosts, key passwords.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Directory for ca.pem, ca.key, leader.pem/.key, follower.pem/.key. "
            "Default: the job's own cert, key and tls.ca paths.",
        ),
    ] = None,
) -> None:
    """Make a development CA and a certificate per party (CN = party name, SAN = its listen host).

    Keys are encrypted with the password from the party's key_password_env variable or key_password_file.

    Without one a key is written unencrypted (and said so). Files are mode 0600. For development only.
    """
    spec = load_job(job)
    made = make_dev_certs(spec, out)
    for path in made.paths.all():
        console.print(f"wrote {path}")
    for path, why in made.unencrypted.items():
        print_warning(f"{path} is not encrypted: {why}")
