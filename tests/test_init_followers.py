"""`vfl init` with more than one follower: keys follower1, follower2, ... or NAME=FILE, a port, a certificate and
columns each, the commands for every party, and one-line refusals of names that cannot be keys."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tests.conftest import run_vfl
from tests.test_init import write_csv
from vfl_cli.errors import JobError
from vfl_cli.init_job import follower_arg, follower_keys, plan_job
from vfl_cli.job import load_job


@pytest.fixture
def tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A leader (150 customers) and three followers' tables (150, 145 and 140 of them), run from tmp_path."""
    monkeypatch.chdir(tmp_path)
    n = range(150)
    return {
        "leader": write_csv(tmp_path / "bank_guest.csv", ["id", "y", "amount", "city"],
                            [[i, i % 2, f"{i * 1.5:.2f}", ["paris", "rome", "oslo"][i % 3]] for i in n]),
        "shop": write_csv(tmp_path / "shop.csv", ["id", "visits"], [[i, (i * 7) % 50] for i in n]),
        "web": write_csv(tmp_path / "web.csv", ["id", "clicks", "browser", "y"],
                         [[i, (i * 3) % 40, ["ff", "chrome"][i % 2], 1] for i in range(145)]),
        "app": write_csv(tmp_path / "app.tsv", ["id", "minutes"], [[i, i * 0.25] for i in range(140)], "\t"),
    }


def init(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], leader: Path, *followers: object,
         out: str = "jobs/job.yaml") -> tuple[int, str]:
    flags = [x for follower in followers for x in ("--follower", follower)]
    return run_vfl(monkeypatch, capsys, "init", "--leader", leader, *flags, "--id", "id", "--label", "y",
                   "--out", out)


def printed(err: str) -> list[str]:
    return [line.strip() for line in err.splitlines() if line.startswith("  vfl ")]


