"""The HTTPS transport for real: uvicorn servers on 127.0.0.1 with mutual TLS and certificates from
`make_dev_certs`; two `HttpsGrid`s talking, and raw httpx clients trying everything the server must refuse."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import torch

from vfl_cli.errors import (
    PeerAborted,
    PeerError,
    PeerRefused,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    TlsError,
)
from vfl_cli.job import JobSpec, Role, TlsSpec, parse_job
from vfl_cli.party import PartyContext
from vfl_cli.protocol import BatchKey, Hello, session_id
from vfl_cli.telemetry import Telemetry
from vfl_cli.transport.codec import AbortMessage, HelloMessage, TensorMessage, encode
from vfl_cli.transport.https_grid import HttpsGrid
from vfl_cli.transport.inbox import Inbox
from vfl_cli.transport.listener import ServerThread
from vfl_cli.transport.server import create_app
from vfl_cli.transport.tls import make_dev_certs, server_ssl_context

LEADER_ENV = "VFL_TEST_TRANSPORT_LEADER_PASSWORD"
LEADER_PASSWORD = "correct horse"
BATCH = 64
KEY = BatchKey("train", 0, 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Certificates of the job's CA in certs/, of an unrelated CA in other/; the leader's key is encrypted."""
    root = tmp_path_factory.mktemp("transport")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(LEADER_ENV, LEADER_PASSWORD)
        make_dev_certs(build_job(root / "certs"))
        make_dev_certs(build_job(root / "other", name="other"))
        yield root / "certs"


def build_job(certs_dir: Path, name: str = "transport", tls: bool = True, **transport: Any) -> JobSpec:
    def party(role: str, party_name: str, fields: list[str]) -> dict[str, Any]:
        return {
            "name": party_name,
            "fields": fields,
            "listen": f"127.0.0.1:{free_port()}",
            "cert": str(certs_dir / f"{role}.pem"),
            "key": str(certs_dir / f"{role}.key"),
            **({"key_password_env": LEADER_ENV} if role == "leader" else {}),
        }

    return parse_job(
        {
            "name": name,
            "parties": {
                "leader": party("leader", "alice", ["I1", "C1"]),
                "follower": party("follower", "bob", ["I2"]),
            },
            "train": {"batch_size": BATCH},
            "transport": {
                "timeout_s": 5,
                "connect_timeout_s": 5,
                "retries": 2,
                "max_body_bytes": 64 * 1024,
                **transport,
            },
            "tls": {"enabled": tls, "ca": str(certs_dir / "ca.pem")},
        }
    )


def hello(job: JobSpec, role: str) -> Hello:
    return Hello(
        role=role,
        name=job.party(role).name,
        job_fingerprint=job.fingerprint(),  # type: ignore[arg-type]
        data_fingerprint={"train": {"rows": 10, "sample_ids_digest": "00"}},
        command="train",
        nonce=f"{role}-nonce",  # fixed, so that the tests know the session id
    )


def leader_answer(job: JobSpec) -> Hello:
    """The leader's Hello as its handshake answers the follower's: naming the follower's nonce in its group."""
    return replace(hello(job, "leader"), group=(hello(job, "follower").nonce,))


def plain(mine: Hello) -> Callable[[dict[str, Hello]], Hello]:
    """The leader's reply for a plain handshake: its own Hello, whoever the followers are."""
    return lambda theirs: mine


def session_of(job: JobSpec) -> str:
    return session_id(leader_answer(job))


def cut(batch: int = 8, fill: float | None = None) -> dict[str, torch.Tensor]:
    if fill is not None:
        return {"wide": torch.full((batch, 1), fill), "deep": torch.full((batch, 1), -fill)}
    return {"wide": torch.randn(batch, 1), "deep": torch.randn(batch, 1)}


