"""A three-party job (a leader and two followers) for tests: its spec, planted data, and its processes.

The label depends on one column of each party, so each follower adds signal the others lack: the leader alone
scores clearly lower than all three together, and so does a run that loses either follower's cut.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import FOLLOWER_FIELDS, LEADER_FIELDS, VALUES_PER_FIELD, _write_party, free_port, job_dict
from tests.test_two_party import environment, finish

VFL = [sys.executable, "-m", "vfl_cli.app"]
FIELDS = {"leader": LEADER_FIELDS, "follower1": FOLLOWER_FIELDS[:10], "follower2": FOLLOWER_FIELDS[10:]}
SIGNAL = {"leader": 8, "follower1": 3, "follower2": 4}  # the column of each party the label depends on
PASSWORDS = {f"VFL_{key.upper()}_KEY_PASSWORD": f"{key}-secret" for key in FIELDS}


def three_party_job(tmp_path: Path, tls: bool = False, **train: Any) -> dict[str, Any]:
    """The tiny test job (`conftest.job_dict`) with the follower's columns divided between two followers."""
    spec = job_dict(tmp_path, **train)
    spec["parties"] = {key: {"name": key, "fields": fields, "listen": f"127.0.0.1:{free_port()}", "threads": 1}
                       for key, fields in FIELDS.items()}
    if tls:
        certs = tmp_path / "certs"
        spec["tls"] = {"enabled": True, "ca": str(certs / "ca.pem")}
        for key, party in spec["parties"].items():
            party.update(cert=str(certs / f"{key}.pem"), key=str(certs / f"{key}.key"),
                         key_password_env=f"VFL_{key.upper()}_KEY_PASSWORD")
    return spec


def write_three_party_data(data_dir: Path, rows: int = 1500, seed: int = 0) -> None:
    """Prepared arrays for the three parties, the label planted across one column of each."""
    rng = np.random.default_rng(seed)
    local = {key: rng.integers(0, VALUES_PER_FIELD, size=(rows, len(fields))) for key, fields in FIELDS.items()}
    logit = sum(1.6 * (local[key][:, column] - 3.5) / 2 for key, column in SIGNAL.items()) - 0.5
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    test = np.zeros(rows, dtype=bool)
    test[rng.choice(rows, size=rows // 5, replace=False)] = True
    for key, fields in FIELDS.items():
        ids = (local[key] + np.arange(len(fields)) * VALUES_PER_FIELD).astype(np.int32)
        splits = {}
        for name, mask in (("train", ~test), ("test", test)):
            arrays = {"ids": ids[mask], "vals": np.ones_like(ids[mask], dtype=np.float32),
                      "sample_ids": np.flatnonzero(mask).astype(np.int64)}
            if key == "leader":
                arrays["labels"] = labels[mask]
            splits[name] = arrays
        _write_party(data_dir / key, key, fields, splits)


def env() -> dict[str, str]:
    return {**environment(), **PASSWORDS}


def start(party: str, *args: str) -> subprocess.Popen[str]:
    """`vfl <args> --party <party>` as a process of its own."""
    return subprocess.Popen([*VFL, *args, "--party", party], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env())


def run_all(*args: str, parties: tuple[str, ...] = tuple(FIELDS)) -> dict[str, tuple[int, str, str]]:
    """The same command for every party, each its own process (followers first); (exit code, out, err) each."""
    processes = {key: start(key, *args) for key in reversed(parties)}
    return {key: finish(process) for key, process in processes.items()}


def make_certs(job: Path) -> None:
    made = subprocess.run([*VFL, "certs", "--job", str(job)], capture_output=True, text=True, env=env())
    assert made.returncode == 0, made.stderr
