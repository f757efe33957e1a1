"""Hostile bodies from an authenticated peer: quantised tensors whose min and max dequantise to infinity,
msgpack bodies built to cost far more memory decoded than sent, and what a 403 tells a stranger. At the codec
and against a real server over mutual TLS; memory measured with tracemalloc (deterministic, no timing)."""

from __future__ import annotations

import logging
import math
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from tests.test_transport import (  # noqa: F401 - certs is a fixture
    LEADER_ENV,
    LEADER_PASSWORD,
    build_job,
    certs,
    follower_client,
    hello,
    party_server,
    raw_client,
    tensor_body,
)
from tests.test_wire_quantized import SESSION, quantised, raw_body, with_quantize
from vfl_cli.errors import PeerRefused, ProtocolError
from vfl_cli.party import PartyContext
from vfl_cli.privacy.quantize import FLOAT32_MAX, QuantizedTensor, dequantize, pack_bits
from vfl_cli.protocol import BatchKey, Hello
from vfl_cli.transport.codec import (
    MAX_CHECKPOINTS,
    MAX_DIMS,
    MAX_REASON_CHARS,
    MAX_TENSORS,
    AbortMessage,
    HelloMessage,
    TensorMessage,
    decode,
    encode,
)
from vfl_cli.transport.https_grid import HttpsGrid

MIB = 1 << 20
BOMB_BYTES = 16 * MIB
OVERFLOWS = FLOAT32_MAX + 2.0**103  # the smallest float64 that rounds to infinity as float32 (half an ulp up)


@pytest.fixture
def leader_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LEADER_ENV, LEADER_PASSWORD)  # the leader's key is encrypted


def peak_bytes(action: Callable[[], object]) -> tuple[BaseException | None, int]:
    """(what `action` raised, the peak of Python memory allocated while it ran, in bytes)."""
    tracemalloc.start()
    try:
        action()
        raised = None
    except Exception as exc:  # the caller asserts on it
        raised = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return raised, peak


# ---------------------------------------------------------------------------------- quantised min and max


