"""`vfl prep table` on Parquet: the same arrays as the same table in CSV, errors naming file, row and column; and
FATE's real vertically split tables (../shared/data/fate), binary, multiclass and regression, against numpy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import yaml

from data_prep.store import open_table
from data_prep.table import prepare_table
from tests.conftest import run_vfl
from tests.test_table_schema import config, job, write
from vfl_cli.errors import DataError
from vfl_cli.job import parse_job

FATE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fate"
COLUMNS = {"x0": "numeric", "city": "categorical", "age": "numeric", "code": "categorical"}
CSV_TEXT = "cust,y,x0,city,age,code\nu1,1,1.5,paris,3,7\nu2,0,,rome,,7\nu3,1,-2.25,,1,12\nu4,0,8,paris,3,7\n"
COMPARED = ("ids.npy", "vals.npy", "labels.npy", "sample_ids.npy", "customer_ids.npy", "vocab.json", "dense_max.json")


def parquet(path: Path, columns: dict[str, list[object]], row_group_size: int = 2, **types: pa.DataType) -> Path:
    table = pa.table({name: pa.array(values, types.get(name)) for name, values in columns.items()})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


TABLE: dict[str, list[object]] = {
    "cust": ["u1", "u2", "u3", "u4"], "y": [1, 0, 1, 0], "x0": [1.5, None, -2.25, 8.0],
    "city": ["paris", "rome", None, "paris"], "age": [3, None, 1, 3], "code": [7, 7, 12, 7],
}


def same_files(a: Path, b: Path) -> None:
    for file in COMPARED:
        if (a / file).exists() or (b / file).exists():
            assert (a / file).read_bytes() == (b / file).read_bytes(), file


@pytest.mark.parametrize("name", ["t.parquet", "t.pq", "t.bin"])  # .bin: found by its PAR1 magic bytes
def test_parquet_gives_the_arrays_the_same_csv_gives(tmp_path: Path, name: str) -> None:
    schema = job(tmp_path, COLUMNS).table_schema("leader")
    prepare_table(write(tmp_path / "t.csv", CSV_TEXT), schema, tmp_path / "csv")
    result = prepare_table(parquet(tmp_path / name, TABLE), schema, tmp_path / "pq")  # row groups of 2 rows
    same_files(tmp_path / "csv", tmp_path / "pq")
    assert result.rows == 4 and result.label_rate == 0.5
    meta = open_table(tmp_path / "pq").meta
    assert meta.kinds == ("numeric", "categorical", "numeric", "categorical") and meta.source == name
    assert json.loads((tmp_path / "pq/vocab.json").read_text()) == {"city": ["paris"], "code": ["7"]}


def test_parquet_labels_by_task_and_vocab_from(tmp_path: Path) -> None:
    schema = job(tmp_path, {"x0": "numeric"}, "multiclass").table_schema("leader")
    rows = {"cust": ["a", "b", "c"], "y": [10, 2, 1], "x0": [1.0, 2.0, 3.0]}
    prepare_table(write(tmp_path / "t.csv", "cust,y,x0\na,10,1\nb,2,2\nc,1,3\n"), schema, tmp_path / "csv")
    prepare_table(parquet(tmp_path / "t.parquet", rows), schema, tmp_path / "pq")
    same_files(tmp_path / "csv", tmp_path / "pq")
    assert open_table(tmp_path / "pq").meta.classes == ("1", "2", "10")
    new = parquet(tmp_path / "new.parquet", {"cust": ["n1", "n2"], "y": [2, 3], "x0": [0.0, 1.0]})
    with pytest.raises(DataError) as caught:
        prepare_table(new, schema, tmp_path / "x", vocab_from=tmp_path / "pq")
    assert str(caught.value) == f"{new}: row 2: y '3' is not a class seen in training (classes: 1, 2, 10)"

    regression = job(tmp_path, {"x0": "numeric"}, "regression").table_schema("leader")
    prepare_table(parquet(tmp_path / "r.parquet", {**rows, "y": [0.5, -1.0, 2.0]}), regression, tmp_path / "r")
    assert open_table(tmp_path / "r").arrays().labels.tolist() == [0.5, -1.0, 2.0]  # type: ignore[union-attr]


def bad_parquet_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each bad Parquet file and its one error line ({p}: the file)."""
    def table(name: str, **changes: list[object]) -> Path:
        return parquet(tmp_path / f"{name}.parquet", {**TABLE, **changes})

    without_city = {k: v for k, v in TABLE.items() if k != "city"}
    empty = {name: [] for name in TABLE}
    zero_bytes = tmp_path / "zero.parquet"
    zero_bytes.write_bytes(b"")
    return {
        "label": (table("label", y=[1, 2, 0, 0]), "{p}: row 2: y must be 0 or 1, found '2'"),
        "inf": (table("inf", x0=[1.0, 2.0, float("inf"), 3.0]), "{p}: row 3: x0 must be a finite number, found 'inf'"),
        "text": (table("text", x0=["1", "2", "3", "4"]),
                 "{p}: column 'x0' holds string, not numbers (declared numeric)"),
        "label-text": (table("lt", y=["1", "0", "1", "0"]),
                       "{p}: column 'y' holds string, not numbers (a binary label)"),
        "id": (table("id", cust=["u1", None, "u3", "u4"]),
               "{p}: row 2: cust is missing (every row needs a customer id)"),
        "duplicate": (table("dup", cust=["u1", "u2", "u1", "u4"]),
                      "{p}: customer id 'u1' appears more than once (rows 1 and 3); ids must be unique"),
        "column": (parquet(tmp_path / "col.parquet", without_city),
                   "{p}: the Parquet schema lacks the leader's field column(s) city"),
        "no-rows": (parquet(tmp_path / "rows.parquet", empty, x0=pa.float64(), age=pa.float64(), y=pa.int64(),
                            code=pa.int64(), cust=pa.string(), city=pa.string()), "{p}: empty input, no rows"),
        "zero-bytes": (zero_bytes, "{p}: empty file, no Parquet schema"),
    }


