"""Three parties over real mutual TLS: a leader and two followers as `HttpsGrid`s on 127.0.0.1, each with its own
certificate from `vfl certs`. Each follower's messages reach the leader as that follower's and no other's, an
impostor holding one follower's certificate at the other's address gets no byte, and a follower's certificate
cannot speak for the other follower nor talk to it."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import free_port, write_job
from tests.test_identity import AccessLog
from tests.three_parties import PASSWORDS, make_certs, three_party_job
from vfl_cli.errors import PeerTimeout, TlsError
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.party import PartyContext
from vfl_cli.protocol import BatchKey, Hello, session_id
from vfl_cli.transport.codec import HelloMessage, encode
from vfl_cli.transport.https_grid import HttpsGrid
from vfl_cli.transport.inbox import Inbox
from vfl_cli.transport.listener import ServerThread
from vfl_cli.transport.server import create_app
from vfl_cli.transport.tls import server_ssl_context

FOLLOWERS = ("follower1", "follower2")
KEY = BatchKey("train", 0, 1)


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The three-party job with TLS, and every party's certificate made once by `vfl certs`."""
    root = tmp_path_factory.mktemp("grid_identity")
    spec = three_party_job(root, tls=True)
    make_certs(write_job(root, spec))
    return spec


@pytest.fixture(autouse=True)
def passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in PASSWORDS.items():  # every party's key is encrypted
        monkeypatch.setenv(name, value)


def job_of(spec: dict[str, Any], **transport: Any) -> JobSpec:
    """The job with fresh ports (the certificates name 127.0.0.1, not a port) and these transport settings."""
    fresh = {**spec, "transport": {"timeout_s": 5, "connect_timeout_s": 10, "retries": 2, **transport}}
    fresh["parties"] = {key: {**party, "listen": f"127.0.0.1:{free_port()}"} for key, party in spec["parties"].items()}
    return parse_job(fresh)


def hello(job: JobSpec, key: str) -> Hello:
    return Hello(role=key, name=job.parties[key].name, job_fingerprint=job.fingerprint(),
                 data_fingerprint={"train": {"rows": 10, "sample_ids_digest": "00"}}, command="train",
                 nonce=f"{key}-nonce")


def cut(job: JobSpec, fill: float, batch: int = 4) -> dict[str, torch.Tensor]:
    """A follower's cut tensors for this job, every value `fill`."""
    widths = PartyContext.of(job, FOLLOWERS[0]).cut_widths
    return {name: torch.full((batch, width), fill) for name, width in widths.items()}


def same(got: dict[str, Any], sent: dict[str, torch.Tensor]) -> bool:
    return got.keys() == sent.keys() and all(torch.equal(got[name], sent[name]) for name in sent)


@contextmanager
def grids(job: JobSpec, *keys: str) -> Iterator[dict[str, HttpsGrid]]:
    started: dict[str, HttpsGrid] = {}
    try:
        for key in keys:
            started[key] = HttpsGrid(PartyContext.of(job, key))
        yield started
    finally:
        for grid in started.values():
            grid.close()


def handshake_all(job: JobSpec, parties: dict[str, HttpsGrid]) -> Hello:
    """The leader and both followers shake hands at once; returns the leader's answer (the session's)."""
    mine = {key: hello(job, key) for key in parties}
    answer = replace(mine["leader"], group=tuple(mine[key].nonce for key in FOLLOWERS))
    with ThreadPoolExecutor(len(parties)) as pool:
        futures = {key: pool.submit(grid.handshake, mine[key], lambda theirs, m=mine[key]: m)
                   for key, grid in parties.items()}
        theirs = {key: future.result(timeout=30) for key, future in futures.items()}
    assert theirs["leader"] == {key: mine[key] for key in FOLLOWERS}
    for key in FOLLOWERS:
        assert theirs[key] == {"leader": answer}
    return answer


@pytest.fixture
def star(spec: dict[str, Any]) -> Iterator[tuple[JobSpec, dict[str, HttpsGrid]]]:
    """A leader and two followers, their handshake done (transport.timeout_s 1 s, for waits that must fail)."""
    job = job_of(spec, timeout_s=1)
    with grids(job, "leader", *FOLLOWERS) as parties:
        answer = handshake_all(job, parties)
        assert {grid._session for grid in parties.values()} == {session_id(answer)}
        yield job, parties


def raw_client(job: JobSpec, as_key: str, to_key: str) -> httpx.Client:
    """A client that trusts the job's CA and presents party `as_key`'s certificate to party `to_key`'s server."""
    party = job.parties[as_key]
    assert job.tls.ca is not None and party.cert is not None and party.key is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(job.tls.ca))
    context.load_cert_chain(str(party.cert), str(party.key), password=PASSWORDS[f"VFL_{as_key.upper()}_KEY_PASSWORD"])
    return httpx.Client(base_url=f"https://{job.parties[to_key].listen}", verify=context, timeout=5, trust_env=False,
                        headers={"content-type": "application/msgpack"})


