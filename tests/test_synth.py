"""The synthetic Criteo generator: format, shapes, determinism, label rate, and a signal on both sides."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from data_prep.store import open_party
from data_prep.synth import write_synth
from tests.test_prep import prep
from vfl_cli.errors import DataError
from vfl_cli.job import load_job

REPO = Path(__file__).resolve().parents[1]


def read_columns(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    return [list(column) for column in zip(*(line.split("\t") for line in lines), strict=True)]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    write_synth(tmp_path / "a.txt", 5000, seed=3)
    write_synth(tmp_path / "b.txt", 5000, seed=3)
    write_synth(tmp_path / "c.txt", 5000, seed=4)
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()
    assert (tmp_path / "a.txt").read_bytes() != (tmp_path / "c.txt").read_bytes()


def test_criteo_format_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    write_synth(path, 20_000, seed=0)
    columns = read_columns(path)
    assert len(columns) == 40 and len(columns[0]) == 20_000
    labels = np.array(columns[0], dtype=int)
    assert set(np.unique(labels)) == {0, 1}
    assert 0.22 < labels.mean() < 0.28
    dense, categorical = columns[1:14], columns[14:]
    assert all(re.fullmatch(r"-?\d+|", value) for column in dense for value in column)
    assert all(re.fullmatch(r"[0-9a-f]{8}|", value) for column in categorical for value in column)
    assert any("" in column for column in dense) and any("" in column for column in categorical)
    assert any(value.startswith("-") for value in dense[1])  # I2 has small negatives, as in Criteo
    counts = [int(v) for v in dense[4] if v]
    assert max(counts) > 50 * np.median(counts)  # heavy tail
    big = categorical[2]  # C3: many distinct values, a few very frequent ones
    _, freq = np.unique(big, return_counts=True)
    assert len(freq) > 2000 and freq.max() > 100


def test_gzip_output(tmp_path: Path) -> None:
    write_synth(tmp_path / "a.txt", 1000, seed=1)
    write_synth(tmp_path / "a.txt.gz", 1000, seed=1)
    assert gzip.decompress((tmp_path / "a.txt.gz").read_bytes()) == (tmp_path / "a.txt").read_bytes()


def test_bad_rows_argument(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="rows must be positive"):
        write_synth(tmp_path / "a.txt", 0)


def one_hot(ids: np.ndarray, width: int) -> sparse.csr_matrix:
    rows = np.repeat(np.arange(len(ids)), ids.shape[1])
    return sparse.csr_matrix((np.ones(ids.size), (rows, ids.reshape(-1))), shape=(len(ids), width))


def test_signal_needs_both_parties(tmp_path: Path) -> None:
    """A linear model on both parties' one-hot ids clearly beats one on the leader's alone (threshold 5)."""
    raw = tmp_path / "train.txt"
    write_synth(raw, 20_000, seed=7)
    prep(raw, load_job(REPO / "jobs/smoke.yaml"), tmp_path / "data", 5, ("leader", "follower"))
    leader, follower = open_party(tmp_path / "data", "leader"), open_party(tmp_path / "data", "follower")

    def features(split: str, with_follower: bool) -> sparse.csr_matrix:
        own = one_hot(np.asarray(leader.split(split).ids), leader.meta.vocab_size)
        if not with_follower:
            return own
        return sparse.hstack([own, one_hot(np.asarray(follower.split(split).ids), follower.meta.vocab_size)]).tocsr()

    y_train, y_test = leader.split("train").labels, leader.split("test").labels
    assert y_train is not None and y_test is not None
    auc = {}
    for both in (False, True):
        model = LogisticRegression(C=0.1, max_iter=300).fit(features("train", both), y_train)
        auc[both] = roc_auc_score(y_test, model.predict_proba(features("test", both))[:, 1])
    assert auc[False] > 0.6
    assert auc[True] > auc[False] + 0.05, auc
