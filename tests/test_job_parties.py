"""Jobs of any number of parties: the label party, the followers, `--party`, and what is refused at load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_vfl, write_job
from tests.three_parties import three_party_job
from vfl_cli.errors import JobError
from vfl_cli.job import parse_job
from vfl_cli.party import PartyContext


def test_a_three_party_job_has_one_leader_and_two_followers_in_order(tmp_path: Path) -> None:
    job = parse_job(three_party_job(tmp_path))
    assert job.label_party == "leader" and job.followers == ("follower1", "follower2")
    assert job.peers_of("leader") == ("follower1", "follower2") and job.peers_of("follower2") == ("leader",)
    leader, follower = PartyContext.of(job, "leader"), PartyContext.of(job, "follower2")
    assert leader.is_leader and list(leader.peers) == ["follower1", "follower2"] and leader.receives == "embeddings"
    assert not follower.is_leader and list(follower.peers) == ["leader"] and follower.receives == "gradients"
    assert job.party_key("follower1") == "follower1"


def test_the_label_party_may_have_any_key(tmp_path: Path) -> None:
    spec = three_party_job(tmp_path)
    spec["parties"] = {"bank" if key == "leader" else key: party for key, party in spec["parties"].items()}
    spec["label_party"] = "bank"
    job = parse_job(spec)
    assert job.leader is job.parties["bank"] and job.followers == ("follower1", "follower2")
    assert job.table_schema("bank").label is not None and job.table_schema("follower1").label is None
    two = parse_job(three_party_job(tmp_path))
    assert job.fingerprint() != two.fingerprint()  # who holds the label is shared


def test_two_party_fingerprints_are_unchanged_by_the_new_keys() -> None:
    """Two-party jobs keep the fingerprints they had before `label_party` existed (read at 3da2d15, the commit
    before it), so their checkpoints still load."""
    from tests.conftest import REPO
    from vfl_cli.job import load_job

    assert load_job(REPO / "jobs/smoke.yaml").fingerprint() == "6250d6779d8bfab3"
    assert load_job(REPO / "jobs/criteo.yaml").fingerprint() == "71e45be6c22cf8a4"


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(label_party="bank"), "needs the label party 'bank'"),
    (lambda s: s["parties"].update(top=s["parties"].pop("follower2")), "top is reserved"),
    (lambda s: s["parties"]["follower2"].update(name="follower1"), "a name of its own"),
    (lambda s: s["parties"]["follower2"].update(fields=[]), "at least one field"),
    (lambda s: s["parties"]["follower2"].update(fields=["C20", "C14"]), "C14 held by both follower1 and follower2"),
    (lambda s: s["parties"].update({"bad key": s["parties"].pop("follower2")}), "parties.bad key"),
    (lambda s: s.update(metrics={"listen": {"follower3": "127.0.0.1:9100"}}), "follower3 is not a party"),
])
def test_bad_parties_are_one_line_naming_the_problem(tmp_path: Path, change: Any, message: str) -> None:
    spec = three_party_job(tmp_path)
    change(spec)
    with pytest.raises(JobError, match=message):
        parse_job(spec, "job.yaml")


@pytest.mark.parametrize("args, message", [
    (("--role", "follower"), "this job has 2 followers (follower1, follower2); name yours with --party"),
    (("--party", "follower3"), "--party follower3: this job's parties are leader, follower1, follower2"),
    (("--role", "leader", "--party", "leader"), "give --role or --party, not both"),
    ((), "name this party: --party leader | follower1 | follower2"),
])
def test_the_cli_names_the_party_or_says_which_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str], args: tuple[str, ...],
                                                    message: str) -> None:
    job = write_job(tmp_path, three_party_job(tmp_path))
    code, err = run_vfl(monkeypatch, capsys, "train", "--job", job, *args)
    assert code != 0 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
