"""`vfl prep table`: one party's own CSV/TSV keyed by customer id -> its arrays, exact semantics and errors."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_prep.csv_table import CsvTable, read_header
from data_prep.source import ID
from data_prep.store import open_table
from data_prep.table import IdTally, prepare_table
from tests.conftest import run_vfl
from vfl_cli.errors import DataError
from vfl_cli.job import JobSpec, parse_job

REPO = Path(__file__).resolve().parents[1]


def job_config(tmp_path: Path, threshold: int = 1) -> dict[str, object]:
    # Leader fields out of Criteo order, custom id and label column names.
    return {
        "name": "t",
        "seed": 3,
        "data": {"dir": str(tmp_path / "data"), "threshold": threshold},
        "parties": {
            "leader": {"name": "leader", "fields": ["C2", "I1", "C1"], "id_column": "cust", "label_column": "click"},
            "follower": {"name": "follower", "fields": ["I2", "C3"]},
        },
    }


def small_job(tmp_path: Path, threshold: int = 1) -> JobSpec:
    return parse_job(job_config(tmp_path, threshold))


# Columns in another order than the job's, an ignored column, quoted values with the delimiter inside,
# 260.0 for an integer, a label written 1.0, empty and quoted-empty cells, CRLF line ends and a BOM.
LEADER_CSV = (
    "\ufeffextra,C1,click,cust,I1,C2\r\n"
    'zz,"a,b",1,u1,260.0,x\r\n'
    "zz,b,0,u2,,x\r\n"
    'zz,"a,b",1.0,"u3",130,""\r\n'
    "zz,,0,u4,-26,y\r\n"
)
LEADER_TSV = LEADER_CSV.replace(",", "\t").replace('"a\tb"', "a,b").replace('"u3"', "u3")


def write(path: Path, text: str) -> Path:
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


def test_hand_written_csv_exact_ids_vals_labels(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = prepare_table(write(tmp_path / "leader.csv", LEADER_CSV), small_job(tmp_path).table_schema("leader"), out)
    table = open_table(out)
    # C2: OOV 0, x 1 (y once) | I1: 2 | C1: OOV 3, "a,b" 4 (b once, one missing).
    assert table.meta.field_offsets == {"C2": 0, "I1": 2, "C1": 3} and table.meta.vocab_size == 5
    assert (table.meta.rows, table.meta.id_column, table.meta.id_width, table.meta.threshold) == (4, "cust", 2, 1)
    arrays = table.arrays()
    assert arrays.ids.tolist() == [[1, 2, 4], [1, 2, 3], [0, 2, 4], [0, 2, 3]]
    expected = np.array([[1, 1, 1], [1, 0, 1], [1, 0.5, 1], [1, -0.1, 1]], np.float32)  # I1 / 260, missing -> 0
    np.testing.assert_allclose(arrays.vals, expected, rtol=1e-6)
    assert arrays.labels is not None and arrays.labels.tolist() == [1, 0, 1, 0]
    assert arrays.sample_ids.tolist() == [0, 1, 2, 3]
    customers = table.customer_ids()
    assert customers.dtype == np.dtype("S2") and customers.tolist() == [b"u1", b"u2", b"u3", b"u4"]
    assert json.loads((out / "vocab.json").read_text()) == {"C2": ["x"], "C1": ["a,b"]}
    assert json.loads((out / "dense_max.json").read_text()) == {"I1": 260.0}
    assert result.label_rate == 0.5 and result.rows == 4
    table.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leader.csv", "out"]  # no staging left behind


@pytest.mark.parametrize("name", ["leader.tsv", "leader.tsv.gz", "leader.csv.gz"])
def test_tsv_and_gzip_give_the_same_arrays(tmp_path: Path, name: str) -> None:
    text = LEADER_CSV if ".csv" in name else LEADER_TSV
    prepare_table(write(tmp_path / "ref.csv", LEADER_CSV), small_job(tmp_path).table_schema("leader"), tmp_path / "ref")
    prepare_table(write(tmp_path / name, text), small_job(tmp_path).table_schema("leader"), tmp_path / "out")
    for file in ("ids.npy", "vals.npy", "labels.npy", "sample_ids.npy", "customer_ids.npy", "vocab.json"):
        assert (tmp_path / "out" / file).read_bytes() == (tmp_path / "ref" / file).read_bytes(), file


def test_threshold_boundary_count_equal_to_threshold_is_oov(tmp_path: Path) -> None:
    leader = small_job(tmp_path, threshold=2).table_schema("leader")
    prepare_table(write(tmp_path / "t.csv", LEADER_CSV), leader, tmp_path / "o")
    # x and "a,b" are each seen exactly twice: not more than 2, so both go to their field's OOV id.
    assert json.loads((tmp_path / "o/vocab.json").read_text()) == {"C2": [], "C1": []}
    assert open_table(tmp_path / "o").arrays().ids.tolist() == [[0, 1, 2]] * 4


def test_delimiter_detection_and_override(tmp_path: Path) -> None:
    header = ["extra", "C1", "click", "cust", "I1", "C2"]
    assert read_header(write(tmp_path / "a.csv", LEADER_CSV), None) == (header, ",")
    assert read_header(write(tmp_path / "a.tsv.gz", LEADER_TSV), None)[1] == "\t"
    assert read_header(tmp_path / "a.csv", "\t") == (["extra,C1,click,cust,I1,C2"], "\t")  # forced: one column
    with pytest.raises(DataError, match="header has no id column 'cust'"):
        prepare_table(tmp_path / "a.csv", small_job(tmp_path).table_schema("leader"), tmp_path / "o", delimiter="\t")


def test_many_small_batches_equal_one_batch_and_find_late_errors(tmp_path: Path) -> None:
    rows = [f"{i % 7},c{i:05d},{'k' if i % 3 else 'j'}{i % 5},{i % 2}" for i in range(3000)]
    text = "I1,cust,C1,click\n" + "\n".join(rows) + "\n"
    config = job_config(tmp_path)
    config["parties"]["leader"]["fields"] = ["I1", "C1"]  # type: ignore[index]
    job = parse_job(config)
    prepare_table(write(tmp_path / "t.csv", text), job.table_schema("leader"), tmp_path / "one")
    prepare_table(tmp_path / "t.csv", job.table_schema("leader"), tmp_path / "many", block_size=4096)
    for file in ("ids.npy", "vals.npy", "labels.npy", "sample_ids.npy", "customer_ids.npy", "meta.json"):
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "many" / file).read_bytes(), file
    # A duplicate in a far batch and a bad value on a late line are found and named.
    dup = write(tmp_path / "dup.csv", text + "1,c00017,k1,0\n")
    with pytest.raises(DataError, match=r"customer id 'c00017' appears more than once \(lines 19 and 3002\)"):
        prepare_table(dup, job.table_schema("leader"), tmp_path / "x", block_size=4096)
    bad = write(tmp_path / "bad.csv", text.replace("\n2,c02900,", "\nsix,c02900,"))
    with pytest.raises(DataError, match=rf"^{bad}:2902: I1 must be a number, found 'six'$"):
        prepare_table(bad, job.table_schema("leader"), tmp_path / "x", block_size=4096)
    assert not (tmp_path / "x").exists()


def test_equal_hashes_of_different_ids_are_not_duplicates(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", LEADER_CSV)
    reader = CsvTable(path, small_job(tmp_path).table_schema("leader"), (), False)
    tally = IdTally()
    tally.hashes = [np.array([5, 9, 5, 7], np.int64)]  # rows 0 and 2 (u1, u3) collide on the hash only
    tally.check_unique(reader)  # no error: the real ids differ
    assert ID not in ("cust", "click", "label")


def test_vocab_from_maps_unseen_to_oov_and_keeps_the_training_max(tmp_path: Path) -> None:
    job = small_job(tmp_path)
    training = tmp_path / "data/tables/leader"
    prepare_table(write(tmp_path / "train.csv", LEADER_CSV), job.table_schema("leader"), training)
    before = {p.name: p.read_bytes() for p in training.iterdir()}
    new = write(tmp_path / "new.csv", 'cust,C2,C1,I1\nn1,x,a,520\nn2,w,"a,b",\nn3,,b,13\n')  # no label column
    result = prepare_table(new, job.table_schema("leader"), tmp_path / "score", vocab_from=training)
    scored = open_table(tmp_path / "score")
    arrays = scored.arrays()
    assert arrays.ids.tolist() == [[1, 2, 3], [0, 2, 4], [0, 2, 3]]  # w, a, b unseen or rare -> OOV
    np.testing.assert_allclose(arrays.vals[:, 1], [2.0, 0.0, 0.05], rtol=1e-6)  # divided by the training 260
    assert arrays.labels is None and not scored.meta.has_labels and result.label_rate is None
    assert scored.meta.vocab_from == str(training) and scored.meta.vocab_size == 5
    assert (tmp_path / "score/vocab.json").read_text() == (training / "vocab.json").read_text()
    assert {p.name: p.read_bytes() for p in training.iterdir()} == before  # the training table untouched
    with pytest.raises(DataError, match="holds the leader's vocabulary, not the follower's"):
        prepare_table(new, job.table_schema("follower"), tmp_path / "f", vocab_from=training)


# --- through the CLI: exit code 3 and one line per bad input ---------------------------------------------




HEADER = "cust,click,C2,I1,C1\n"
GOOD = "u1,1,x,4,a\nu2,0,y,,b\n"
BAD_TABLES = {
    "dense": (HEADER + GOOD + "u3,0,x,abc,a\n", "{p}:4: I1 must be a number, found 'abc'"),
    "infinite": (HEADER + "u3,0,x,inf,a\n" + GOOD, "{p}:2: I1 must be a finite number, found 'inf'"),
    "label": (HEADER + GOOD + "u3,2,x,1,a\n", "{p}:4: click must be 0 or 1, found '2'"),
    "label-text": (HEADER + "u3,yes,x,1,a\n" + GOOD, "{p}:2: click must be 0 or 1, found 'yes'"),
    "label-missing": (HEADER + GOOD + "u3,,x,1,a\n", "{p}:4: click must be 0 or 1, it is missing"),
    "id-missing": (HEADER + GOOD + ",1,x,1,a\n", "{p}:4: cust is missing (every row needs a customer id)"),
    "columns": (HEADER + GOOD + "u3,1,x\n", "{p}:4: expected 5 ','-separated columns as in the header, found 3"),
    "duplicate": (
        HEADER + GOOD + "u3,1,x,1,a\nu2,1,x,1,a\n",
        "{p}: customer id 'u2' appears more than once (lines 3 and 5); ids must be unique",
    ),
    "no-id-column": ("id,click,C2,I1,C1\n" + GOOD, "{p}: header has no id column 'cust' (parties.leader.id_column)"),
    "no-field": ("cust,click,I1\nu1,1,2\n", "{p}: header lacks the leader's field column(s) C2, C1"),
    "no-label": ("cust,C2,I1,C1\nu1,x,2,a\n", "{p}: header has no label column 'click' (parties.leader.label_column)"),
    "header-only": (HEADER, "{p}: empty input, no rows"),
    "empty": ("", "{p}: empty file, no header row"),
}


def test_bad_tables_give_one_error_line_and_exit_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_config(tmp_path)))
    for case, (text, message) in BAD_TABLES.items():
        path = write(tmp_path / f"{case}.csv", text)
        code, err = run_vfl(monkeypatch, capsys, "prep", "table", "--role", "leader", "--input", path, "--job", job)
        assert (code, err) == (3, f"error: {message.format(p=path)}\n"), case
    missing = tmp_path / "nope.csv"
    code, err = run_vfl(monkeypatch, capsys, "prep", "table", "--role", "leader", "--input", missing, "--job", job)
    assert (code, err) == (3, f"error: {missing}: input file not found\n")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.npy"))


def test_cli_writes_the_default_location_and_a_subprocess_error_has_no_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_config(tmp_path)))
    good = write(tmp_path / "good.csv", HEADER + GOOD)
    code, err = run_vfl(monkeypatch, capsys, "prep", "table", "--role", "leader", "--input", good, "--job", job)
    assert code == 0, err
    assert f"prepared the leader's table, 2 rows, into {tmp_path / 'data/tables/leader'}" in err
    assert "label rate 0.5000" in err and open_table(tmp_path / "data/tables/leader").meta.rows == 2
    code, err = run_vfl(
        monkeypatch, capsys, "prep", "table", "--role", "leader", "--input", good, "--job", job, "--delimiter", ";"
    )
    assert (code, err.count("\n")) == (3, 1) and "--delimiter must be" in err

    bad = write(tmp_path / "bad.csv", HEADER + GOOD + "u3,0,x,1.5.1,a\n")
    env = {**os.environ, "VFL_NO_PROGRESS": "1", "COLUMNS": "1000"}
    done = subprocess.run(
        [sys.executable, "-m", "vfl_cli.app", "prep", "table", "--role", "leader", "--input", str(bad),
         "--job", str(job)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3
    assert done.stderr.strip().splitlines() == [f"error: {bad}:4: I1 must be a number, found '1.5.1'"]
