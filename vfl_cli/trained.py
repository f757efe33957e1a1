"""A party's trained model, loaded from its own checkpoints for use outside training (`vfl export`, `vfl serve`):
the selected checkpoint (else the newest), or the one of a given run and step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from data_prep.store import open_party
from vfl_cli.checkpoint import CheckpointStore
from vfl_cli.errors import CheckpointError
from vfl_cli.job import JobSpec
from vfl_cli.task import Task
from vfl_cli.train.parties import PartyModel, build_party
from vfl_cli.train.session import leader_task


def checkpoint_payload(store: CheckpointStore, at: tuple[str, int] | None = None) -> dict[str, Any]:
    """The selected checkpoint (else the newest) of the store's run, or run `at[0]`'s step `at[1]` (the selected
    copy when it is that step, since older step files are dropped as training goes on)."""
    if at is None:
        return store.load_selected() or store.newest()
    selected = store.load_selected()
    if selected is not None and (selected["run_id"], selected["step"]) == at:
        return selected
    return store.load(*at)


def load_party(job: JobSpec, role: str, run_dir: Path,
               at: tuple[str, int] | None = None) -> tuple[PartyModel, dict[str, Any]]:
    """Party `role`'s model, built from its prepared data and loaded from its checkpoint (`checkpoint_payload`), in
    eval mode on the CPU. CheckpointError where there is none."""
    data = open_party(job.data.dir, role)
    task: Task | None = leader_task(job, data) if job.is_leader(role) else None
    party = build_party(job, role, data.meta, torch.device("cpu"), task)
    store = CheckpointStore(run_dir / role, job.fingerprint())
    payload = checkpoint_payload(store, at)
    try:
        party.load_state_dict(payload["state"])
    except CheckpointError as exc:
        raise CheckpointError(f"{store.directory}: {exc}") from exc
    party.train(False)
    return party, payload