def test_three_parties_load_and_their_printed_commands_run(
    tables: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = init(monkeypatch, capsys, tables["leader"], tables["shop"], tables["web"])
    assert code == 0, err
    job = load_job(Path("jobs/job.yaml"))
    assert list(job.parties) == ["leader", "follower1", "follower2"] and job.label_party == "leader"
    assert job.followers == ("follower1", "follower2")
    assert [p.name for p in job.parties.values()] == ["leader", "follower1", "follower2"]
    assert job.leader.columns == {"amount": "numeric", "city": "categorical"} and job.leader.task == "binary"
    assert job.party("follower1").columns == {"visits": "numeric"}
    assert job.party("follower2").columns == {"clicks": "numeric", "browser": "categorical"}  # its `y` left out
    assert len({p.port for p in job.parties.values()}) == 3
    assert job.party("follower2").cert == Path("runs/bank/certs/follower2.pem")
    assert job.party("follower2").key == Path("runs/bank/certs/follower2.key")
    text = Path("jobs/job.yaml").read_text()
    assert "# the follower2's file has a column named 'y' like the leader's label: left out" in text
    assert "follower1's file has" not in text
    assert "threshold: 1  # 145 rows" in text and "sized for 145 rows" in text  # the smallest file's
    assert f"#   follower2: {tables['web']} (145 rows, 2 feature columns)" in text
    assert "feature columns: 2 leader, 1 follower1, 2 follower2" in err

    commands = printed(err)
    assert all(f"#   {command}" in text for command in commands)  # the header lists the same commands
    argv = [shlex.split(c.split("  #")[0])[1:] for c in commands]
    assert argv[0] == ["certs", "--job", "jobs/job.yaml"]
    assert argv[1:4] == [["prep", "table", "--job", "jobs/job.yaml", "--party", key, "--input", file]
                         for key, file in (("leader", "bank_guest.csv"), ("follower1", "shop.csv"),
                                           ("follower2", "web.csv"))]
    steps = [(a[0], a[a.index("--party") + 1]) for a in argv[4:-1]]
    assert steps == [(verb, key) for verb in ("psi", "train", "eval", "infer")
                     for key in ("leader", "follower1", "follower2")]
    assert [c.split("  # ")[1][:10] for c in commands[4:7]] == ["terminal 1", "terminal 2", "terminal 3"]
    infers = [a for a in argv if a[0] == "infer"]
    assert [("--out" in a) for a in infers] == [True, False, False]  # only the leader writes predictions
    assert argv[-1][0] == "report" and not any("--role" in a for a in argv)
    for command in commands[:4]:  # certs and the three tables: one process each, so run them here
        code, out = run_vfl(monkeypatch, capsys, *shlex.split(command.split("  #")[0])[1:])
        assert code == 0, (command, out)
    assert all(Path(f"runs/bank/certs/{key}.key").is_file() for key in job.parties)
    code, out = run_vfl(monkeypatch, capsys, "psi", "--job", "jobs/job.yaml", "--role", "local")
    assert code == 0 and all(Path(f"runs/bank/data/{key}").is_dir() for key in job.parties), out


def test_named_followers(
    tables: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = init(monkeypatch, capsys, tables["leader"], f"shop={tables['shop']}", "web.eu_2=web.csv")
    assert code == 0, err
    job = load_job(Path("jobs/job.yaml"))
    assert list(job.parties) == ["leader", "shop", "web.eu_2"]
    assert job.party("web.eu_2").name == "web.eu_2" and job.party("shop").columns == {"visits": "numeric"}
    assert job.party("shop").cert == Path("runs/bank/certs/shop.pem")
    assert "vfl prep table --job jobs/job.yaml --party web.eu_2 --input web.csv" in printed(err)

    code, err = init(monkeypatch, capsys, tables["leader"], f"shop={tables['shop']}", out="one.yaml")
    assert code == 0, err  # one named follower: a two-party job, but its key is not `follower`, so --party
    assert list(load_job(Path("one.yaml")).parties) == ["leader", "shop"]
    assert "vfl psi --job one.yaml --party shop  # terminal 2, at the same time" in printed(err)


def test_unnamed_and_named_followers_mixed(
    tables: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = init(monkeypatch, capsys, tables["leader"], tables["shop"], f"web={tables['web']}", tables["app"])
    assert code == 0, err
    job = load_job(Path("jobs/job.yaml"))
    assert list(job.parties) == ["leader", "follower1", "web", "follower2"]  # in the order given
    assert job.party("follower2").columns == {"minutes": "numeric"}
    assert len({p.listen for p in job.parties.values()}) == 4
    assert "sized for 140 rows" in Path("jobs/job.yaml").read_text()
    assert "the terminal 2 to 4 lines after it" in err

    code, err = init(monkeypatch, capsys, tables["leader"], "shop=shop.csv", tables["web"], out="two.yaml")
    assert code == 0, err  # one unnamed follower beside a named one is `follower`
    assert list(load_job(Path("two.yaml")).parties) == ["leader", "shop", "follower"]


def test_one_unnamed_follower_keeps_the_two_party_commands(
    tables: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = init(monkeypatch, capsys, tables["leader"], tables["shop"])
    assert code == 0, err
    assert printed(err)[1:5] == [
        "vfl prep table --job jobs/job.yaml --role leader --input bank_guest.csv",
        "vfl prep table --job jobs/job.yaml --role follower --input shop.csv",
        "vfl psi --job jobs/job.yaml --role leader  # terminal 1",
        "vfl psi --job jobs/job.yaml --role follower  # terminal 2, at the same time",
    ]
    text = Path("jobs/job.yaml").read_text()
    assert f"#   leader:   {tables['leader']} (" in text and f"#   follower: {tables['shop']} (" in text
    assert "(a terminal 1 line and the terminal 2 line after it\n# run at the same time):" in text
    assert "seed: 0  # shared by both parties:" in text and "the two parties share this machine" in text


@pytest.mark.parametrize(("followers", "message"), [
    (["a=shop.csv", "a=web.csv"], "--follower: two followers are named 'a'"),
    (["follower1=shop.csv", "web.csv", "app.tsv"], "--follower: two followers are named 'follower1'"),
    (["follower=shop.csv", "web.csv"], "--follower: two followers are named 'follower'"),
    (["leader=shop.csv"], "--follower leader=shop.csv: 'leader' is reserved"),
    (["shop.csv", "local=web.csv"], "--follower local=web.csv: 'local' is reserved"),
    (["shop="], "--follower shop=: name the file after the '='"),
    (["shop.csv", "nope.csv"], "nope.csv: file not found"),
])  # fmt: skip
def test_follower_names_refused_in_one_line(
    tables: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    followers: list[str], message: str
) -> None:
    code, err = init(monkeypatch, capsys, tables["leader"], *followers, out="out/job.yaml")
    assert code in (2, 3) and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not Path("out").exists()


def test_follower_values_and_keys() -> None:
    assert follower_arg("shop=data/shop.csv") == ("shop", Path("data/shop.csv"))
    assert follower_arg("a=b=c.csv") == ("a", Path("b=c.csv"))  # split at the first '='
    assert follower_arg("./a=b.csv") == Path("./a=b.csv")  # './a' is no name: a file
    assert follower_arg("data/x.csv") == Path("data/x.csv") and follower_arg("=x.csv") == Path("=x.csv")
    assert follower_keys([Path("a.csv")]) == [("follower", Path("a.csv"))]
    assert follower_keys([Path("a.csv"), ("n", Path("b.csv")), Path("c.csv")]) == [
        ("follower1", Path("a.csv")), ("n", Path("b.csv")), ("follower2", Path("c.csv"))]
    with pytest.raises(JobError, match="at least one follower"):
        follower_keys([])


def test_plan_job_takes_a_list_of_followers(tables: dict[str, Path]) -> None:
    draft = plan_job(tables["leader"], [tables["shop"], ("web", tables["web"])], "id", "y")
    assert [p.key for p in draft.parties] == ["leader", "follower", "web"] and draft.follower.key == "follower"
    assert draft.rows == 145 and len(set(draft.ports)) == 3 and not draft.two_party
    assert plan_job(tables["leader"], tables["shop"], "id", "y").two_party