def connect(job: JobSpec) -> tuple[HttpsGrid, HttpsGrid]:
    leader, follower = HttpsGrid(PartyContext.of(job, "leader")), HttpsGrid(PartyContext.of(job, "follower"))
    with ThreadPoolExecutor(1) as pool:
        mine = hello(job, "follower")
        theirs = pool.submit(follower.handshake, mine, plain(mine))
        assert leader.handshake(hello(job, "leader"), plain(hello(job, "leader"))) == {"follower": mine}
        assert theirs.result(timeout=10) == {"leader": leader_answer(job)}
    return leader, follower


@pytest.fixture
def pair(certs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[JobSpec, HttpsGrid, HttpsGrid]]:
    monkeypatch.setenv(LEADER_ENV, LEADER_PASSWORD)
    job = build_job(certs)
    leader, follower = connect(job)
    try:
        yield job, leader, follower
    finally:
        leader.close()
        follower.close()


@contextmanager
def party_server(job: JobSpec, role: Role, telemetry: Telemetry | None = None) -> Iterator[Inbox]:
    """Party `role`'s server alone, its limits from the job, with the session that a real handshake would open
    (the peer's Hello put in directly: no bytes counted), for raw clients to poke at."""
    ctx = PartyContext.of(job, role)
    (peer_role,) = ctx.peers
    inbox = Inbox(job.transport.max_pending)
    server = ServerThread(
        create_app(inbox, ctx, telemetry), "127.0.0.1", job.party(role).port,
        server_ssl_context(job, role),
        read_timeout_s=job.transport.read_timeout_s, max_unauthenticated=job.transport.max_unauthenticated,
        on_refusal=telemetry.refused if telemetry is not None else None,
    )
    server.start()
    inbox.expect(leader_answer(job) if ctx.is_leader else hello(job, role))
    inbox.put_hello(job.party(peer_role).name, hello(job, peer_role) if ctx.is_leader else leader_answer(job))
    try:
        yield inbox
    finally:
        server.stop()


@pytest.fixture
def leader_server(certs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[JobSpec, Inbox]]:
    monkeypatch.setenv(LEADER_ENV, LEADER_PASSWORD)
    job = build_job(certs, read_timeout_s=2, max_unauthenticated=8, max_pending=4)
    with party_server(job, "leader") as inbox:
        yield job, inbox


