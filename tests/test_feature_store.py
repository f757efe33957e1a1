"""The serving feature store: customer id -> a party's prepared row, by binary search over memory-mapped arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_prep.store import open_party, table_dir
from data_prep.table import prepare_table
from tests.test_psi_three import COLUMNS, job_of, three_tables
from vfl_cli.errors import DataError
from vfl_cli.psi.session import psi_locally
from vfl_cli.serve.feature_store import FeatureStore


@pytest.fixture
def aligned(tmp_path: Path) -> Path:
    three_tables(tmp_path)
    job = job_of(tmp_path, tmp_path / "data")
    for key in COLUMNS:
        prepare_table(tmp_path / f"{key}.csv", job.table_schema(key), table_dir(job.data.dir, key))
    psi_locally(job)
    return job.data.dir / "follower1"


def test_lookup_returns_each_customers_row_in_the_order_asked(aligned: Path) -> None:
    store = FeatureStore.open(aligned)
    data = open_party(aligned.parent, "follower1")
    expected = {}
    for split in ("train", "test"):
        arrays, ids = data.split(split), data.customer_ids(split)
        for i, cid in enumerate(ids.tolist()):
            expected[cid.decode()] = (np.asarray(arrays.ids[i]), np.asarray(arrays.vals[i]))
    assert store.size == len(expected)
    rng = np.random.default_rng(0)
    asked = list(rng.choice(sorted(expected), size=50, replace=False)) + ["nobody", "cust-0000000000000", ""]
    rows = store.lookup(asked)
    assert rows.found.tolist() == [True] * 50 + [False] * 3
    for i, cid in enumerate(asked[:50]):
        assert np.array_equal(rows.ids[i], expected[cid][0]) and np.array_equal(rows.vals[i], expected[cid][1])
    assert not rows.ids[50:].any() and not rows.vals[50:].any()
    assert rows.ids.dtype == np.int64 and rows.vals.dtype == np.float32


def test_a_directory_without_customer_ids_is_refused(tmp_path: Path) -> None:
    from tests.conftest import write_planted_data

    write_planted_data(tmp_path / "data")
    with pytest.raises(DataError, match="no split with customer ids"):
        FeatureStore.open(tmp_path / "data" / "leader")


def test_rows_in_any_stored_order_are_found(tmp_path: Path) -> None:
    """Aligned data is stored sorted by id; the store must not rely on it: ids given to rows in shuffled order."""
    from tests.conftest import write_planted_data

    write_planted_data(tmp_path / "data", rows=300)
    data = open_party(tmp_path / "data", "follower")
    rng = np.random.default_rng(1)
    names = {}
    for split, meta in data.meta.splits.items():
        ids = np.array([f"c{n:04d}" for n in rng.permutation(10_000)[: meta.rows]], dtype="S5")
        np.save(tmp_path / "data" / "follower" / split / "customer_ids.npy", ids)
        names[split] = ids
    store = FeatureStore.open(tmp_path / "data" / "follower")
    for split, ids in names.items():
        rows = store.lookup([cid.decode() for cid in ids.tolist()])
        assert rows.found.all()
        assert np.array_equal(rows.ids, np.asarray(data.split(split).ids, dtype=np.int64))
