"""The PSI for a leader and two followers: three tables with different pairwise overlaps, the common set found
exactly, and training on it equal to training on the same rows aligned by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_prep.align import write_aligned
from data_prep.store import open_party, open_table, table_dir
from data_prep.table import prepare_table
from tests.conftest import free_port
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.psi.group import psi_tag
from vfl_cli.psi.session import common_digest, psi_locally
from vfl_cli.train.session import run_local, train_session

COLUMNS = {"leader": {"a0": "numeric", "a1": "categorical"}, "follower1": {"b0": "numeric", "b1": "categorical"},
           "follower2": {"c0": "numeric", "c1": "categorical"}}


def three_tables(directory: Path, seed: int = 5) -> dict[str, set[str]]:
    """Three CSV tables over 2,000 customers: each holds its own share, the pairs overlap differently (about
    1,300 leader & follower1, 1,000 leader & follower2, 800 in all three), rows in a different order each. The
    label (leader) depends on a1, b1 and c1."""
    rng = np.random.default_rng(seed)
    n = 2000
    ids = np.array([f"cust-{i:05d}" for i in rng.permutation(n)])
    columns = {key: (rng.normal(size=n), rng.integers(0, 6, size=n)) for key in COLUMNS}
    logit = sum(columns[key][1] - 2.5 for key in COLUMNS) / 2
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    u = rng.random(n)
    member = {"leader": u < 0.85, "follower1": (u < 0.65) | (u > 0.9), "follower2": (u < 0.4) | (u > 0.7) & (u < 0.85)}
    held = {}
    for key, names in COLUMNS.items():
        rows = rng.permutation(np.flatnonzero(member[key]))
        numeric, category = columns[key]
        header = ["id", *names] + (["label"] if key == "leader" else [])
        lines = [",".join(header)]
        for r in rows:
            cells = [ids[r], f"{numeric[r]:.5f}", f"k{category[r]}"] + ([str(labels[r])] if key == "leader" else [])
            lines.append(",".join(cells))
        (directory / f"{key}.csv").write_text("\n".join(lines) + "\n")
        held[key] = set(ids[rows].tolist())
    return held


def job_of(tmp_path: Path, data_dir: Path) -> JobSpec:
    spec: dict[str, Any] = {
        "name": "psi3", "seed": 4,
        "data": {"dir": str(data_dir), "threshold": 1},
        "parties": {key: {"name": key, "columns": cols, "listen": f"127.0.0.1:{free_port()}", "threads": 1}
                    for key, cols in COLUMNS.items()},
        "model": {"bottom": "mlp", "cut_dim": 4, "emb_dim": 4, "deep_layers": [8]},
        "train": {"epochs": 2, "batch_size": 128, "run_dir": str(data_dir.parent / "run" / data_dir.name),
                  "deep_optimizer": {"lr": 0.01}},
        "psi": {"min_intersection": 100, "batch_size": 300},
        "tls": {"enabled": False},
    }
    return parse_job(spec)


@pytest.fixture
def psi_three(tmp_path: Path) -> tuple[JobSpec, dict[str, set[str]], Path]:
    held = three_tables(tmp_path)
    job = job_of(tmp_path, tmp_path / "data")
    for key in COLUMNS:
        prepare_table(tmp_path / f"{key}.csv", job.table_schema(key), table_dir(job.data.dir, key))
    return job, held, tmp_path


def aligned_ids(job: JobSpec, key: str) -> list[str]:
    data = open_party(job.data.dir, key)
    return [cid.decode() for split in ("train", "test") for cid in data.customer_ids(split).tolist()]


def test_three_tables_psi_finds_exactly_the_common_ids(psi_three: tuple[JobSpec, dict[str, set[str]], Path]) -> None:
    job, held, _ = psi_three
    outcomes = psi_locally(job)
    common = held["leader"] & held["follower1"] & held["follower2"]
    pairs = {key: len(held["leader"] & held[key]) for key in ("follower1", "follower2")}
    assert len(set(pairs.values()) | {len(common)}) == 3  # the overlaps really differ
    leader = outcomes["leader"]
    assert leader.size == len(common) and leader.pairwise == pairs
    assert leader.peer_sizes == {key: len(held[key]) for key in ("follower1", "follower2")}
    for key in COLUMNS:
        assert outcomes[key].size == len(common)
        assert outcomes[key].digest == leader.digest
        ids = aligned_ids(job, key)
        assert sorted(ids) == sorted(common) and len(ids) == len(common)
        assert ids == aligned_ids(job, "leader")  # one order at every party
    # A follower hears of the common set only: its pairwise count is its own intersection with the leader.
    assert outcomes["follower1"].pairwise == {"leader": pairs["follower1"]}
    meta = json.loads((job.data.dir / "follower2" / "meta.json").read_text())
    assert meta["psi"]["size"] == len(common)


def test_training_on_the_psi_equals_training_on_rows_aligned_by_hand(
    psi_three: tuple[JobSpec, dict[str, set[str]], Path],
) -> None:
    job, held, tmp_path = psi_three
    psi_locally(job)
    by_psi = run_local(job, train_session)["leader"].epochs[-1][2]
    # By hand: every table's rows of the common ids, sorted by id, written with the same writer.
    common = sorted(held["leader"] & held["follower1"] & held["follower2"])
    hand = job_of(tmp_path, tmp_path / "by-hand")
    tag = psi_tag(hand.fingerprint())
    for key in COLUMNS:
        table = open_table(table_dir(job.data.dir, key))
        ids = table.customer_ids().astype(str)
        rows = np.array([np.flatnonzero(ids == cid)[0] for cid in common], dtype=np.int64)
        digest = common_digest(tag, table.customer_ids()[rows])
        write_aligned(table, rows, hand.data.dir, hand.seed, hand.data.test_fraction,
                      {"size": len(rows), "digest": digest})
    by_hand = run_local(hand, train_session)["leader"].epochs[-1][2]
    assert by_psi is not None and by_hand is not None
    assert by_psi.rows == by_hand.rows
    assert np.array_equal(by_psi.predictions, by_hand.predictions)
    assert by_psi.score == by_hand.score > 0.6
