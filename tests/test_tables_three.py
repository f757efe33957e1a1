"""Three organisations' own tables end to end: FATE's breast set (../shared/data/fate) with the host's columns
divided between two followers. `vfl init` with two followers -> `vfl certs` -> `vfl prep table` per party ->
`vfl psi` -> `vfl train` as three processes over mutual TLS, equal to `--role local` -> `vfl infer`: a
probability per customer. (The PSI and inference as processes: test_psi_three, make smoke-test-3.)"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from tests.test_tables_flow import FATE, each_party, metric, vfl

pytestmark = pytest.mark.skipif(not FATE.is_dir(), reason=f"{FATE} not present (the project's shared data)")
PARTIES = ("leader", "follower1", "follower2")


def three_processes(work: Path, *args: str) -> dict[str, str]:
    """`vfl <args> --party P` for the three parties, each its own process; every party's stdout."""
    return each_party(work, *args, parties=PARTIES)


def divide_columns(source: Path, first: Path, second: Path) -> None:
    """The host's table as two organisations' tables: the id and half of the columns each."""
    with source.open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    half = 1 + (len(header) - 1) // 2
    for path, columns in ((first, range(1, half)), (second, range(half, len(header)))):
        keep = [0, *columns]
        with path.open("w", newline="") as handle:
            csv.writer(handle).writerows([[row[i] for i in keep] for row in (header, *rows)])


def test_breast_split_three_ways_over_mtls_equals_one_process(tmp_path: Path) -> None:
    (tmp_path / "leader.csv").write_bytes((FATE / "breast_hetero_guest.csv").read_bytes())
    divide_columns(FATE / "breast_hetero_host.csv", tmp_path / "follower1.csv", tmp_path / "follower2.csv")
    vfl(tmp_path, "init", "--leader", "leader.csv", "--follower", "follower1.csv", "--follower", "follower2.csv",
        "--id", "id", "--label", "y", "--name", "breast3", "--out", "job.yaml")
    vfl(tmp_path, "certs", "--job", "job.yaml")
    for key in PARTIES:
        vfl(tmp_path, "prep", "table", "--job", "job.yaml", "--party", key, "--input", f"{key}.csv")
    found = vfl(tmp_path, "psi", "--job", "job.yaml", "--role", "local")  # as processes: test_psi_three, test_psi_flow
    assert "leader: 569 customers in common" in found and "at the follower2" in found
    assert len(set(re.findall(r"common-set digest (\w+)", found))) == 1

    local = metric(vfl(tmp_path, "train", "--job", "job.yaml", "--role", "local", "--restart"), "AUC")
    trained = three_processes(tmp_path, "train", "--job", "job.yaml", "--restart")
    assert abs(metric(trained["leader"], "AUC") - local) <= 1e-6
    assert local > 0.97  # two-party breast: 0.9924 (docs/quality.md)

    vfl(tmp_path, "infer", "--job", "job.yaml", "--role", "local", "--out", "predictions.csv")
    with (tmp_path / "predictions.csv").open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    assert header == ["id", "probability"] and all(0.0 <= float(p) <= 1.0 for _, p in rows)