def test_bad_parquet_gives_one_error_line_and_exit_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job_path = write(tmp_path / "job.yaml", yaml.safe_dump(config(tmp_path, COLUMNS), sort_keys=False))
    for case, (path, message) in bad_parquet_cases(tmp_path).items():
        code, err = run_vfl(monkeypatch, capsys, "prep", "table", "--role", "leader", "--input", path, "--job",
                            job_path)
        assert (code, err) == (3, f"error: {message.format(p=path)}\n"), case
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.npy"))
    garbage = write(tmp_path / "garbage.parquet", "not parquet at all\n")
    code, err = run_vfl(monkeypatch, capsys, "prep", "table", "--role", "leader", "--input", garbage, "--job", job_path)
    assert code == 3 and err.startswith(f"error: {garbage}: not a readable Parquet file (") and err.count("\n") == 1


# --- FATE's real tables ------------------------------------------------------------------------------------

fate = pytest.mark.skipif(not FATE.is_dir(), reason=f"{FATE} not present (the project's shared data)")


def fate_job(tmp_path: Path, name: str, task: str) -> dict[str, object]:
    """A job for one FATE pair: every x column numeric, the guest the leader (label y), the host the follower."""
    def columns(path: Path) -> dict[str, str]:
        with path.open() as handle:
            return {c: "numeric" for c in next(csv.reader(handle)) if c.startswith("x")}

    spec = config(tmp_path, columns(FATE / f"{name}_hetero_guest.csv"), task)
    spec["parties"]["follower"]["columns"] = columns(FATE / f"{name}_hetero_host.csv")  # type: ignore[index]
    spec["parties"]["leader"]["id_column"] = spec["parties"]["follower"]["id_column"] = "id"  # type: ignore[index]
    return spec


@fate
@pytest.mark.parametrize(("name", "task"), [("default_credit", "binary"), ("vehicle_scale", "multiclass"),
                                            ("student", "regression")])
def test_fate_tables_prepare_as_numpy_computes_them(tmp_path: Path, name: str, task: str) -> None:
    spec = parse_job(fate_job(tmp_path, name, task))
    for role, side in (("leader", "guest"), ("follower", "host")):
        source = FATE / f"{name}_hetero_{side}.csv"
        prepare_table(source, spec.table_schema(role), tmp_path / role)
        table = open_table(tmp_path / role)
        raw = pa_csv.read_csv(source)
        x = np.stack([raw.column(c).to_numpy().astype(float) for c in table.meta.fields], axis=1)
        np.testing.assert_array_equal(table.arrays().vals, ((x - x.mean(0)) / x.std(0)).astype(np.float32))
        assert table.arrays().ids.tolist()[0] == list(range(len(table.meta.fields)))
        pq.write_table(raw, tmp_path / f"{role}.parquet", row_group_size=5000)  # and as Parquet: the same bytes
        prepare_table(tmp_path / f"{role}.parquet", spec.table_schema(role), tmp_path / f"{role}-pq")
        same_files(tmp_path / role, tmp_path / f"{role}-pq")
    leader = open_table(tmp_path / "leader")
    y = pa_csv.read_csv(FATE / f"{name}_hetero_guest.csv").column("y").to_numpy()
    labels = leader.arrays().labels
    assert labels is not None and leader.meta.task == task
    if task == "binary":
        assert labels.tolist() == y.tolist() and round(float(labels.mean()), 4) == 0.2212
    elif task == "multiclass":
        assert leader.meta.classes == ("0", "1", "2", "3") and labels.tolist() == y.tolist()
    else:
        np.testing.assert_array_equal(labels, y.astype(np.float32))
