"""`vfl export`: this party's part of the trained model as ONNX (a thin shell over `vfl_cli.export`)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from vfl_cli.commands.run import PARTY_ROLE_HELP, CheckpointOption, JobOption, PartyOption, PartyRole, pick_party
from vfl_cli.errors import JobError
from vfl_cli.job import load_job


class Format(str, Enum):
    onnx = "onnx"


def export(
    job: JobOption,
    out: Annotated[Path, typer.Option("--out", help="Directory; <out>/<party>/ is written.", show_default=False)],
    role: Annotated[PartyRole | None, typer.Option("--role", help=PARTY_ROLE_HELP, show_default=False)] = None,
    party: PartyOption = None,
    format: Annotated[Format, typer.Option("--format", help="onnx (the only one so far).")] = Format.onnx,
    checkpoint: CheckpointOption = None,
) -> None:
    """Export this party's bottom (and, at the leader, the top with the task's prediction) as ONNX, from its
    selected checkpoint (else its newest), with the vocabulary and scaling beside it and a manifest. Each party
    exports its own part alone; no peer is contacted. onnxruntime's outputs are checked against torch's on the
    party's test split (at most 1e-5 apart)."""
    from vfl_cli.export import export_party

    spec = load_job(job)
    key = pick_party(spec, role.value if role else None, party)
    if key is None:
        raise JobError("--role local: export one party at a time (--party KEY); each exports only its own part")
    done = export_party(spec, key, checkpoint or spec.train.run_dir, out)
    graphs = ", ".join(f"{name} -> {path}" for name, path in done.graphs.items()) or "no graph (no columns)"
    typer.echo(f"{key}: exported run {done.run_id[:8]} step {done.step}: {graphs}; onnxruntime matches torch to "
               f"{done.max_difference:.1e}")
