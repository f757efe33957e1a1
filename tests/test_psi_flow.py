"""Two organisations' own tables, end to end: `vfl prep split` -> `vfl prep table` per party -> `vfl psi`
(two real processes over mutual TLS, or in memory) -> aligned data that trains exactly like the same rows
aligned by hand."""

from __future__ import annotations

import csv
import re
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from data_prep.splits import in_test_split
from data_prep.store import PartyMeta, open_party, open_table, table_dir, write_meta, write_split
from tests.conftest import write_job
from tests.test_two_party import VFL, environment, finish, start, tls_job
from vfl_cli.errors import DataError, ProtocolError
from vfl_cli.grid import LocalGrid, run_all
from vfl_cli.job import JobSpec, load_job
from vfl_cli.party import PartyContext
from vfl_cli.protocol import BatchKey, Kind
from vfl_cli.psi.session import psi_locally, psi_session

ROLES = ("leader", "follower")


def vfl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VFL, *args], capture_output=True, text=True, env=environment())


def load_with_passwords(job_path: Path) -> JobSpec:
    """The job as the CLI would load it, with the key passwords in the environment."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment().items():
            patch.setenv(name, value)
        return load_job(job_path)


def table_ids(path: Path) -> list[str]:
    with path.open(newline="") as handle:
        return [row["id"] for row in csv.DictReader(handle, delimiter="\t")]


@pytest.fixture
def organisations(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """A TLS job, and each party's own prepared table (70% overlap, own shuffled orders) from synthetic data."""
    spec = tls_job(tmp_path, epochs=2)
    spec["psi"] = {"min_intersection": 50, "batch_size": 256}
    job = write_job(tmp_path, spec)
    raw = tmp_path / "raw.txt"
    for args in (("prep", "synth", "--rows", "3000", "--out", str(raw), "--seed", "5"),
                 ("prep", "split", "--input", str(raw), "--job", str(job), "--overlap", "0.7"),
                 ("certs", "--job", str(job))):
        done = vfl(*args)
        assert done.returncode == 0, done.stderr
    for role in ROLES:
        done = vfl("prep", "table", "--role", role, "--input", str(tmp_path / "organisations" / f"{role}.tsv"),
                   "--job", str(job))
        assert done.returncode == 0, done.stderr
    return spec, job


def test_psi_over_https_finds_exactly_the_common_customers(organisations: tuple[dict[str, Any], Path]) -> None:
    spec, job = organisations
    base = Path(spec["data"]["dir"]).parent / "organisations"
    common = set(table_ids(base / "leader.tsv")) & set(table_ids(base / "follower.tsv"))
    follower = start("follower", "psi", "--job", str(job))
    leader = start("leader", "psi", "--job", str(job))
    leader_code, leader_out, leader_err = finish(leader)
    follower_code, follower_out, follower_err = finish(follower)
    assert (leader_code, follower_code) == (0, 0), leader_err + follower_err
    digests = {re.search(r"common-set digest (\w+)", out).group(1) for out in (leader_out, follower_out)}
    assert len(digests) == 1 and f"{len(common):,} customers in common" in leader_out

    data_dir = Path(spec["data"]["dir"])
    for split in ("train", "test"):
        ids = {role: np.load(data_dir / role / split / "customer_ids.npy") for role in ROLES}
        assert np.array_equal(ids["leader"], ids["follower"])  # position p is the same customer on both sides
    aligned = [cid.decode() for s in ("train", "test")
               for cid in np.load(data_dir / "leader" / s / "customer_ids.npy").tolist()]
    assert sorted(aligned) == sorted(common)
    # Training reads it: the handshake compares rows, sample ids and the intersection digest.
    follower = start("follower", "train", "--job", str(job))
    leader = start("leader", "train", "--job", str(job))
    assert finish(leader)[0] == 0 and finish(follower)[0] == 0


def hand_aligned(psi_dir: Path, out_dir: Path, seed: int, test_fraction: float) -> None:
    """The same customers in the same order as the PSI put them, joined by customer id without any PSI."""
    order = {}
    for split in ("train", "test"):
        ids = np.load(psi_dir / "leader" / split / "customer_ids.npy")
        positions = open_party(psi_dir, "leader").split(split).sample_ids
        order |= dict(zip(np.asarray(positions).tolist(), ids.tolist(), strict=True))
    customers = [order[p] for p in range(len(order))]
    test = in_test_split(seed, 0, len(customers), test_fraction)
    for role in ROLES:
        table = open_table(table_dir(psi_dir, role))
        row_of = {cid: row for row, cid in enumerate(table.customer_ids().tolist())}
        rows = np.array([row_of[c] for c in customers])
        arrays = table.arrays()
        splits = {}
        for name, mask in (("train", ~test), ("test", test)):
            labels = None if arrays.labels is None else np.asarray(arrays.labels[rows[mask]])
            splits[name] = write_split(out_dir / role / name, np.asarray(arrays.ids[rows[mask]]),
                                       np.asarray(arrays.vals[rows[mask]]), labels, np.flatnonzero(mask))
        meta = table.meta
        write_meta(out_dir / role, PartyMeta(role, meta.fields, meta.has_labels, meta.vocab_size,
                                             meta.field_offsets, meta.threshold, meta.source, splits))


