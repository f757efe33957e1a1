"""`data.dense`: `max` (value / column max, unchanged), `log` (log1p(max(value, 0)) / its column max) or `standard`
((value - mean) / std) on Criteo text; the kinds come from the job, not from the Criteo names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_prep.encode import PartyVocab
from data_prep.scaling import Scale
from data_prep.store import open_party, open_table
from data_prep.table import prepare_table
from tests.test_prep import ROWS, all_rows, criteo_line, prep, write_rows
from vfl_cli.errors import DataError, JobError
from vfl_cli.job import JobSpec, parse_job

# ROWS (tests/test_prep.py), dense columns in raw row order; None = missing.
I1 = [4, 8, None, 2, 0, -4]  # max 8
I2 = [-2, None, 3, 1, 0, None]  # max 3
I3 = [-5, None, None, None, None, None]  # max <= 0: divisor 1.0, every val 0


def job_config(dense: str | None = None, data_dir: Path | None = None) -> dict[str, object]:
    data: dict[str, object] = {"threshold": 1, "test_fraction": 0.5}
    if dense is not None:
        data["dense"] = dense
    if data_dir is not None:
        data["dir"] = str(data_dir)
    return {
        "name": "t",
        "seed": 3,
        "data": data,
        "parties": {
            "leader": {"name": "leader", "fields": ["C2", "I1", "C1"]},
            "follower": {"name": "follower", "fields": ["I2", "C3", "I3"]},
        },
    }


def job(dense: str | None = None) -> JobSpec:
    return parse_job(job_config(dense))


def log_scaled(values: list[int | None]) -> list[np.float32]:
    """The reference, in plain Python: log1p(max(x, 0)) / max of that over the column (1.0 if <= 0)."""
    logs = [math.log1p(max(x, 0)) if x is not None else None for x in values]
    top = max(v for v in logs if v is not None)
    divisor = top if top > 0 else 1.0
    return [np.float32(v / divisor) if v is not None else np.float32(0.0) for v in logs]


def test_log_values_are_log1p_over_the_column_max_negatives_and_missing_zero(tmp_path: Path) -> None:
    prep(write_rows(tmp_path / "train.txt", ROWS), job("log"), tmp_path / "out", 1, ("leader", "follower"))

    leader = all_rows(tmp_path / "out", "leader")["vals"]
    np.testing.assert_array_equal(leader[:, 1], log_scaled(I1))
    np.testing.assert_array_equal(leader[:, [0, 2]], np.ones((6, 2), np.float32))  # categorical vals untouched
    follower = all_rows(tmp_path / "out", "follower")["vals"]
    np.testing.assert_array_equal(follower[:, 0], log_scaled(I2))
    np.testing.assert_array_equal(follower[:, 2], np.zeros(6, np.float32))  # I3: only -5, so all log values 0
    assert leader[1, 1] == 1.0 and follower[2, 0] == 1.0  # each column's max row
    assert follower[0, 0] == 0.0 and leader[5, 1] == 0.0  # negatives -> 0
    assert leader[2, 1] == 0.0 and follower[1, 0] == 0.0  # missing -> 0

    scales = json.loads((tmp_path / "out/follower/dense_max.json").read_text())
    assert scales == {"I2": math.log1p(3), "I3": 1.0, "scaling": "log"}
    assert json.loads((tmp_path / "out/leader/dense_max.json").read_text()) == {"I1": math.log1p(8), "scaling": "log"}


def test_max_is_the_default_and_unchanged(tmp_path: Path) -> None:
    raw = write_rows(tmp_path / "train.txt", ROWS)
    prep(raw, job(), tmp_path / "default", 1, ("leader", "follower"))
    prep(raw, job("max"), tmp_path / "max", 1, ("leader", "follower"))

    # By hand: I1 / 8, I2 / 3, I3 / 1 (its max -5 <= 0); missing -> 0; negatives kept.
    expected_i1 = np.array([0.5, 1, 0, 0.25, 0, -0.5], np.float32)
    expected_i2 = np.array([-2 / 3, 0, 1, 1 / 3, 0, 0], np.float32)
    expected_i3 = np.array([-5, 0, 0, 0, 0, 0], np.float32)
    np.testing.assert_array_equal(all_rows(tmp_path / "max", "leader")["vals"][:, 1], expected_i1)
    follower = all_rows(tmp_path / "max", "follower")["vals"]
    np.testing.assert_array_equal(follower[:, 0], expected_i2)
    np.testing.assert_array_equal(follower[:, 2], expected_i3)
    # dense_max.json has no scaling key for max: the files are byte for byte what they were before `dense`.
    assert (tmp_path / "max/leader/dense_max.json").read_text() == '{\n "I1": 8.0\n}\n'
    assert json.loads((tmp_path / "max/follower/dense_max.json").read_text()) == {"I2": 3.0, "I3": 1.0}
    for role in ("leader", "follower"):
        written = sorted(p.relative_to(tmp_path / "max") for p in (tmp_path / "max" / role).rglob("*") if p.is_file())
        for name in written:
            assert (tmp_path / "max" / name).read_bytes() == (tmp_path / "default" / name).read_bytes(), name
    # A job that says `max` keeps the fingerprint it had before the setting existed; `log` changes it.
    assert job("max").fingerprint() == job().fingerprint() != job("log").fingerprint()


def test_new_rows_are_encoded_with_the_scaling_the_directory_was_prepared_with(tmp_path: Path) -> None:
    prep(write_rows(tmp_path / "train.txt", ROWS), job("log"), tmp_path / "out", 1, ("leader",))
    vocab = PartyVocab.load(tmp_path / "out/leader", job().table_schema("leader"))  # the job says max: the dir wins
    assert vocab.scaling == "log" and vocab.scales == {"I1": Scale("log", math.log1p(8))}
    batch = pa.record_batch({"I1": pa.array([26.0, None, -3.0, 8.0]), "C1": pa.array(["a"] * 4).dictionary_encode(),
                             "C2": pa.array(["x"] * 4).dictionary_encode()})
    _, vals = vocab.encode(batch)
    expected = [np.float32(math.log1p(26) / math.log1p(8)), 0.0, 0.0, 1.0]  # above the training max: above 1
    np.testing.assert_array_equal(vals[:, 1], np.array(expected, np.float32))

    # `vfl prep table --vocab-from` a table prepared with log, under a job that says max: log again.
    tables = tmp_path / "tables"
    header = "id,label,C2,I1,C1\n"
    prepare_table(write_rows(tmp_path / "l.csv", [header, "u1,1,x,9,a\n", "u2,0,x,-1,a\n", "u3,1,y,,b\n"]),
                  parse_job(job_config("log", tmp_path)).table_schema("leader"), tables / "fitted")
    fitted = open_table(tables / "fitted").arrays().vals[:, 1]
    np.testing.assert_array_equal(fitted, np.array([1.0, 0.0, 0.0], np.float32))
    prepare_table(write_rows(tmp_path / "n.csv", ["id,C2,I1,C1\n", "n1,x,3,a\n", "n2,x,99,b\n"]),
                  job().table_schema("leader"), tables / "scored", vocab_from=tables / "fitted")
    scored = open_table(tables / "scored").arrays().vals[:, 1]
    expected = [np.float32(math.log1p(3) / math.log1p(9)), np.float32(math.log1p(99) / math.log1p(9))]
    np.testing.assert_array_equal(scored, np.array(expected, np.float32))
    assert json.loads((tables / "scored/dense_max.json").read_text())["scaling"] == "log"  # carried along


def test_a_directory_without_a_scaling_key_is_max_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    raw = write_rows(tmp_path / "train.txt", [criteo_line(1, I1=4, C1="a", C2="x"), criteo_line(0, I1=2)])
    prep(raw, job(), tmp_path / "out", 0, ("leader",))
    directory = tmp_path / "out/leader"
    assert "scaling" not in json.loads((directory / "dense_max.json").read_text())  # as old vfl wrote it
    assert PartyVocab.load(directory, job().table_schema("leader")).scaling == "max"
    (directory / "dense_max.json").write_text('{"I1": 4.0, "scaling": "sqrt"}')
    with pytest.raises(DataError, match=r"dense_max.json: unknown scaling 'sqrt'"):
        PartyVocab.load(directory, job().table_schema("leader"))


def test_standard_on_criteo_text_is_the_mean_and_std_of_all_input_rows(tmp_path: Path) -> None:
    prep(write_rows(tmp_path / "train.txt", ROWS), job("standard"), tmp_path / "out", 1, ("leader", "follower"))
    # I1: 4, 8, 2, 0, -4 present: mean 2, population std 4; missing -> the mean -> 0.0.
    leader = all_rows(tmp_path / "out", "leader")["vals"]
    np.testing.assert_array_equal(leader[:, 1], np.array([0.5, 1.5, 0, 0, -0.5, -1.5], np.float32))
    scales = json.loads((tmp_path / "out/leader/dense_max.json").read_text())
    assert scales == {"scaling": "standard", "columns": {"I1": {"mean": 2.0, "std": 4.0}}}
    follower = all_rows(tmp_path / "out", "follower")["vals"]
    np.testing.assert_array_equal(follower[:, 2], np.zeros(6, np.float32))  # I3: one value, -5: constant -> 0.0


def test_kinds_come_from_the_job_not_the_criteo_names(tmp_path: Path) -> None:
    config = job_config()
    config["parties"]["leader"] = {"name": "leader", "columns": {"I1": "categorical", "C1": "categorical"}}  # type: ignore[index]
    prep(write_rows(tmp_path / "train.txt", ROWS), parse_job(config), tmp_path / "out", 1, ("leader",))
    # I1's values as text: 4, 8, 2, 0, -4 each once (threshold 1: all OOV), missing OOV too.
    assert json.loads((tmp_path / "out/leader/vocab.json").read_text()) == {"I1": [], "C1": ["a", "b"]}
    assert open_party(tmp_path / "out", "leader").meta.kinds == ("categorical", "categorical")
    assert all_rows(tmp_path / "out", "leader")["ids"][:, 0].tolist() == [0] * 6
    config["parties"]["leader"] = {"name": "leader", "columns": {"x0": "numeric"}}  # type: ignore[index]
    with pytest.raises(DataError, match=r"train.txt: Criteo text has no column\(s\) x0 \(label, I1..I13 and C1"):
        prep(tmp_path / "train.txt", parse_job(config), tmp_path / "x", 1, ("leader",))
    config["parties"]["leader"]["task"] = "regression"  # type: ignore[index]
    with pytest.raises(DataError, match="Criteo text has a 0/1 label; the leader's task is regression"):
        prep(tmp_path / "train.txt", parse_job(config), tmp_path / "x", 1, ("leader",))


def test_an_unknown_dense_scaling_is_one_job_error_line() -> None:
    with pytest.raises(JobError) as caught:
        parse_job(job_config("cube"), "job.yaml")
    message = str(caught.value)
    assert message.startswith("job.yaml: data.dense: ") and "'max'" in message and "'log'" in message
    assert "\n" not in message