# ------------------------------------------------------------------------------------------------------- tests


def test_each_followers_embeddings_reach_the_leader_as_that_followers(
    star: tuple[JobSpec, dict[str, HttpsGrid]],
) -> None:
    job, parties = star
    sent = {"follower1": cut(job, 1.0), "follower2": cut(job, 2.0)}
    for key in FOLLOWERS:  # the same batch from both
        parties[key].send("leader", "embeddings", KEY, sent[key])
    for key in reversed(FOLLOWERS):  # in either order
        assert same(parties["leader"].receive(key, "embeddings", KEY), sent[key])
    # And back: each follower gets its own gradients, sent to both at once.
    parties["leader"].send_each("gradients", KEY, {key: {n: -t for n, t in sent[key].items()} for key in FOLLOWERS})
    for key in FOLLOWERS:
        assert same(parties[key].receive("leader", "gradients", KEY), {n: -t for n, t in sent[key].items()})
    received = parties["leader"].bytes_received
    assert received == parties["follower1"].bytes_sent + parties["follower2"].bytes_sent > 0


def test_impostor_with_follower1s_certificate_at_follower2s_address_receives_nothing(spec: dict[str, Any]) -> None:
    job = job_of(spec)
    inbox = Inbox()
    access = AccessLog(create_app(inbox, PartyContext.of(job, "follower2")))
    impostor = ServerThread(access, "127.0.0.1", job.parties["follower2"].port,  # type: ignore[arg-type]
                            server_ssl_context(job, "follower1"))
    impostor.start()
    try:
        with grids(job, "leader") as parties:
            with pytest.raises(TlsError, match=r"is not the job's peer 'follower2': it presented certificate CN "
                               r"'follower1'.*nothing was sent to it"):
                parties["leader"].send("follower2", "gradients", KEY, cut(job, 3.0))
            assert parties["leader"].bytes_sent == 0
    finally:
        impostor.stop()
    assert access.requests == []
    assert inbox.bytes_received == 0


def test_follower1s_certificate_cannot_speak_for_follower2_nor_reach_it(spec: dict[str, Any]) -> None:
    job = job_of(spec)
    with grids(job, "leader", "follower2") as parties:
        leader_inbox, follower2_inbox = parties["leader"]._inbox, parties["follower2"]._inbox
        claims = [hello(job, "follower2"), replace(hello(job, "follower2"), name="follower1")]
        with raw_client(job, "follower1", "leader") as client:
            for claim in claims:
                response = client.post("/v1/hello", content=encode(HelloMessage(claim), job.fingerprint()))
                assert response.status_code == 400, response.text
                assert "expects the follower1 'follower1' on this certificate" in response.json()["error"]
        assert leader_inbox.wait_hello("follower2", 0) is None and leader_inbox.wait_hello("follower1", 0) is None
        assert leader_inbox.bytes_received == 0
        # A follower accepts only the leader: follower1's certificate gets a 403 there, whatever it sends.
        with raw_client(job, "follower1", "follower2") as client:
            for method, path, body in (
                ("POST", "/v1/hello", encode(HelloMessage(hello(job, "follower1")), job.fingerprint())),
                ("POST", "/v1/hello", encode(HelloMessage(hello(job, "leader")), job.fingerprint())),
                ("GET", "/v1/health", None),
            ):
                response = client.request(method, path, content=body)
                assert response.status_code == 403, path
                assert response.json() == {"error": "the client certificate is not the job's peer's"}
        assert follower2_inbox.bytes_received == 0
        assert follower2_inbox.wait_hello("follower1", 0) is None and follower2_inbox.wait_hello("leader", 0) is None


def test_a_message_of_follower1s_session_is_never_applied_as_follower2s(
    star: tuple[JobSpec, dict[str, HttpsGrid]],
) -> None:
    job, parties = star
    leader = parties["leader"]
    sent = cut(job, 4.0)
    parties["follower1"].send("leader", "embeddings", KEY, sent)
    started = time.monotonic()
    with pytest.raises(PeerTimeout, match="no embeddings for train epoch 0 step 1 from the follower2"):
        leader.receive("follower2", "embeddings", KEY)
    assert 1.0 <= time.monotonic() - started < 3.0  # transport.timeout_s
    assert leader._inbox.pending("follower2", "embeddings") == 0
    assert same(leader.receive("follower1", "embeddings", KEY), sent)