def test_training_on_psi_aligned_tables_equals_training_on_rows_aligned_by_hand(
    organisations: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    spec, job_path = organisations
    job = load_with_passwords(job_path)
    psi_locally(job)
    by_psi = vfl("train", "--role", "local", "--job", str(job_path))
    assert by_psi.returncode == 0, by_psi.stderr

    hand_dir = tmp_path / "by-hand"
    hand_aligned(Path(spec["data"]["dir"]), hand_dir, job.seed, job.data.test_fraction)
    by_hand_spec = {**spec, "data": {**spec["data"], "dir": str(hand_dir)},
                    "train": {**spec["train"], "run_dir": str(tmp_path / "run-by-hand")}}
    (tmp_path / "hand").mkdir()
    by_hand = vfl("train", "--role", "local", "--job", str(write_job(tmp_path / "hand", by_hand_spec)))
    assert by_hand.returncode == 0, by_hand.stderr
    auc = {name: float(re.search(r"test: AUC (\d\.\d+)", run.stdout).group(1))
           for name, run in (("psi", by_psi), ("hand", by_hand))}
    assert abs(auc["psi"] - auc["hand"]) <= 1e-6, auc
    assert auc["psi"] > 0.6  # and it learned something: the rows of the two parties do belong together


def test_too_small_an_intersection_is_refused_on_both_sides(organisations: tuple[dict[str, Any], Path]) -> None:
    spec, job_path = organisations
    spec["psi"]["min_intersection"] = 100_000  # more customers than either party has
    write_job(job_path.parent, spec)
    job = load_with_passwords(job_path)
    with pytest.raises(DataError, match="psi.min_intersection"):
        psi_locally(job)
    assert not (Path(spec["data"]["dir"]) / "leader" / "meta.json").exists()  # nothing aligned was written


def test_psi_reruns_write_the_same_data_and_new_customers_get_scored(
    organisations: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    spec, job_path = organisations
    job = load_with_passwords(job_path)
    data_dir = Path(spec["data"]["dir"])
    psi_locally(job)
    first = (data_dir / "leader" / "meta.json").read_text()
    psi_locally(job)  # fresh keys, so a new PSI order: the data written must not change with it
    second = (data_dir / "leader" / "meta.json").read_text()
    strip = re.compile(r'"digest": "\w+"')  # the intersection digest is of this run's double-blinded values
    assert strip.sub("", first) == strip.sub("", second)
    assert vfl("train", "--role", "local", "--job", str(job_path)).returncode == 0

    # New customers, encoded with the trained vocabulary, aligned apart from the training data, scored.
    new = tmp_path / "new"
    for args in (("prep", "synth", "--rows", "800", "--out", str(tmp_path / "new-raw.txt"), "--seed", "9"),
                 ("prep", "split", "--input", str(tmp_path / "new-raw.txt"), "--job", str(job_path), "--overlap",
                  "0.6", "--seed", "9", "--out", str(new))):
        assert vfl(*args).returncode == 0
    for role in ROLES:
        done = vfl("prep", "table", "--role", role, "--input", str(new / f"{role}.tsv"), "--job", str(job_path),
                   "--vocab-from", str(data_dir / role), "--out", str(new / "tables" / role))
        assert done.returncode == 0, done.stderr
    done = vfl("psi", "--role", "local", "--job", str(job_path), "--table", str(new / "tables"),
               "--out", str(new / "aligned"))
    assert done.returncode == 0, done.stderr
    assert (data_dir / "leader" / "meta.json").read_text() == second  # the training data is untouched
    scored = vfl("infer", "--role", "local", "--job", str(job_path), "--data", str(new / "aligned"), "--split", "all",
                 "--out", str(tmp_path / "scores.csv"))
    assert scored.returncode == 0, scored.stderr
    with (tmp_path / "scores.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    common = set(table_ids(new / "leader.tsv")) & set(table_ids(new / "follower.tsv"))
    assert list(rows[0]) == ["id", "probability"]
    assert [row["id"] for row in rows] == sorted(common)
    assert all(0.0 <= float(row["probability"]) <= 1.0 for row in rows)


class ShortChangingGrid(LocalGrid):
    """The follower's end of the grid, sending one point fewer in each blinded batch than it announced."""

    def send(self, dst: str, kind: Kind, key: BatchKey, tensors: dict[str, torch.Tensor]) -> None:  # type: ignore[override]
        if kind == "psi_blinded":
            tensors = {name: t[:-1] for name, t in tensors.items()}
        super().send(dst, kind, key, tensors)


def test_a_peer_that_sends_fewer_points_than_it_announced_is_refused(
    organisations: tuple[dict[str, Any], Path],
) -> None:
    spec, job_path = organisations
    job = load_with_passwords(job_path)
    grids = LocalGrid.star("leader", ("follower",), job.transport.timeout_s)
    honest = grids["follower"]
    grids["follower"] = ShortChangingGrid("follower", ("leader",), False, honest._channels, job.transport.timeout_s)
    with pytest.raises(ProtocolError, match=r"the follower's blinded batch 0: .* expected uint8 \[256, 32\] as the "
                                            r"peer announced"):
        run_all({role: (partial(psi_session, PartyContext.of(job, role), grid), grid) for role, grid in grids.items()},
                "leader")
    assert not (Path(spec["data"]["dir"]) / "leader" / "meta.json").exists()
