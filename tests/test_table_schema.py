"""`vfl prep table` driven by the schema: any column names, kinds from the job, standard scaling, labels by task
(binary, multiclass, regression), a label-only leader through the PSI, and one error line per bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from data_prep.meta import PartyMeta, TableMeta
from data_prep.store import open_party, open_table
from data_prep.table import prepare_table
from tests.conftest import run_vfl
from vfl_cli.errors import DataError
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.psi.session import open_own_table, psi_locally

LEADER = {"x0": "numeric", "city": "categorical", "age": "numeric"}
FOLLOWER = {"x0": "numeric", "code": "categorical"}  # x0 again: a name is local to its party


def config(tmp_path: Path, leader: dict[str, str] | None = None, task: str = "binary", **data: Any) -> dict[str, Any]:
    return {
        "name": "t",
        "seed": 3,
        "data": {"dir": str(tmp_path / "data"), "threshold": 1, **data},
        "parties": {
            "leader": {"name": "leader", "columns": LEADER if leader is None else leader, "id_column": "cust",
                       "label_column": "y", "task": task},
            "follower": {"name": "follower", "columns": FOLLOWER, "id_column": "cust"},
        },
        "psi": {"min_intersection": 2},
    }


def job(tmp_path: Path, leader: dict[str, str] | None = None, task: str = "binary", **data: Any) -> JobSpec:
    return parse_job(config(tmp_path, leader, task, **data))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# Columns in another order than the job's and an ignored one. x0: 10, 30 (mean 20, std 10); age: 1, 3 (mean 2,
# std 1); city: paris 3 times (an id at threshold 1), rome and oslo once (OOV).
LEADER_CSV = ("cust,y,age,city,x0,note\nu1,1,1,paris,10,a\nu2,0,3,rome,,b\nu3,1,,paris,30,c\nu4,0,1,oslo,10,d\n"
              "u5,1,3,paris,30,e\n")
FOLLOWER_CSV = "cust,x0,code\nu1,5,7\nu2,5,7\nu3,5,8\nu4,,7\n"  # x0 constant; code: integer codes, "7" frequent


def test_any_names_kinds_from_the_job_and_standard_scaling_exact(tmp_path: Path) -> None:
    spec = job(tmp_path)
    result = prepare_table(write(tmp_path / "l.csv", LEADER_CSV), spec.table_schema("leader"), tmp_path / "l")
    table = open_table(tmp_path / "l")
    assert table.meta.fields == ("x0", "city", "age") and table.meta.kinds == ("numeric", "categorical", "numeric")
    assert table.meta.field_offsets == {"x0": 0, "city": 1, "age": 3} and table.meta.vocab_size == 4
    assert (table.meta.task, table.meta.classes, result.task, result.label_rate) == ("binary", (), "binary", 0.6)
    arrays = table.arrays()
    assert arrays.ids.tolist() == [[0, 2, 3], [0, 1, 3], [0, 2, 3], [0, 1, 3], [0, 2, 3]]
    # (x - mean) / std; a missing value is the mean, so 0.0; categorical vals 1.0.
    expected = [[-1, 1, -1], [0, 1, 1], [1, 1, 0], [-1, 1, -1], [1, 1, 1]]
    np.testing.assert_array_equal(arrays.vals, np.array(expected, np.float32))
    assert arrays.labels is not None and arrays.labels.tolist() == [1, 0, 1, 0, 1]
    assert json.loads((tmp_path / "l/vocab.json").read_text()) == {"city": ["paris"]}
    assert json.loads((tmp_path / "l/dense_max.json").read_text()) == {
        "scaling": "standard", "columns": {"x0": {"mean": 20.0, "std": 10.0}, "age": {"mean": 2.0, "std": 1.0}}}

    prepare_table(write(tmp_path / "f.csv", FOLLOWER_CSV), spec.table_schema("follower"), tmp_path / "f")
    follower = open_table(tmp_path / "f")
    assert follower.meta.kinds == ("numeric", "categorical") and follower.meta.task is None
    assert follower.arrays().ids.tolist() == [[0, 2], [0, 2], [0, 1], [0, 2]]
    np.testing.assert_array_equal(follower.arrays().vals, np.array([[0, 1]] * 4, np.float32))  # constant: std 1
    assert json.loads((tmp_path / "f/dense_max.json").read_text())["columns"] == {"x0": {"mean": 5.0, "std": 1.0}}


def test_an_all_missing_numeric_column_is_zero_and_integer_codes_are_categories(tmp_path: Path) -> None:
    spec = job(tmp_path, {"empty": "numeric", "code": "categorical"})
    text = "cust,y,empty,code\na,1,,3\nb,0,,3\nc,1,,12\n"
    prepare_table(write(tmp_path / "t.csv", text), spec.table_schema("leader"), tmp_path / "o")
    arrays = open_table(tmp_path / "o").arrays()
    assert arrays.vals[:, 0].tolist() == [0, 0, 0] and arrays.ids.tolist() == [[0, 2], [0, 2], [0, 1]]
    assert json.loads((tmp_path / "o/vocab.json").read_text()) == {"code": ["3"]}
    assert json.loads((tmp_path / "o/dense_max.json").read_text())["columns"] == {"empty": {"mean": 0.0, "std": 1.0}}


def test_vocab_from_encodes_new_rows_with_the_fitted_mean_and_std(tmp_path: Path) -> None:
    training = tmp_path / "data/tables/leader"
    prepare_table(write(tmp_path / "l.csv", LEADER_CSV), job(tmp_path).table_schema("leader"), training)
    new = write(tmp_path / "new.csv", "cust,age,city,x0\nn1,5,rome,40\nn2,,berlin,\n")  # no label column
    scoring = job(tmp_path, dense="max").table_schema("leader")  # the job says max: the directory's standard wins
    prepare_table(new, scoring, tmp_path / "score", vocab_from=training)
    scored = open_table(tmp_path / "score")
    assert scored.arrays().ids.tolist() == [[0, 1, 3], [0, 1, 3]]  # rome rare, berlin unseen: OOV
    np.testing.assert_array_equal(scored.arrays().vals, np.array([[2, 1, 3], [0, 1, 0]], np.float32))
    assert scored.arrays().labels is None and (scored.meta.task, scored.meta.kinds[1]) == (None, "categorical")
    assert (tmp_path / "score/dense_max.json").read_text() == (training / "dense_max.json").read_text()
    with pytest.raises(DataError, match=r"column kinds differ from the job's \(age is numeric there, categorical"):
        prepare_table(new, job(tmp_path, {**LEADER, "age": "categorical"}).table_schema("leader"), tmp_path / "x",
                      vocab_from=training)


def test_moments_do_not_depend_on_how_the_input_is_cut_into_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.lognormal(3, 2, size=(10_000, 2)) * 1e3
    lines = [f"c{i},{i % 2},{a!r},{'' if i % 7 == 0 else repr(b)},k{i % 4}" for i, (a, b) in enumerate(values.tolist())]
    path = write(tmp_path / "t.csv", "cust,y,x0,age,city\n" + "\n".join(lines) + "\n")
    schema = job(tmp_path).table_schema("leader")
    prepare_table(path, schema, tmp_path / "one")
    prepare_table(path, schema, tmp_path / "many", block_size=4096)  # ~80 batches, none on a 4096-row boundary
    for file in ("ids.npy", "vals.npy", "labels.npy", "dense_max.json", "meta.json"):
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "many" / file).read_bytes(), file
    present = values[np.arange(10_000) % 7 != 0, 1]
    scales = json.loads((tmp_path / "one/dense_max.json").read_text())["columns"]
    assert scales["age"]["mean"] == pytest.approx(present.mean(), rel=1e-13)
    assert scales["age"]["std"] == pytest.approx(present.std(), rel=1e-12)
    vals = open_table(tmp_path / "one").arrays().vals
    np.testing.assert_allclose(vals[:, 0], (values[:, 0] - values[:, 0].mean()) / values[:, 0].std(), rtol=1e-5)


@pytest.mark.parametrize(("labels", "classes", "indices"), [
    (["10", "2", "1", "2"], ("1", "2", "10"), [2, 1, 0, 1]),  # numbers: numeric order, not text order
    (["dog", "cat", "ant", "cat"], ("ant", "cat", "dog"), [2, 1, 0, 1]),
    (["b", "1", "a", "1.5"], ("1", "1.5", "a", "b"), [3, 0, 2, 1]),  # not all numbers: text order
])
def test_multiclass_classes_are_read_sorted_recorded_and_indexed(
    tmp_path: Path, labels: list[str], classes: tuple[str, ...], indices: list[int]
) -> None:
    rows = "".join(f"c{i},{label},{i}\n" for i, label in enumerate(labels))
    spec = job(tmp_path, {"x0": "numeric"}, "multiclass")
    result = prepare_table(write(tmp_path / "t.csv", "cust,y,x0\n" + rows), spec.table_schema("leader"), tmp_path / "o")
    table = open_table(tmp_path / "o")
    assert (table.meta.task, table.meta.classes, result.classes, result.label_rate) == ("multiclass", classes,
                                                                                         classes, None)
    labels_npy = table.arrays().labels
    assert labels_npy is not None and labels_npy.dtype == np.float32 and labels_npy.tolist() == indices


def test_multiclass_vocab_from_takes_the_classes_and_refuses_an_unseen_one(tmp_path: Path) -> None:
    spec = job(tmp_path, {"x0": "numeric"}, "multiclass").table_schema("leader")
    training = tmp_path / "fitted"
    prepare_table(write(tmp_path / "t.csv", "cust,y,x0\na,10,1\nb,2,2\nc,1,3\n"), spec, training)
    prepare_table(write(tmp_path / "n.csv", "cust,y,x0\nn1,2,5\nn2,10,\n"), spec, tmp_path / "new", vocab_from=training)
    new = open_table(tmp_path / "new")
    assert new.meta.classes == ("1", "2", "10") and new.arrays().labels.tolist() == [1, 2]  # type: ignore[union-attr]
    bad = write(tmp_path / "bad.csv", "cust,y,x0\nn1,2,5\nn2,3,1\n")
    with pytest.raises(DataError) as caught:
        prepare_table(bad, spec, tmp_path / "x", vocab_from=training)
    assert str(caught.value) == f"{bad}:3: y '3' is not a class seen in training (classes: 1, 2, 10)"
    assert not (tmp_path / "x").exists()


def test_regression_labels_are_stored_as_values(tmp_path: Path) -> None:
    spec = job(tmp_path, {"x0": "numeric"}, "regression")
    text = "cust,y,x0\na,1.5,1\nb,-2,2\nc,3e2,3\n"
    result = prepare_table(write(tmp_path / "t.csv", text), spec.table_schema("leader"), tmp_path / "o")
    table = open_table(tmp_path / "o")
    assert (table.meta.task, table.meta.classes, result.label_rate) == ("regression", (), None)
    assert table.arrays().labels.tolist() == [1.5, -2.0, 300.0]  # type: ignore[union-attr]


def test_a_label_only_leader_prepares_and_aligns_with_zero_width_arrays(tmp_path: Path) -> None:
    spec = job(tmp_path, {}, "multiclass")
    tables = tmp_path / "data/tables"
    prepare_table(write(tmp_path / "l.csv", "cust,y\nu1,b\nu2,a\nu3,b\nu9,c\n"), spec.table_schema("leader"),
                  tables / "leader")
    prepare_table(write(tmp_path / "f.csv", FOLLOWER_CSV), spec.table_schema("follower"), tables / "follower")
    leader = open_table(tables / "leader")
    assert leader.arrays().ids.shape == (4, 0) and leader.arrays().vals.shape == (4, 0)
    assert leader.meta.vocab_size == 0 and leader.arrays().labels.tolist() == [1, 0, 1, 2]  # type: ignore[union-attr]
    psi_locally(spec)  # u1..u3 in common, sorted by id
    aligned = open_party(tmp_path / "data", "leader")
    assert (aligned.meta.fields, aligned.meta.kinds, aligned.meta.task) == ((), (), "multiclass")
    assert aligned.meta.classes == ("a", "b", "c") and aligned.meta.psi is not None and aligned.meta.psi["size"] == 3
    rows = {name: aligned.split(name) for name in aligned.meta.splits}
    assert sum(len(r) for r in rows.values()) == 3 and all(r.ids.shape[1] == 0 for r in rows.values())
    follower = open_party(tmp_path / "data", "follower").meta
    assert follower.kinds == ("numeric", "categorical") and follower.task is None and follower.classes == ()


def test_psi_refuses_a_table_prepared_with_other_kinds_or_task(tmp_path: Path) -> None:
    spec = job(tmp_path)
    prepare_table(write(tmp_path / "l.csv", LEADER_CSV), spec.table_schema("leader"), tmp_path / "data/tables/leader")
    with pytest.raises(DataError, match=r"other column kinds than the job \(city categorical there, numeric in"):
        open_own_table(job(tmp_path, {**LEADER, "city": "numeric"}), "leader")
    with pytest.raises(DataError, match="has binary labels, but the job's task is regression"):
        open_own_table(job(tmp_path, task="regression"), "leader")


def test_a_meta_json_from_before_kinds_and_tasks_still_reads() -> None:
    party = {"format": 1, "role": "leader", "fields": ["I1", "C1", "x"], "has_labels": True, "vocab_size": 3,
             "field_offsets": {"I1": 0, "C1": 1, "x": 2}, "threshold": 1, "source": "s", "splits": {}}
    meta = PartyMeta.from_json(json.dumps(party))
    assert (meta.kinds, meta.task, meta.classes) == (("numeric", "categorical", "categorical"), "binary", ())
    again = PartyMeta.from_json(meta.to_json())
    assert again == meta and json.loads(meta.to_json())["task"] == "binary"
    table = {"role": "follower", "fields": ["I8"], "has_labels": False, "vocab_size": 1, "field_offsets": {"I8": 0},
             "threshold": 1, "source": "s", "rows": 0, "id_column": "id", "id_width": 1, "sha256": {},
             "sample_ids_digest": "", "customer_ids_digest": ""}
    old = TableMeta.from_json(json.dumps(table))
    assert (old.kinds, old.task, old.classes) == (("numeric",), None, ())
    with pytest.raises(ValueError, match="classes are only for multiclass labels"):
        PartyMeta.from_json(json.dumps({**party, "classes": ["a"]}))


# --- through the CLI: exit code 3, one line naming file, line and column, nothing written ----------------

HEADER = "cust,y,x0,city,age\n"
GOOD = "u1,1,1.5,paris,3\nu2,0,2.5,rome,\n"
BAD = {
    "binary": {
        "label": (HEADER + GOOD + "u3,2,1,paris,1\n", "{p}:4: y must be 0 or 1, found '2'"),
        "text": (HEADER + GOOD + "u3,1,old,paris,1\n", "{p}:4: x0 must be a number, found 'old'"),
        "inf": (HEADER + "u3,1,1,paris,-inf\n" + GOOD, "{p}:2: age must be a finite number, found '-inf'"),
        "column": ("cust,y,x0,age\nu1,1,2,3\n", "{p}: header lacks the leader's field column(s) city"),
        "duplicate": (HEADER + GOOD + "u1,0,1,oslo,1\n",
                      "{p}: customer id 'u1' appears more than once (lines 2 and 4); ids must be unique"),
        "header-only": (HEADER, "{p}: empty input, no rows"),
        "empty": ("", "{p}: empty file, no header row"),
    },
    "multiclass": {"missing": (HEADER + GOOD + "u3,,1,paris,1\n", "{p}:4: y is missing (every row needs a label)")},
    "regression": {
        "text": (HEADER + GOOD + "u3,abc,1,paris,1\n", "{p}:4: y must be a number, found 'abc'"),
        "inf": (HEADER + GOOD + "u3,inf,1,paris,1\n", "{p}:4: y must be a finite number, found 'inf'"),
    },
}


@pytest.mark.parametrize("task", list(BAD))
def test_bad_tables_give_one_error_line_and_exit_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], task: str
) -> None:
    job_path = write(tmp_path / "job.yaml", yaml.safe_dump(config(tmp_path, task=task), sort_keys=False))
    for case, (text, message) in BAD[task].items():
        path = write(tmp_path / f"{case}.csv", text)
        code, err = run_vfl(monkeypatch, capsys, "prep", "table", "--role", "leader", "--input", path, "--job",
                            job_path)
        assert (code, err) == (3, f"error: {message.format(p=path)}\n"), case
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.npy"))
