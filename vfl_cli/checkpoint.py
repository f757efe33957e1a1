"""Checkpoints: a plain dict of state dicts + job fingerprint + completed epochs, one file per party.

    <run_dir>/<role>/checkpoint.pt

Written atomically (temp file, then rename) so that a crash never leaves a half-written checkpoint, and
loaded with `weights_only=True` so that a checkpoint file can never run code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from vfl_cli.errors import CheckpointError

FORMAT_VERSION = 1
FILE_NAME = "checkpoint.pt"


def checkpoint_path(run_dir: Path, role: str) -> Path:
    return run_dir / role / FILE_NAME


def save_checkpoint(path: Path, state: dict[str, Any], job_fingerprint: str, epochs_done: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT_VERSION, "job": job_fingerprint, "epochs_done": epochs_done, "state": state}
    handle, temp_name = tempfile.mkstemp(prefix=".checkpoint-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, job_fingerprint: str) -> dict[str, Any]:
    """Return the payload; refuse a checkpoint from another job or in an unknown format."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no checkpoint here") from exc
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable vfl checkpoint ({str(exc).splitlines()[0]})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a vfl checkpoint of format {FORMAT_VERSION}")
    if payload.get("job") != job_fingerprint:
        raise CheckpointError(
            f"{path}: made by another job (fingerprint {payload.get('job')}, this job {job_fingerprint})"
        )
    return payload
