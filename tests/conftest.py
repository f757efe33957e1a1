"""Shared fixtures: tiny jobs and prepared data written straight in the store format, free ports."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from data_prep.store import PartyMeta, write_meta, write_split
from vfl_cli.app import main
from vfl_cli.job import JobSpec, parse_job

REPO = Path(__file__).resolve().parents[1]
CRITEO_SAMPLE = REPO.parent / "shared" / "data" / "criteo-sample"
LEADER_FIELDS = [f"I{i}" for i in range(1, 8)] + [f"C{i}" for i in range(1, 14)]
FOLLOWER_FIELDS = [f"I{i}" for i in range(8, 14)] + [f"C{i}" for i in range(14, 27)]
VALUES_PER_FIELD = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def job_dict(tmp_path: Path, **train: Any) -> dict[str, Any]:
    """A tiny two-party job whose paths all live under tmp_path."""
    return {
        "name": "test",
        "seed": 3,
        "data": {"dir": str(tmp_path / "data"), "threshold": 1},
        "parties": {
            "leader": {"name": "leader", "fields": LEADER_FIELDS, "listen": f"127.0.0.1:{free_port()}", "threads": 1},
            "follower": {"name": "follower", "fields": FOLLOWER_FIELDS, "listen": f"127.0.0.1:{free_port()}",
                         "threads": 1},
        },
        "model": {"emb_dim": 4, "deep_layers": [16, 8]},
        "train": {"epochs": 2, "batch_size": 64, "log_every": 1, "run_dir": str(tmp_path / "run"),
                  "deep_optimizer": {"lr": 0.01}, **train},
        "transport": {"timeout_s": 20, "connect_timeout_s": 30},
        "tls": {"enabled": False},
    }


def write_job(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _write_party(directory: Path, role: str, fields: list[str], splits: dict[str, dict[str, np.ndarray]]) -> None:
    split_meta = {
        name: write_split(directory / name, a["ids"], a["vals"], a.get("labels"), a["sample_ids"])
        for name, a in splits.items()
    }
    meta = PartyMeta(
        role=role, fields=tuple(fields), has_labels=role == "leader", vocab_size=len(fields) * VALUES_PER_FIELD,
        field_offsets={f: i * VALUES_PER_FIELD for i, f in enumerate(fields)}, threshold=1, source="synthetic",
        splits=split_meta,
    )
    write_meta(directory, meta)


def write_planted_data(data_dir: Path, rows: int = 1200, seed: int = 0) -> None:
    """Prepared arrays for both parties whose labels depend on one leader field and one follower field."""
    rng = np.random.default_rng(seed)
    local = {role: rng.integers(0, VALUES_PER_FIELD, size=(rows, len(fields)))
             for role, fields in (("leader", LEADER_FIELDS), ("follower", FOLLOWER_FIELDS))}
    logit = 1.5 * (local["leader"][:, 8] - 3.5) / 2 + 1.5 * (local["follower"][:, 7] - 3.5) / 2 - 0.5
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    test = np.zeros(rows, dtype=bool)
    test[rng.choice(rows, size=rows // 5, replace=False)] = True
    for role, fields in (("leader", LEADER_FIELDS), ("follower", FOLLOWER_FIELDS)):
        ids = (local[role] + np.arange(len(fields)) * VALUES_PER_FIELD).astype(np.int32)
        vals = np.ones_like(ids, dtype=np.float32)
        splits = {}
        for name, mask in (("train", ~test), ("test", test)):
            arrays = {"ids": ids[mask], "vals": vals[mask], "sample_ids": np.flatnonzero(mask).astype(np.int64)}
            if role == "leader":
                arrays["labels"] = labels[mask]
            splits[name] = arrays
        _write_party(data_dir / role, role, fields, splits)


@pytest.fixture
def planted_job(tmp_path: Path) -> JobSpec:
    spec = job_dict(tmp_path)
    write_planted_data(Path(spec["data"]["dir"]))
    return parse_job(spec, "test-job")


def run_vfl(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """Run `vfl <args>` in-process through app.main(); returns (exit code, stderr). Wide, so no line wraps."""
    monkeypatch.setenv("VFL_NO_PROGRESS", "1")
    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.setattr(sys, "argv", ["vfl", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err