def raw_client(
    job: JobSpec,
    cert: Path | None = None,
    key: Path | None = None,
    password: str | None = None,
) -> httpx.Client:
    """A client that trusts the job's CA and presents `cert` (the follower's by default, None for "none")."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert job.tls.ca is not None
    context.load_verify_locations(cafile=str(job.tls.ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key), password=password)
    return httpx.Client(base_url=f"https://{job.leader.listen}", verify=context, timeout=5, trust_env=False)


def follower_client(job: JobSpec) -> httpx.Client:
    assert job.follower.cert is not None and job.follower.key is not None
    return raw_client(job, job.follower.cert, job.follower.key)


def tensor_body(
    job: JobSpec,
    seq: int = 1,
    key: BatchKey = KEY,
    kind: str = "embeddings",
    tensors: dict[str, torch.Tensor] | None = None,
    fingerprint: str | None = None,
    session: str | None = None,
) -> bytes:
    message = TensorMessage(
        session_of(job) if session is None else session, kind, key, seq,  # type: ignore[arg-type]
        cut() if tensors is None else tensors,
    )
    return encode(message, fingerprint or job.fingerprint())


def assert_nothing_applied(job: JobSpec, inbox: Inbox) -> None:
    assert inbox.pending("bob", "embeddings") == inbox.pending("bob", "gradients") == 0
    assert inbox.bytes_received == 0 and inbox.aborted("bob") is None
    assert inbox.wait_hello("bob", 0) == hello(job, "follower")  # the fixture's, not replaced
    with follower_client(job) as client:  # seq 1 is still free: the refused message used nothing up
        assert client.post("/v1/tensors", content=tensor_body(job, seq=1)).json() == {"status": "accepted"}


# ---------------------------------------------------------------------------------------------- happy path


def test_training_steps_both_ways(pair: tuple[JobSpec, HttpsGrid, HttpsGrid]) -> None:
    _, leader, follower = pair
    for step in range(1, 4):
        key = BatchKey("train", 1, step)
        sent = cut(16)
        follower.send("leader", "embeddings", key, sent)
        got = leader.receive("follower", "embeddings", key)
        assert all(torch.equal(got[name], sent[name]) for name in sent)
        leader.send("follower", "gradients", key, {name: t * 2 for name, t in got.items()})
        back = follower.receive("leader", "gradients", key)
        assert all(torch.equal(back[name], sent[name] * 2) for name in sent)
    assert follower.bytes_sent == leader.bytes_received > 3 * 2 * 16 * 4
    assert leader.bytes_sent == follower.bytes_received > 0


def test_psi_points_go_both_ways(pair: tuple[JobSpec, HttpsGrid, HttpsGrid]) -> None:
    _, leader, follower = pair
    points = torch.randint(0, 256, (5, 32), dtype=torch.uint8)
    key = BatchKey("psi", 0, 0)
    follower.send("leader", "psi_blinded", key, {"points": points})
    leader.send("follower", "psi_blinded", key, {"points": points.flip(0)})
    assert torch.equal(leader.receive("follower", "psi_blinded", key)["points"], points)
    assert torch.equal(follower.receive("leader", "psi_blinded", key)["points"], points.flip(0))
    leader.send("follower", "psi_reblinded", key, {"points": points[:2]})
    assert torch.equal(follower.receive("leader", "psi_reblinded", key)["points"], points[:2])


def test_resend_is_acknowledged_and_ignored_and_out_of_order_is_409(
    pair: tuple[JobSpec, HttpsGrid, HttpsGrid],
) -> None:
    job, leader, follower = pair
    follower.send("leader", "embeddings", KEY, cut(4, fill=1.0))
    with follower_client(job) as client:
        # The same message again, as after a lost acknowledgement: 200, dropped.
        response = client.post("/v1/tensors", content=tensor_body(job, seq=1, tensors=cut(4, fill=1.0)))
        assert response.status_code == 200 and response.json() == {"status": "duplicate"}
        response = client.post("/v1/tensors", content=tensor_body(job, seq=1, key=BatchKey("train", 0, 9)))
        assert response.status_code == 409 and "already used" in response.json()["error"]
        response = client.post("/v1/tensors", content=tensor_body(job, seq=3, key=BatchKey("train", 0, 3)))
        assert response.status_code == 409 and "gap" in response.json()["error"]
        follower.send("leader", "embeddings", BatchKey("train", 0, 2), cut(4, fill=2.0))
        response = client.post("/v1/tensors", content=tensor_body(job, seq=1))
        assert response.status_code == 409 and "from the past" in response.json()["error"]
    assert leader.receive("follower", "embeddings", KEY)["wide"][0, 0] == 1.0
    assert leader.receive("follower", "embeddings", BatchKey("train", 0, 2))["wide"][0, 0] == 2.0
    assert leader._inbox.pending("bob", "embeddings") == 0  # nothing else was queued


def test_refusal_is_peer_refused_and_frees_the_seq(pair: tuple[JobSpec, HttpsGrid, HttpsGrid]) -> None:
    _, leader, follower = pair
    with pytest.raises(
        PeerRefused, match=r"alice refused embeddings for train epoch 0 step 1: .*shape \[4, 2\]"
    ):
        follower.send("leader", "embeddings", KEY, {"wide": torch.zeros(4, 2), "deep": torch.zeros(4, 2)})
    follower.send("leader", "embeddings", KEY, cut(4, fill=3.0))
    assert leader.receive("follower", "embeddings", KEY)["deep"][0, 0] == -3.0


def test_batch_out_of_order_is_a_protocol_error(pair: tuple[JobSpec, HttpsGrid, HttpsGrid]) -> None:
    _, leader, follower = pair
    follower.send("leader", "embeddings", BatchKey("train", 0, 2), cut())
    with pytest.raises(ProtocolError,
                       match="expected embeddings for train epoch 0 step 1 from the follower, got .* step 2"):
        leader.receive("follower", "embeddings", KEY)


def test_abort_wakes_a_waiting_receive(pair: tuple[JobSpec, HttpsGrid, HttpsGrid]) -> None:
    _, leader, follower = pair
    timer = threading.Timer(0.2, follower.abort, args=("disk full",))
    started = time.monotonic()
    timer.start()
    with pytest.raises(PeerAborted, match="the peer stopped: disk full"):
        leader.receive("follower", "embeddings", KEY)
    timer.join()
    assert time.monotonic() - started < 2.0  # timeout_s is 5: the abort woke it


def test_receive_times_out(certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LEADER_ENV, LEADER_PASSWORD)
    job = build_job(certs, timeout_s=1)
    with HttpsGrid(PartyContext.of(job, "leader")) as leader:
        started = time.monotonic()
        with pytest.raises(
            PeerTimeout,
            match=r"no embeddings for train epoch 0 step 1 from the follower 'bob' within 1 s; "
            r"is it still running\?",
        ):
            leader.receive("follower", "embeddings", KEY)
        assert 1.0 <= time.monotonic() - started < 2.0


def test_unreachable_peer(certs: Path) -> None:
    job = build_job(certs, timeout_s=1.5, connect_timeout_s=1)
    with HttpsGrid(PartyContext.of(job, "follower")) as follower:  # no leader is listening
        started = time.monotonic()
        with pytest.raises(PeerUnreachable, match=rf"to alice at https://{job.leader.listen} .*ConnectError"):
            follower.send("leader", "embeddings", KEY, cut())
        with pytest.raises(PeerUnreachable, match="our hello"):
            follower.handshake(hello(job, "follower"), plain(hello(job, "follower")))
        assert time.monotonic() - started < 3.0


def test_plain_http_when_tls_is_disabled(certs: Path, caplog: pytest.LogCaptureFixture) -> None:
    job = build_job(certs, tls=False)
    leader, follower = connect(job)
    try:
        follower.send("leader", "embeddings", KEY, cut(2, fill=5.0))
        assert leader.receive("follower", "embeddings", KEY)["wide"][1, 0] == 5.0
    finally:
        leader.close()
        follower.close()
    assert "plain HTTP" in caplog.text


def test_server_from_another_ca_is_a_tls_error(leader_server: tuple[JobSpec, Inbox], certs: Path) -> None:
    job, inbox = leader_server
    distrustful = job.model_copy(update={"tls": TlsSpec(enabled=True, ca=certs.parent / "other" / "ca.pem")})
    with HttpsGrid(PartyContext.of(distrustful, "follower")) as follower:
        with pytest.raises(TlsError, match=rf"server at https://{job.leader.listen} failed certificate"):
            follower.handshake(hello(job, "follower"), plain(hello(job, "follower")))
    assert inbox.bytes_received == 0


def test_taken_port_is_a_clear_error(certs: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        plain = PartyContext.of(build_job(certs, tls=False), "leader")
        server = ServerThread(create_app(Inbox(), plain), "127.0.0.1", port)
        with pytest.raises(PeerError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            server.start()


# ---------------------------------------------------------------------------------------------- refusals


def test_no_client_certificate_fails_the_tls_handshake(leader_server: tuple[JobSpec, Inbox]) -> None:
    job, inbox = leader_server
    with raw_client(job) as client, pytest.raises(httpx.TransportError) as failure:
        client.post("/v1/tensors", content=tensor_body(job))
    assert "CERTIFICATE_VERIFY_FAILED" not in str(failure.value)  # the server refused us, not we it
    assert_nothing_applied(job, inbox)


def test_certificate_from_another_ca_fails_the_tls_handshake(
    leader_server: tuple[JobSpec, Inbox], certs: Path
) -> None:
    job, inbox = leader_server
    other = certs.parent / "other"
    stranger = raw_client(job, other / "follower.pem", other / "follower.key")  # CN bob, but not our CA's bob
    with stranger as client, pytest.raises(httpx.TransportError) as failure:
        client.post("/v1/tensors", content=tensor_body(job))
    assert "CERTIFICATE_VERIFY_FAILED" not in str(failure.value)
    assert_nothing_applied(job, inbox)


def test_wrong_party_name_is_403(leader_server: tuple[JobSpec, Inbox]) -> None:
    job, inbox = leader_server
    assert job.leader.cert is not None and job.leader.key is not None
    # The leader's own certificate: right CA, but CN alice where the leader expects bob.
    with raw_client(job, job.leader.cert, job.leader.key, LEADER_PASSWORD) as client:
        for method, path, body in (
            ("POST", "/v1/tensors", tensor_body(job)),
            ("GET", "/v1/health", None),
            ("POST", "/v1/hello", encode(HelloMessage(hello(job, "follower")), "x")),
        ):
            response = client.request(method, path, content=body)
            assert response.status_code == 403, path
            assert response.json() == {"error": "the client certificate is not the job's peer's"}
    assert_nothing_applied(job, inbox)


def test_health(leader_server: tuple[JobSpec, Inbox]) -> None:
    job, _ = leader_server
    with follower_client(job) as client:
        assert client.get("/v1/health").json() == {"status": "ok", "role": "leader", "name": "alice"}


def _with_tensor(job: JobSpec, raw_tensor: dict[str, Any]) -> bytes:
    body = msgpack.unpackb(tensor_body(job), raw=False)
    body["tensors"]["wide"] = raw_tensor
    return msgpack.packb(body, use_bin_type=True)


def _bytes_names(job: JobSpec) -> bytes:
    body = msgpack.unpackb(tensor_body(job), raw=False)
    body["tensors"] = {name.encode(): value for name, value in body["tensors"].items()}
    return msgpack.packb(body, use_bin_type=True)


def malformed_bodies(job: JobSpec) -> dict[str, tuple[bytes, int, str]]:
    """name -> (body, expected status, text in the error)."""
    good = cut(4)
    return {
        "not-msgpack": (b"\x93\x01 not msgpack", 400, "not valid msgpack"),
        "not-a-map": (msgpack.packb([1, 2]), 400, "body: expected a map"),
        "shape": (
            tensor_body(job, tensors={"wide": torch.zeros(4, 2), "deep": torch.zeros(4, 2)}),
            400,
            "tensors.wide: shape [4, 2], expected [B, 1]",
        ),
        "flat": (
            tensor_body(job, tensors={"wide": torch.zeros(4), "deep": torch.zeros(4)}),
            400,
            "expected [B, 1]",
        ),
        "dtype": (
            tensor_body(job, tensors={n: t.double() for n, t in good.items()}),
            400,
            "dtype float64, expected float32",
        ),
        "names": (
            tensor_body(job, tensors={"wide": good["wide"], "logits": good["deep"]}),
            400,
            "expected exactly wide, deep; got logits, wide",
        ),
        "batch-too-big": (
            tensor_body(job, tensors=cut(BATCH + 1)),
            400,
            f"batch of {BATCH + 1}, expected 1..{BATCH}",
        ),
        "batch-differs": (
            tensor_body(job, tensors={"wide": torch.zeros(4, 1), "deep": torch.zeros(5, 1)}),
            400,
            "batch sizes differ",
        ),
        "empty-batch": (tensor_body(job, tensors=cut(0)), 400, "dimensions must lie in 1.."),
        "nan": (
            tensor_body(job, tensors={"wide": torch.full((4, 1), float("nan")), "deep": good["deep"]}),
            400,
            "NaN or infinity",
        ),
        "wrong-kind": (
            tensor_body(job, kind="gradients"),
            400,
            "this leader receives embeddings, psi_blinded, psi_reblinded, not gradients",
        ),
        "other-job": (
            tensor_body(job, fingerprint="feedfacefeedface"),
            409,
            "job fingerprint feedfacefeedface",
        ),
        "gap": (tensor_body(job, seq=2), 409, "leaves a gap"),
        "psi-float-points": (
            tensor_body(job, kind="psi_blinded", tensors={"points": torch.zeros(4, 32)}), 400,
            "tensors.points: float32 [4, 32], expected uint8 [n, 32]",
        ),
        "psi-narrow-points": (
            tensor_body(job, kind="psi_blinded", tensors={"points": torch.zeros(4, 31, dtype=torch.uint8)}), 400,
            "expected uint8 [n, 32]",
        ),
        "psi-cut-tensors": (tensor_body(job, kind="psi_reblinded"), 400, "expected exactly points; got deep, wide"),
        "earlier-session": (tensor_body(job, session="0123456789abcdef"), 409, "is not the current one"),
        "no-session": (tensor_body(job, session=""), 409, "is not the current one"),
        "abort-of-earlier-session": (
            encode(AbortMessage("0123456789abcdef", "stale"), job.fingerprint()), 400, "expected a tensors message",
        ),
        "zero-size-huge-dims": (_with_tensor(job, {"dtype": "float32", "shape": [0, 2**40], "data": b""}), 400,
                                "dimensions must lie in"),
        "bytes-names": (_bytes_names(job), 400, "keys must be strings"),
        "hello-as-tensors": (
            encode(HelloMessage(hello(job, "follower")), job.fingerprint()),
            400,
            "expected a tensors message, got HelloMessage",
        ),
    }


@pytest.mark.parametrize(
    "case",
    list(
        malformed_bodies(
            parse_job(
                {
                    "name": "x",
                    "parties": {
                        "leader": {"name": "a", "fields": ["I1"]},
                        "follower": {"name": "b", "fields": ["I2"]},
                    },
                }
            )
        )
    ),
)
def test_bad_tensor_messages_are_refused_and_not_applied(
    leader_server: tuple[JobSpec, Inbox], case: str
) -> None:
    job, inbox = leader_server
    body, status, needle = malformed_bodies(job)[case]
    with follower_client(job) as client:
        response = client.post("/v1/tensors", content=body)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]
    assert_nothing_applied(job, inbox)


def test_hello_from_the_wrong_role_is_refused(leader_server: tuple[JobSpec, Inbox]) -> None:
    job, inbox = leader_server
    with follower_client(job) as client:
        response = client.post(
            "/v1/hello", content=encode(HelloMessage(hello(job, "leader")), job.fingerprint())
        )
    assert response.status_code == 400
    assert "this leader expects the follower 'bob' on this certificate" in response.json()["error"]
    assert_nothing_applied(job, inbox)


def test_oversized_bodies_are_413(leader_server: tuple[JobSpec, Inbox]) -> None:
    job, inbox = leader_server
    limit = job.transport.max_body_bytes
    big = tensor_body(job, tensors=cut(BATCH))  # valid, but padded past the limit below
    padded = big + b"\0" * (limit + 1 - len(big))
    with follower_client(job) as client:
        response = client.post("/v1/tensors", content=padded)  # declares its length
        assert response.status_code == 413 and "exceeds transport.max_body_bytes" in response.json()["error"]

        def chunks() -> Iterator[bytes]:  # chunked: no length declared, counted while streaming
            for start in range(0, len(padded), 16 * 1024):
                yield padded[start : start + 16 * 1024]

        response = client.post("/v1/tensors", content=chunks())
        assert response.status_code == 413
    assert_nothing_applied(job, inbox)


def test_client_that_disconnects_mid_body_applies_nothing_and_logs_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer killed while uploading: the half message is dropped without a traceback in the log."""
    import asyncio

    from starlette.requests import Request

    from vfl_cli.transport.server import Refusal, read_body

    async def receive() -> dict[str, object]:
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b"\x81", "more_body": True}
        return {"type": "http.disconnect"}

    sent: list[int] = []
    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(Refusal, match="disconnected before the body was complete"):
        asyncio.run(read_body(request, 1000))
    assert "Traceback" not in caplog.text
