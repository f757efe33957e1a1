"""Hellos against a real party server on 127.0.0.1 with mutual TLS: a session is never re-opened. A replayed
Hello of an earlier session is refused with 409 and that session's old bodies stay refused; the current
Hello sent again (a retry after a lost answer) is acknowledged and changes nothing; a fresh Hello (a
restarted peer process) still opens a new session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from tests.test_transport import (  # noqa: F401 - certs is a fixture
    LEADER_ENV,
    LEADER_PASSWORD,
    build_job,
    certs,
    cut,
    follower_client,
    hello,
    leader_answer,
    party_server,
    session_of,
    tensor_body,
)
from vfl_cli.job import JobSpec
from vfl_cli.protocol import BatchKey, Hello, session_id
from vfl_cli.telemetry import Telemetry
from vfl_cli.transport.codec import HelloMessage, encode
from vfl_cli.transport.inbox import Inbox

Server = tuple[JobSpec, Inbox, Telemetry]


@pytest.fixture
def server(certs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:  # noqa: F811
    """The leader's server with the session of the fixture's hellos open (the follower's nonce: "follower-nonce")."""
    monkeypatch.setenv(LEADER_ENV, LEADER_PASSWORD)
    job = build_job(certs)
    telemetry = Telemetry("leader")
    with party_server(job, "leader", telemetry) as inbox:
        yield job, inbox, telemetry


def post_hello(client: httpx.Client, job: JobSpec, theirs: Hello) -> httpx.Response:
    return client.post("/v1/hello", content=encode(HelloMessage(theirs), job.fingerprint()))


def post_batch(client: httpx.Client, job: JobSpec, seq: int, session: str) -> httpx.Response:
    body = tensor_body(job, seq=seq, key=BatchKey("train", 0, seq), tensors=cut(4, fill=float(seq)), session=session)
    return client.post("/v1/tensors", content=body)


def test_replayed_hello_of_an_earlier_session_is_409_and_its_bodies_stay_refused(server: Server) -> None:
    job, inbox, telemetry = server
    first = hello(job, "follower")
    old_session = session_id(leader_answer(job))
    restarted = replace(first, nonce="restarted-nonce")
    with follower_client(job) as client:
        assert post_batch(client, job, 1, old_session).json() == {"status": "accepted"}
        assert post_hello(client, job, restarted).status_code == 200  # the peer's process restarted
        assert inbox.pending("bob", "embeddings") == 0  # the old session's queue is gone

        replayed = post_hello(client, job, first)
        assert replayed.status_code == 409, replayed.text
        assert "opened an earlier session" in replayed.json()["error"]
        # Until the leader answers the restarted follower, no session is open with it: nothing is queued.
        response = post_batch(client, job, 1, old_session)
        assert response.status_code == 409 and "no session is open" in response.json()["error"]
        # The leader reruns too and answers the restarted follower's hello: the new session opens.
        answer = replace(hello(job, "leader"), nonce="leader-rerun", group=(restarted.nonce,))
        inbox.expect(answer)
        # The old session stays closed: its bodies, from seq 1 again, are refused and never queued.
        for seq in (1, 2):
            response = post_batch(client, job, seq, old_session)
            assert response.status_code == 409 and "not the current one" in response.json()["error"]
        new_session = session_id(answer)
        assert inbox.session("bob") == new_session and inbox.wait_hello("bob", 0) == restarted
        assert post_batch(client, job, 1, new_session).json() == {"status": "accepted"}
    assert inbox.pending("bob", "embeddings") == 1
    assert telemetry.value("vfl_refusals_total", reason="replayed_hello") == 1


def test_the_current_hello_sent_again_is_acknowledged_and_keeps_the_session(server: Server) -> None:
    """What the sender's retry does when the answer to its hello was lost: nothing restarts."""
    job, inbox, _ = server
    session = session_of(job)
    with follower_client(job) as client:
        assert post_batch(client, job, 1, session).json() == {"status": "accepted"}
        assert post_hello(client, job, hello(job, "follower")).json() == {"status": "ok"}
        assert post_batch(client, job, 1, session).json() == {"status": "duplicate"}  # seq 1 still used
        assert post_batch(client, job, 2, session).json() == {"status": "accepted"}
    assert inbox.session("bob") == session and inbox.pending("bob", "embeddings") == 2
    for seq in (1, 2):  # not taken for a restart: the reader gets both batches, no PeerAborted
        message = inbox.next_tensors("bob", "embeddings", 0)
        assert message is not None and message.seq == seq


def test_the_current_nonce_with_other_contents_is_409(server: Server) -> None:
    job, inbox, _ = server
    with follower_client(job) as client:
        response = post_hello(client, job, replace(hello(job, "follower"), run_id="another-run"))
    assert response.status_code == 409 and "with other contents" in response.json()["error"]
    assert inbox.wait_hello("bob", 0) == hello(job, "follower")
    assert inbox.session("bob") == session_of(job)


def test_every_earlier_nonce_stays_refused(server: Server) -> None:
    """Not only the one before: A, B, C opened in turn, then A and B replayed."""
    job, inbox, _ = server
    first = hello(job, "follower")
    later = [replace(first, nonce=f"nonce-{n}") for n in range(2)]
    with follower_client(job) as client:
        for theirs in later:
            assert post_hello(client, job, theirs).status_code == 200
        for theirs in (first, later[0]):
            assert post_hello(client, job, theirs).status_code == 409
    assert inbox.wait_hello("bob", 0) == later[1]
