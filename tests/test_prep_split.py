"""`vfl prep split`: two organisations' tables from one Criteo file, and the round trip through `prep table`."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_prep.reader import COLUMNS
from data_prep.split import customer_ids, membership, split_parties
from data_prep.store import open_table
from data_prep.synth import write_synth
from data_prep.table import prepare_table
from tests.conftest import run_vfl
from vfl_cli.job import load_job

ROLES = ("leader", "follower")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared/data/criteo-sample/train.txt"
ROWS = 5000


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("split") / "train.txt"
    write_synth(path, ROWS, seed=5)
    return path


def read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    return rows[0], rows[1:]


def raw_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return [dict(zip(COLUMNS, line.rstrip("\n").split("\t"), strict=True)) for line in handle]


def test_overlap_orders_columns_ids_and_values(source: Path, tmp_path: Path) -> None:
    job = load_job(REPO / "jobs/smoke.yaml")
    overlap = 0.6
    result = split_parties(source, [job.table_schema(r) for r in ROLES], overlap, 11, tmp_path)

    # Each count is binomial; allow 5 standard deviations (a false failure is ~1e-6 likely).
    def near(count: int, p: float) -> bool:
        return abs(count - ROWS * p) <= 5 * math.sqrt(ROWS * p * (1 - p))

    assert result.source_rows == ROWS
    assert near(result.shared, overlap)
    for role in ("leader", "follower"):
        assert near(result.tables[role][1], (1 + overlap) / 2), role
    header = {}
    rows = {}
    for role in ("leader", "follower"):
        header[role], rows[role] = read_tsv(tmp_path / f"{role}.tsv")
        assert len(rows[role]) == result.tables[role][1]
    leader, follower = job.party("leader"), job.party("follower")
    assert header["leader"] == ["id", "label", *leader.fields]
    assert header["follower"] == ["id", *follower.fields]

    ids = {role: [row[0] for row in rows[role]] for role in rows}
    for role in ids:
        assert len(set(ids[role])) == len(ids[role]), f"{role}: duplicate ids"
        assert all(re.fullmatch(r"c[0-9a-f]{12}", c) for c in ids[role])
    shared = set(ids["leader"]) & set(ids["follower"])
    assert len(shared) == result.shared
    in_both = [c for c in ids["leader"] if c in shared]
    assert in_both != [c for c in ids["follower"] if c in shared]  # the parties' orders differ

    # Ids map back to source rows; both tables carry exactly the source's values; orders are shuffled.
    row_of = {c: r for r, c in enumerate(customer_ids(11, np.arange(ROWS)).tolist())}
    raw = raw_rows(source)
    for role in ("leader", "follower"):
        source_rows = [row_of[c] for c in ids[role]]
        assert source_rows != sorted(source_rows)
        for row in rows[role][:200]:
            expected = raw[row_of[row[0]]]
            for name, value in zip(header[role][1:], row[1:], strict=True):
                if job.party(role).columns.get(name) == "numeric" and value:
                    assert float(value) == float(expected[name]), (role, name)
                else:
                    assert value == expected[name], (role, name)
    in_leader, in_follower = membership(11, ROWS, overlap)
    assert sorted(row_of[c] for c in ids["leader"]) == np.flatnonzero(in_leader).tolist()
    assert sorted(row_of[c] for c in ids["follower"]) == np.flatnonzero(in_follower).tolist()


def test_overlap_extremes_and_stable_ids() -> None:
    leader, follower = membership(1, 2000, 1.0)
    assert leader.all() and follower.all()
    leader, follower = membership(1, 2000, 0.0)
    assert not (leader & follower).any() and (leader | follower).all()
    rows = np.arange(1 << 16)
    assert len(set(customer_ids(3, rows).tolist())) == len(rows)  # a permutation: no collisions
    assert customer_ids(3, rows[100:110]).tolist() == customer_ids(3, rows)[100:110].tolist()
    assert customer_ids(3, rows[:10]).tolist() != customer_ids(4, rows[:10]).tolist()


def round_trip(source: Path, tables: Path, job_path: Path, prepared: Path, customers: int) -> None:
    """Prep each split table and check, customer by customer, that the arrays decode to the source values."""
    job = load_job(job_path)
    raw = raw_rows(source)
    for role in ("leader", "follower"):
        prepare_table(tables / f"{role}.tsv", job.table_schema(role), prepared / role)
        table = open_table(prepared / role)
        arrays = table.arrays()
        vocab = json.loads((prepared / role / "vocab.json").read_text())
        dense_max = json.loads((prepared / role / "dense_max.json").read_text())
        row_of = {c: r for r, c in enumerate(customer_ids(job.seed, np.arange(len(raw))).tolist())}
        for i, customer in enumerate(table.customer_ids()[:customers].astype(str).tolist()):
            expected = raw[row_of[customer]]
            if role == "leader":
                assert arrays.labels is not None and arrays.labels[i] == float(expected["label"])
            for j, (field, kind) in enumerate(zip(table.meta.fields, table.meta.kinds, strict=True)):
                offset = table.meta.field_offsets[field]
                if kind == "numeric":
                    value = float(expected[field]) if expected[field] else 0.0
                    assert arrays.ids[i, j] == offset
                    assert arrays.vals[i, j] == pytest.approx(value / dense_max[field], rel=1e-6)
                else:
                    known = vocab[field]
                    index = known.index(expected[field]) if expected[field] in known else -1
                    assert arrays.ids[i, j] == offset + 1 + index, (customer, field)




def test_cli_split_then_table_round_trip(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load((REPO / "jobs/smoke.yaml").read_text())
    config["data"]["dir"] = str(tmp_path / "run/data")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config))
    code, err = run_vfl(monkeypatch, capsys, "prep", "split", "--input", source, "--job", job, "--overlap", "0.8")
    assert code == 0, err
    tables = tmp_path / "run/organisations"  # the default: <data.dir>/../organisations
    assert re.search(rf"leader: [\d,]+ rows -> {tables / 'leader.tsv'}", err)
    assert re.search(r"shared: [\d,]+ customers of 5,000 source rows \(overlap 0.8\)", err)
    round_trip(source, tables, job, tmp_path / "prepared", customers=50)
    code, err = run_vfl(monkeypatch, capsys, "prep", "split", "--input", source, "--job", job, "--overlap", "1.5")
    assert code == 2 and "--overlap" in err  # typer refuses a value outside [0, 1]


@pytest.mark.skipif(not SAMPLE.is_file(), reason=f"real Criteo sample not present at {SAMPLE}")
def test_real_sample_round_trip(tmp_path: Path) -> None:
    job = load_job(REPO / "jobs/criteo.yaml")
    result = split_parties(SAMPLE, [job.table_schema(r) for r in ROLES], 0.8, job.seed, tmp_path / "tables")
    assert result.source_rows == 7200
    round_trip(SAMPLE, tmp_path / "tables", REPO / "jobs/criteo.yaml", tmp_path / "prepared", customers=30)


def test_three_tables_each_row_in_all_or_in_exactly_one() -> None:
    members = np.array(membership(3, 30_000, 0.4, parties=3))
    every = members.all(axis=0)
    assert abs(every.mean() - 0.4) < 0.01
    assert (members[:, ~every].sum(axis=0) == 1).all()  # the rest: in exactly one table
    assert all(abs(m[~every].mean() - 1 / 3) < 0.02 for m in members)