def with_min_max(body: dict[str, Any], low: float, high: float) -> bytes:
    body["tensors"]["wide"].update({"min": low, "max": high})
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize(
    ("low", "high", "reason"),
    [
        (-1e300, 1e300, "tensors.wide.min: -1e+300 lies outside float32's range"),
        (1e300, 1e300, "tensors.wide.min: 1e+300 lies outside float32's range"),
        (0.0, OVERFLOWS, f"tensors.wide.max: {OVERFLOWS} lies outside float32's range"),
        (-OVERFLOWS, 0.0, f"tensors.wide.min: {-OVERFLOWS} lies outside float32's range"),
        (2.0, 1.0, "tensors.wide.min: 2.0 is greater than max 1.0"),  # refused before this fix too
        (math.nan, 1.0, "tensors.wide.min: nan is not finite"),  # refused before this fix too
    ],
)
def test_decode_refuses_min_max_that_dequantise_to_infinity(low: float, high: float, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(with_min_max(raw_body(), low, high))
    assert str(info.value).startswith(reason)


def test_overflows_is_where_float32_overflows() -> None:
    with np.errstate(over="ignore"):
        assert np.isinf(np.float32(OVERFLOWS)) and np.float32(np.nextafter(OVERFLOWS, 0)) == FLOAT32_MAX


def test_quantized_tensor_refuses_min_max_beyond_float32() -> None:
    data = pack_bits(np.array([0, 63, 7]), 6)
    for low, high in ((-1e300, 1e300), (0.0, OVERFLOWS), (-OVERFLOWS, -1.0)):
        with pytest.raises(ValueError, match="within float32's range"):
            QuantizedTensor(data, (3, 1), 6, low, high)


def test_float32_extremes_are_taken_and_every_code_dequantises_finite() -> None:
    # The widest grid there is: every one of the 256 codes, min and max at float32's ends. Nothing inside the
    # range overflows (each rounding step is monotonic in the code), so the range check is the whole check.
    body = raw_body(batch=256)
    body["tensors"]["wide"].update({"bits": 8, "data": bytes(range(256))})
    body["tensors"]["deep"].update({"bits": 8, "data": bytes(256)})
    _, message = decode(with_min_max(body, -FLOAT32_MAX, FLOAT32_MAX))
    assert isinstance(message, TensorMessage)
    wide = message.tensors["wide"]
    assert isinstance(wide, QuantizedTensor)
    values = dequantize(wide)
    assert bool(torch.isfinite(values).all())
    assert (values[0, 0].item(), values[-1, 0].item()) == (-FLOAT32_MAX, FLOAT32_MAX)


@pytest.mark.usefixtures("leader_env")
def test_server_refuses_min_max_beyond_float32_and_queues_nothing(certs: Path) -> None:  # noqa: F811
    job = with_quantize(build_job(certs), embeddings=6)
    valid = msgpack.unpackb(tensor_body(job, tensors=quantised(5)))
    with party_server(job, "leader") as inbox, follower_client(job) as client:
        response = client.post("/v1/tensors", content=with_min_max(valid, -1e300, 1e300))
        assert response.status_code == 400
        assert response.json()["error"].startswith("tensors.wide.min: -1e+300 lies outside float32's range")
        assert inbox.pending("bob", "embeddings") == 0 and inbox.bytes_received == 0


# ------------------------------------------------------------------------------------------ decoding bombs


def empty_lists() -> bytes:
    """One list of 16.7M empty lists: 1 byte each on the wire, ~60 as Python objects."""
    count = BOMB_BYTES - 5
    return b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count


def huge_list_header() -> bytes:
    """A list that claims 16M elements (within msgpack's default limit, the body's length), then one 16 MiB bin
    and nothing else: refused on its header, where msgpack alone copies the bin before it finds the rest
    missing."""
    payload = BOMB_BYTES - 10
    return b"\xdd" + (BOMB_BYTES - 5).to_bytes(4, "big") + b"\xc6" + payload.to_bytes(4, "big") + bytes(payload)


def small_lists_tree() -> bytes:
    """Lists of 15 lists, 6 deep: each list passes any per-container limit, 11M of them do not."""
    node = b"\x90"
    for _ in range(6):
        node = b"\x9f" + node * 15
    return node


def wide_text() -> bytes:
    """~4000 strings of 4000 bytes, each mostly ASCII and one 4-byte character: Python stores each as 4 bytes
    per character, 4x the body."""
    text = ("x" * 3996 + "\U0001f600").encode()
    item = b"\xda" + len(text).to_bytes(2, "big") + text
    count = BOMB_BYTES // len(item)
    return b"\xdd" + count.to_bytes(4, "big") + item * count


@pytest.mark.parametrize("make", [empty_lists, huge_list_header, small_lists_tree, wide_text])
def test_decoding_bombs_are_refused_before_they_are_built(make: Callable[[], bytes]) -> None:
    body = make()
    raised, peak = peak_bytes(lambda: decode(body))
    # Before the limits (tracemalloc): 65x the body for the empty lists, 64x the tree, 4x the text, 1x the header.
    assert peak < len(body) // 4, f"decoding a {len(body)} byte body peaked at {peak} bytes"
    assert isinstance(raised, ProtocolError), raised
    assert str(raised).startswith("body: more than 1024 msgpack objects")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b"\x91" * 9 + b"\xc0", "body: maps and lists nested deeper than 8", id="deep"),
        pytest.param(b"\x91" * 100_000 + b"\xc0", "body: maps and lists nested deeper than 8", id="deeper"),
        pytest.param(b"\xdd\xff\xff\xff\xff", "body: more than 1024 msgpack objects", id="4G-list"),
        pytest.param(b"\xdf\xff\xff\xff\xff", "body: more than 1024 msgpack objects", id="4G-map"),
        pytest.param(b"\xdc\x04\x00" + b"\xc0" * 1024, "body: more than 1024 msgpack objects", id="1025-objects"),
        pytest.param(b"\x92" + (b"\xdb" + (40_000).to_bytes(4, "big") + b"x" * 40_000) * 2,
                     "body: more than 65536 bytes of strings", id="text"),
        pytest.param(b"\xdb\xff\xff\xff\xff", "body is not valid msgpack (truncated)", id="4G-string"),
        pytest.param(b"\xd6\xff\x00\x00\x00\x00", "body: msgpack extension types are not", id="timestamp"),
        pytest.param(b"\x81\xa1a\xc7\x01\x05x", "body: msgpack extension types are not", id="ext"),
    ],
)
def test_decode_refuses_bodies_beyond_any_message(body: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(body)
    assert str(info.value).startswith(reason)


def test_the_largest_valid_messages_still_decode() -> None:
    shape = (1,) * MAX_DIMS
    tensors = {f"tensor-{i:02d}": torch.zeros(shape) for i in range(MAX_TENSORS)}
    big: list[object] = [
        TensorMessage(SESSION, "embeddings", BatchKey("train", 1, 1), 1, tensors),  # type: ignore[arg-type]
        HelloMessage(Hello(
            role="follower", name="bob", job_fingerprint="f" * 64, command="eval", nonce="n" * 64,
            data_fingerprint={split: {"rows": 10**9, "sample_ids_digest": "d" * 64} for split in
                              ("train", "valid", "test", "infer")},
            checkpoint_steps=tuple(range(1, MAX_CHECKPOINTS + 1)), extra={f"option{i}": "x" * 200 for i in range(8)},
        )),
        AbortMessage(SESSION, "\U0001f600" * MAX_REASON_CHARS),  # the longest reason a sender sends, in UTF-8
    ]
    for message in big:
        assert decode(encode(message, "job"))[1] == message  # type: ignore[arg-type]


@pytest.mark.usefixtures("leader_env")
def test_server_refuses_a_16_mib_bomb_in_a_small_multiple_of_its_size(certs: Path) -> None:  # noqa: F811
    job = build_job(certs, max_body_bytes=2 * BOMB_BYTES)
    body = empty_lists()
    with party_server(job, "leader") as inbox, follower_client(job) as client:
        raised, peak = peak_bytes(lambda: client.post("/v1/tensors", content=body).raise_for_status())
        assert raised is not None and "400 Bad Request" in str(raised)
        response = client.post("/v1/tensors", content=body)  # again, to read the answer outside tracemalloc
        assert response.status_code == 400
        assert response.json()["error"].startswith("body: more than 1024 msgpack objects")
        assert inbox.pending("bob", "embeddings") == 0 and inbox.bytes_received == 0
    # What remains is the server's copies of the body as it streams in; decoding adds next to nothing.
    assert peak < 4 * len(body), f"a {len(body)} byte body peaked at {peak} bytes"


# ------------------------------------------------------------------------------------------------- 403s


@pytest.mark.usefixtures("leader_env")
def test_a_403_names_no_party_and_the_server_log_says_who_knocked(
    certs: Path, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    job = build_job(certs)
    assert job.leader.cert is not None and job.leader.key is not None
    with party_server(job, "leader") as inbox:
        # The leader's own certificate: from the job's CA, but CN alice where the leader expects bob.
        with caplog.at_level(logging.INFO, logger="vfl_cli.transport.server"):
            with raw_client(job, job.leader.cert, job.leader.key, LEADER_PASSWORD) as client:
                response = client.post("/v1/hello", content=encode(HelloMessage(hello(job, "follower")), "x"))
        assert response.status_code == 403
        assert response.json() == {"error": "the client certificate is not the job's peer's"}
        assert "bob" not in response.text and "alice" not in response.text
        assert "certificate CN 'alice', expected 'bob'" in caplog.text
        assert inbox.bytes_received == 0


@pytest.mark.usefixtures("leader_env")
def test_an_https_peer_refused_with_403_says_its_certificate_is_not_the_peers(certs: Path) -> None:  # noqa: F811
    job = build_job(certs, connect_timeout_s=2)
    # The leader's copy of the job names another follower: what bob's user sees when the two jobs disagree.
    carol = job.follower.model_copy(update={"name": "carol"})
    theirs = job.model_copy(update={"parties": {**job.parties, "follower": carol}})
    with party_server(theirs, "leader"), HttpsGrid(PartyContext.of(job, "follower")) as follower:
        with pytest.raises(PeerRefused) as info:
            follower.handshake(hello(job, "follower"), lambda theirs: hello(job, "follower"))
    assert str(info.value) == "alice refused our hello: the client certificate is not the job's peer's (HTTP 403)"
