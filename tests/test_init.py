"""`vfl init`: the job it writes loads and runs, the kinds and the task it infers, its one-line refusals."""

from __future__ import annotations

import gzip
import shlex
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import run_vfl
from vfl_cli import init_job
from vfl_cli.commands.init import yaml_str
from vfl_cli.init_job import free_ports, job_name, plan_job, read_sample, training_defaults
from vfl_cli.job import JobSpec, load_job

FATE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fate"
needs_fate = pytest.mark.skipif(not FATE.is_dir(), reason=f"FATE example tables not present at {FATE}")


def write_csv(path: Path, header: list[str], rows: list[list[object]], delimiter: str = ",") -> Path:
    text = delimiter.join(header) + "\n" + "".join(delimiter.join(map(str, row)) + "\n" for row in rows)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


@pytest.fixture
def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A leader and a follower table of 150 customers, run from tmp_path (the 'project root')."""
    monkeypatch.chdir(tmp_path)
    leader = write_csv(tmp_path / "bank_guest.csv", ["id", "y", "amount", "city", "grade", "note"],
                       [[i, i % 2, f"{i * 1.5:.2f}", ["paris", "rome", "oslo"][i % 3], i % 5, ""] for i in range(150)])
    follower = write_csv(tmp_path / "shop_host.csv", ["id", "visits", "y"],
                         [[i, (i * 7) % 50, 3] for i in range(149, -1, -1)])
    return leader, follower


def init(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], leader: Path, follower: Path,
         *more: object, out: str = "jobs/job.yaml") -> tuple[int, str]:
    return run_vfl(monkeypatch, capsys, "init", "--leader", leader, "--follower", follower, "--id", "id",
                   "--label", "y", "--out", out, *more)


def test_the_job_loads_and_its_printed_commands_run(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = init(monkeypatch, capsys, *pair)
    assert code == 0, err
    job = load_job(Path("jobs/job.yaml"))
    assert job.name == "bank" and job.leader.task == "binary" and job.leader.label_column == "y"
    assert job.leader.columns == {"amount": "numeric", "city": "categorical", "grade": "numeric",
                                  "note": "categorical"}
    assert job.follower.columns == {"visits": "numeric"}  # its `y` is left out
    assert job.leader.port != job.follower.port and job.data.threshold == 1
    assert job.model.bottom == "mlp" and job.train.run_dir == Path("runs/bank/train")
    assert job.tls.ca == Path("runs/bank/certs/ca.pem") and job.leader.cert == Path("runs/bank/certs/leader.pem")

    commands = [line.strip() for line in err.splitlines() if line.startswith("  vfl ")]
    text = Path("jobs/job.yaml").read_text()
    assert all(f"#   {command}" in text for command in commands)  # the header lists the same commands
    verbs = [shlex.split(c.split("  #")[0])[1:4] for c in commands]
    assert verbs[:3] == [["certs", "--job", "jobs/job.yaml"], ["prep", "table", "--job"], ["prep", "table", "--job"]]
    assert [v[0] for v in verbs[3:]] == ["psi", "psi", "train", "train", "eval", "eval", "infer", "infer", "report"]
    for command in commands[:3]:  # certs and both tables: one process each, so run them here
        code, out = run_vfl(monkeypatch, capsys, *shlex.split(command.split("  #")[0])[1:])
        assert code == 0, (command, out)
    assert Path("runs/bank/certs/follower.key").is_file()
    assert (Path("runs/bank/data/tables/leader/meta.json").is_file()
            and Path("runs/bank/data/tables/follower/meta.json").is_file())
    code, out = run_vfl(monkeypatch, capsys, "psi", "--job", "jobs/job.yaml", "--role", "local")
    assert code == 0 and Path("runs/bank/data/leader").is_dir() and Path("runs/bank/data/follower").is_dir(), out


def test_comments_say_where_a_kind_or_the_task_was_a_guess(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert init(monkeypatch, capsys, *pair)[0] == 0
    lines = {line.split(":")[0].strip(): line for line in Path("jobs/job.yaml").read_text().splitlines()}
    assert lines["amount"].endswith("amount: numeric")  # obvious: no comment
    assert lines["city"].endswith("city: categorical")
    assert "# integer codes, 5 values: numeric; write categorical if the codes are not ordered" in lines["grade"]
    assert "# empty in all 150 rows read: kind unknown" in lines["note"]
    assert "# 2 values: 0, 1" in lines["task"]
    text = Path("jobs/job.yaml").read_text()
    assert "column named 'y' like the leader's label: left out" in text
    assert "kinds inferred from the first" not in text  # every row was read


def test_kinds_of_mixed_constant_and_free_text_columns() -> None:
    assert init_job.infer_kind(["1", "2.5", "n/a", ""]) == ("categorical", "'n/a' is not a number (1 of 3 values)")
    assert init_job.infer_kind(["7", "7", ""])[1].startswith("one value ('7') in all rows read")
    assert init_job.infer_kind([f"name {i}" for i in range(60)])[1].startswith("every value read differs")
    assert init_job.infer_kind(["inf", "1"])[0] == "categorical"  # not finite
    assert init_job.infer_kind([str(i) for i in range(11)]) == ("numeric", "")  # too many values for codes


@pytest.mark.parametrize(("values", "task", "why"), [
    (["0", "1", "1.0", ""], "binary", "2 values: 0, 1"),
    (["1", "1"], "binary", "only the value 1 in the rows read: binary assumed; check the label"),
    (["0", "1", "2", "3"], "multiclass", "4 integer values 0, 1, 2, 3: multiclass"),
    (["1", "2"], "multiclass", "2 integer values 1, 2: multiclass; binary needs 0/1 labels"),
    (["cat", "dog", "3"], "multiclass", "3 values, not all numbers (3, cat, dog): multiclass"),
    ([str(i) for i in range(21)], "regression",
     "21 integer values 0..20: regression; use --task multiclass for classes"),
    (["0.5", "2.25"], "regression", "2 distinct numbers from 0.5 to 2.25: regression"),
])  # fmt: skip
def test_task_from_the_labels(values: list[str], task: str, why: str) -> None:
    assert init_job.infer_task(values) == (task, why)


@needs_fate
@pytest.mark.parametrize(("name", "task"), [
    ("default_credit", "binary"), ("breast", "binary"), ("vehicle_scale", "multiclass"), ("student", "regression"),
])  # fmt: skip
def test_fate_tables(tmp_path: Path, name: str, task: str) -> None:
    draft = plan_job(FATE / f"{name}_hetero_guest.csv", FATE / f"{name}_hetero_host.csv", "id", "y")
    assert draft.name == name and draft.task == task
    assert [c.name for c in draft.leader.columns][:2] == ["x0", "x1"] and draft.follower.columns[0].name == "x0"
    assert all(c.kind == "numeric" for c in draft.leader.columns + draft.follower.columns)
    if name == "student":  # small integer codes: numeric, with the comment
        assert all(c.note.startswith("integer codes") for c in draft.leader.columns)
        assert draft.task_note == "18 integer values 0..20: regression; use --task multiclass for classes"
    if name == "default_credit":
        assert draft.rows == 30_000 and draft.leader.sample.counted


@needs_fate
def test_fate_job_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = init(monkeypatch, capsys, FATE / "default_credit_hetero_guest.csv",
                     FATE / "default_credit_hetero_host.csv", out="credit.yaml")
    assert code == 0, err
    job = load_job(tmp_path / "credit.yaml")
    assert (len(job.leader.columns), len(job.follower.columns), job.leader.task) == (13, 10, "binary")
    model = job.model
    assert (model.emb_dim, model.deep_layers, model.cut_dim, model.top_layers) == (8, (64, 32), 16, (32,))
    assert (job.train.batch_size, job.train.epochs, job.train.deep_optimizer.lr) == (256, 30, 1e-3)
    assert job.train.early_stopping is not None and job.train.early_stopping.patience == 5
    assert f"--input {(FATE / 'default_credit_hetero_host.csv').resolve()}" in err


def test_task_given_and_refused(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    leader, follower = pair
    code, err = init(monkeypatch, capsys, leader, follower, "--task", "multiclass", "--name", "mine")
    assert code == 0, err
    job = load_job(Path("jobs/job.yaml"))
    assert job.name == "mine" and job.leader.task == "multiclass"
    assert "task: multiclass  # given with --task" in Path("jobs/job.yaml").read_text()

    grades = write_csv(Path("grades.csv"), ["id", "y", "x"], [[i, i % 4, i] for i in range(20)])
    code, err = init(monkeypatch, capsys, grades, follower, "--task", "binary", out="binary.yaml")
    assert code == 2 and not Path("binary.yaml").exists()
    assert err.strip() == ("error: --task binary: the label column 'y' of grades.csv holds values other than 0 and "
                           "1 (2, 3); use --task multiclass or regression")


def error_cases(tmp_path: Path) -> list[tuple[str, list[object], str]]:
    ok = write_csv(tmp_path / "ok.csv", ["id", "y", "x"], [[1, 0, 2.0], [2, 1, 3.0]])
    follower = write_csv(tmp_path / "f.csv", ["id", "z"], [[1, 5], [2, 6]])
    (tmp_path / "empty.csv").write_text("")
    write_csv(tmp_path / "header_only.csv", ["id", "y", "x"], [])
    write_csv(tmp_path / "wide.csv", ["key", "y", *(f"c{i}" for i in range(12))], [[1, 0, *range(12)]])
    write_csv(tmp_path / "twice.csv", ["id", "y", "x", "x"], [[1, 0, 1, 2]])
    write_csv(tmp_path / "noid.csv", ["cid", "z"], [[1, 5]])
    write_csv(tmp_path / "onlyid.csv", ["id"], [[1]])
    (tmp_path / "exists.yaml").write_text("keep me\n")
    f = str(follower)
    return [
        ("missing file", ["--leader", tmp_path / "nope.csv", "--follower", f], "nope.csv: file not found"),
        ("empty file", ["--leader", tmp_path / "empty.csv", "--follower", f], "empty.csv: empty file, no header row"),
        ("header only", ["--leader", tmp_path / "header_only.csv", "--follower", f], "no rows after the header"),
        ("id not in the header", ["--leader", tmp_path / "wide.csv", "--follower", f],
         "wide.csv: no id column 'id' in the header, which has key, y, c0, c1, c2, c3, c4, c5, ... (14 columns)"),
        ("label not in the header", ["--leader", ok, "--follower", f, "--label", "target"],
         "ok.csv: no label column 'target' in the header, which has id, y, x"),
        ("no id at the follower", ["--leader", ok, "--follower", tmp_path / "noid.csv"],
         "noid.csv: no id column 'id' in the header, which has cid, z"),
        ("follower without features", ["--leader", ok, "--follower", tmp_path / "onlyid.csv"],
         "onlyid.csv: no feature columns besides the id column"),
        ("a column twice", ["--leader", tmp_path / "twice.csv", "--follower", f],
         "twice.csv: column 'x' appears twice in the header"),
        ("id is the label", ["--leader", ok, "--follower", f, "--label", "id"], "--id and --label both name 'id'"),
        ("bad name", ["--leader", ok, "--follower", f, "--name", "my job"], "--name 'my job': use letters"),
        ("out exists", ["--leader", ok, "--follower", f, "--out", tmp_path / "exists.yaml"],
         "exists.yaml exists; pass --force to overwrite it"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_errors_are_one_line_and_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], case: int
) -> None:
    what, args, message = error_cases(tmp_path)[case]
    options = {"--id": "id", "--label": "y", "--out": tmp_path / "out" / "job.yaml"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        options[str(flag)] = value
    code, err = run_vfl(monkeypatch, capsys, "init", *(x for pair in options.items() for x in pair))
    assert code in (2, 3), what
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (what, err)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "exists.yaml").read_text() == "keep me\n"


def test_force_overwrites(pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    Path("jobs").mkdir()
    Path("jobs/job.yaml").write_text("old\n")
    assert init(monkeypatch, capsys, *pair, "--force")[0] == 0
    assert load_job(Path("jobs/job.yaml")).name == "bank"


def test_gzip_tsv_and_parquet_and_a_label_only_leader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    leader = write_csv(tmp_path / "labels.tsv.gz", ["id", "y"], [[f"c{i}", i % 3] for i in range(40)], "\t")
    follower = tmp_path / "features.parquet"
    n = range(40)
    pq.write_table(pa.table({"id": [f"c{i}" for i in n], "f": [i / 3 for i in n], "s": [f"v{i % 6}" for i in n],
                             "n": [None if i % 4 else i + 0.5 for i in n], "code": [i % 3 for i in n]}), follower)
    code, err = init(monkeypatch, capsys, leader, follower, out="j.yaml")
    assert code == 0, err
    job = load_job(Path("j.yaml"))
    assert job.name == "labels" and job.leader.columns == {} and job.leader.task == "multiclass"
    assert job.follower.columns == {"f": "numeric", "s": "categorical", "n": "numeric", "code": "numeric"}
    text = Path("j.yaml").read_text()
    assert "n: numeric  # 75% empty" in text and "code: numeric  # integer codes, 3 values" in text
    assert "columns: {}  # no feature columns besides the id and the label: a label-only leader" in text


def test_partial_and_estimated_row_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_csv(tmp_path / "big.csv", ["id", "x", "text"], [[i, i * 0.5, "t" * 90] for i in range(5000)])
    counted = read_sample(path, limit=100)
    assert (len(counted.rows), counted.total_rows, counted.counted) == (100, 5000, True)
    assert counted.partial() == "kinds inferred from the first 100 of 5,000 rows"
    assert read_sample(path, limit=4999).total_rows == 5000 and read_sample(path, limit=5000).partial() == ""
    monkeypatch.setattr(init_job, "COUNT_BYTES", 0)  # as if the file were large: estimated from the sample
    estimated = read_sample(path, limit=2000)
    assert not estimated.counted and 4000 < estimated.total_rows < 6000
    assert "(estimated)" in estimated.partial()


ODD_NAMES = ["yes", "on", "No", "1", "1.5", "null", "~", "a: b", "x#y", "with space", "-x", "'q'", '"dq"',
             "[list]", "{map}", "tab\there", "new\nline", "\x85", "\ufeffbom", "ünï", "emoji \U0001f600", ""]


def test_odd_names_round_trip_through_yaml() -> None:
    for name in ODD_NAMES:
        key = yaml_str(name)
        assert yaml.safe_load(f"{key}: {key}") == {name: name}, key
    assert yaml_str("x0") == "x0" and yaml_str("yes") == '"yes"' and yaml_str("runs/a.b/data") == "runs/a.b/data"


def test_odd_column_names_in_a_written_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    names = ["yes", "on", "1", "a: b", "x#y", "with space", '"x,y"']
    leader = write_csv(tmp_path / "l.csv", ["id", "y", *names], [[i, i % 2, *range(7)] for i in range(12)])
    follower = write_csv(tmp_path / "f.csv", ["id", "label", "true"], [[i, "a", 1.5 * i] for i in range(12)])
    code, err = init(monkeypatch, capsys, leader, follower, "--name", "true", out="odd.yaml")
    assert code == 0, err
    job: JobSpec = load_job(Path("odd.yaml"))
    assert list(job.leader.columns) == [*names[:-1], "x,y"] and job.name == "true"
    assert list(job.follower.columns) == ["label", "true"]  # the default label_column moved off `label`


def test_sizes_ports_and_names() -> None:
    mid = training_defaults(30_000, 23)
    assert mid["model"] == {"bottom": "mlp", "top": "concat", "emb_dim": 8, "deep_layers": [64, 32], "cut_dim": 16,
                            "top_layers": [32]}
    assert {k: mid["train"][k] for k in ("batch_size", "epochs")} == {"batch_size": 256, "epochs": 30}
    assert 2 <= 30_000 * 0.72 / 256 / mid["train"]["log_every"] <= 8  # a few log lines per epoch
    assert 32 <= training_defaults(569, 30)["train"]["batch_size"] <= 64
    big = training_defaults(5_000_000, 40)["train"]
    assert 2048 <= big["batch_size"] <= 4096 and big["epochs"] < mid["train"]["epochs"]
    ports = free_ports(2)
    assert len(set(ports)) == 2
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # still free
    assert job_name(Path("default_credit_hetero_guest.csv")) == "default_credit"
    assert job_name(Path("my data (v2).csv.gz")) == "my_data__v2_" and job_name(Path("guest.csv")) == "guest"
