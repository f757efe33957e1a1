"""Min-max quantised tensors on the wire: codec round trips and refusals, the server's cut-layer checks per the
job's `privacy.quantize`, and a real server over mutual TLS taking (or refusing) them."""

from __future__ import annotations

import math
import struct
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
    connect,
    follower_client,
    party_server,
    tensor_body,
)
from vfl_cli.errors import PeerRefused, ProtocolError
from vfl_cli.grid import LocalGrid
from vfl_cli.job import JobSpec, PrivacySpec, QuantizeSpec
from vfl_cli.privacy.quantize import QuantizedTensor, pack_bits, packed_size, quantize
from vfl_cli.protocol import BatchKey, WireTensors, check_cut_tensors, check_points
from vfl_cli.telemetry import Telemetry
from vfl_cli.transport.codec import MAX_DIMS, TensorMessage, decode, encode

JOB = "0123456789abcdef"
SESSION = "a1b2c3d4e5f60718"
KEY = BatchKey("train", 2, 17)
MAX_BATCH = 64
CUT = {"wide": 1, "deep": 1}  # the Wide&Deep preset's cut

# encode() of `golden_floats()` as embeddings, seq 3, recorded before the wire learnt quantised tensors (its
# version byte since moved to PROTOCOL_VERSION 3; nothing else changed).
GOLDEN_FLOAT32_BODY = bytes.fromhex(
    "88a17603a36a6f62b030313233343536373839616263646566a474797065a774656e736f7273a773657373696f6eb0613162"
    "32633364346535663630373138a46b696e64aa656d62656464696e6773a36b657983a57068617365a5747261696ea565706f"
    "636802a47374657011a373657103a774656e736f727382a47769646583a56474797065a7666c6f61743332a5736861706592"
    "0301a464617461c40c0000c03f000000c0cdcccc3da46465657083a56474797065a7666c6f61743332a57368617065920301"
    "a464617461c40c0000000000000080a97bae34"
)


def golden_floats() -> dict[str, torch.Tensor]:
    return {"wide": torch.tensor([[1.5], [-2.0], [0.1]]), "deep": torch.tensor([[0.0], [-0.0], [3.25e-7]])}


def quantised(batch: int, bits: int = 6, seed: int = 0) -> dict[str, QuantizedTensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: quantize(torch.randn(batch, 1, generator=generator), bits) for name in ("wide", "deep")}


def round_trip(tensors: WireTensors) -> WireTensors:
    _, message = decode(encode(TensorMessage(SESSION, "embeddings", KEY, 1, tensors), JOB))
    assert isinstance(message, TensorMessage)
    return message.tensors


def f64(value: float) -> bytes:
    return struct.pack("<d", value)


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("batch", [1, 3, 2047])
@pytest.mark.parametrize("bits", range(1, 9))
def test_quantized_round_trip_is_bit_exact(bits: int, batch: int) -> None:
    sent = quantised(batch, bits, seed=bits * 10_000 + batch)
    got = round_trip(sent)
    assert set(got) == {"wide", "deep"}
    for name, q in sent.items():
        back = got[name]
        assert isinstance(back, QuantizedTensor)
        assert (back.data, back.shape, back.bits) == (q.data, (batch, 1), bits)
        assert (f64(back.min), f64(back.max)) == (f64(q.min), f64(q.max))


def test_quantized_min_max_travel_as_float64() -> None:
    # 0.1 is not a float32 value: a float32 on the wire would change it.
    q = QuantizedTensor(pack_bits(np.array([0, 3, 1]), 2), (3, 1), 2, 0.1, 1 / 3)
    raw = msgpack.unpackb(encode(TensorMessage(SESSION, "gradients", KEY, 1, {"wide": q}), JOB), raw=False)
    assert raw["tensors"]["wide"] == {
        "dtype": "minmax", "bits": 2, "min": 0.1, "max": 1 / 3, "shape": [3, 1], "data": q.data,
    }
    back = round_trip({"wide": q})["wide"]
    assert back == q and (f64(back.min), f64(back.max)) == (f64(0.1), f64(1 / 3))


def test_quantized_and_float32_tensors_in_one_message() -> None:
    sent: WireTensors = {"q": quantised(5)["wide"], "f": torch.randn(5, 1)}
    got = round_trip(sent)
    assert got["q"] == sent["q"]
    assert isinstance(got["f"], torch.Tensor) and torch.equal(got["f"], sent["f"])


def test_float32_tensors_encode_exactly_as_before() -> None:
    body = encode(TensorMessage(SESSION, "embeddings", KEY, 3, golden_floats()), JOB)
    assert body == GOLDEN_FLOAT32_BODY
    by_hand = {
        "v": 3, "job": JOB, "type": "tensors", "session": SESSION, "kind": "embeddings",
        "key": {"phase": "train", "epoch": 2, "step": 17}, "seq": 3,
        "tensors": {
            name: {"dtype": "float32", "shape": [3, 1], "data": t.numpy().astype("<f4").tobytes()}
            for name, t in golden_floats().items()
        },
    }
    assert body == msgpack.packb(by_hand, use_bin_type=True)


def test_local_grid_passes_quantized_tensors_through_and_copies_torch_ones() -> None:
    grids = LocalGrid.star("leader", ("follower",), timeout_s=1)
    follower, leader = grids["follower"], grids["leader"]
    q = quantised(4)["wide"]
    t = torch.randn(4, 1, requires_grad=True)
    follower.send("leader", "embeddings", KEY, {"wide": q, "deep": t})
    got = leader.receive("follower", "embeddings", KEY)
    assert got["wide"] is q
    assert isinstance(got["deep"], torch.Tensor) and got["deep"] is not t and not got["deep"].requires_grad
    assert torch.equal(got["deep"], t.detach())


# --------------------------------------------------------------------------------------------- codec refusals


def raw_body(batch: int = 3) -> dict[str, Any]:
    """A valid tensors body as a dict whose tensors are 6-bit quantised [batch, 1]."""
    return msgpack.unpackb(encode(TensorMessage(SESSION, "embeddings", KEY, 1, quantised(batch)), JOB))


def refused(change: dict[str, Any], drop: str | None = None) -> str:
    """The reason decode gives for `raw_body()` with `change` applied to tensors.wide (and `drop` deleted)."""
    body = raw_body()
    body["tensors"]["wide"].update(change)
    if drop is not None:
        del body["tensors"]["wide"][drop]
    with pytest.raises(ProtocolError) as info:
        decode(msgpack.packb(body, use_bin_type=True))
    return str(info.value)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"bits": 0}, "tensors.wide.bits: must lie in 1..8, got 0"),
        ({"bits": 9}, "tensors.wide.bits: must lie in 1..8, got 9"),
        ({"bits": True}, "tensors.wide.bits: expected an integer, got bool"),
        ({"bits": "6"}, "tensors.wide.bits: expected an integer, got str"),
        ({"bits": 6.0}, "tensors.wide.bits: expected an integer, got float"),
        ({"min": 2.0, "max": 1.0}, "tensors.wide.min: 2.0 is greater than max 1.0"),
        ({"min": math.nan}, "tensors.wide.min: nan is not finite"),
        ({"min": -math.inf}, "tensors.wide.min: -inf is not finite"),
        ({"max": math.inf}, "tensors.wide.max: inf is not finite"),
        ({"min": True}, "tensors.wide.min: expected a float, got bool"),
        ({"min": "0.5"}, "tensors.wide.min: expected a float, got str"),
        ({"max": None}, "tensors.wide.max: expected a float, got nothing"),
        ({"max": 1}, "tensors.wide.max: expected a float, got int"),
        ({"shape": []}, "tensors.wide.shape: no dimensions"),
        ({"shape": [0, 1]}, "tensors.wide.shape: dimensions must lie in 1.."),
        ({"shape": [3, -1]}, "tensors.wide.shape: dimensions must lie in 1.."),
        ({"shape": [1] * (MAX_DIMS + 1)}, f"tensors.wide.shape: {MAX_DIMS + 1} dims, at most {MAX_DIMS}"),
        ({"shape": "3,1"}, "tensors.wide.shape: expected a list of ints"),
        ({"shape": [3, True]}, "tensors.wide.shape: expected an integer, got bool"),
        ({"shape": [1 << 31, 1]}, "tensors.wide.shape: dimensions must lie in 1.."),
        ({"data": "abc"}, "tensors.wide.data: expected bytes"),
        ({"data": b"\x00\x00"}, "tensors.wide.data: 2 bytes, shape [3, 1] of 6-bit codes needs 3"),
        ({"data": b"\x00" * 4}, "tensors.wide.data: 4 bytes, shape [3, 1] of 6-bit codes needs 3"),
        ({"shape": [5, 1]}, "tensors.wide.data: 3 bytes, shape [5, 1] of 6-bit codes needs 4"),
        ({"data": b"\x00\x00\x04"}, "tensors.wide.data: packed data's last byte has non-zero padding bits"),
        ({"dtype": "minmax8"}, "tensors.wide.dtype: unknown 'minmax8', expected one of float32"),
    ],
)
def test_decode_refuses_malformed_quantized(change: dict[str, Any], reason: str) -> None:
    assert reason in refused(change)


@pytest.mark.parametrize("key", ["bits", "min", "max", "shape", "data"])
def test_decode_refuses_missing_quantized_fields(key: str) -> None:
    assert refused({}, drop=key).startswith(f"tensors.wide.{key}:")


def test_decode_accepts_min_max_as_msgpack_float32() -> None:
    body = raw_body()
    body["tensors"]["wide"].update({"min": -0.5, "max": 0.25})  # exact in float32
    _, message = decode(msgpack.packb(body, use_bin_type=True, use_single_float=True))
    assert isinstance(message, TensorMessage)
    assert (message.tensors["wide"].min, message.tensors["wide"].max) == (-0.5, 0.25)


def test_decode_accepts_a_constant_tensor() -> None:
    q = QuantizedTensor(bytes(packed_size(8, 8)), (8, 1), 8, 1.25, 1.25)  # min == max: all codes 0
    assert round_trip({"wide": q})["wide"] == q


# ------------------------------------------------------------------------------------------ the server's checks


def test_check_cut_tensors_float32_job() -> None:
    check_cut_tensors({"wide": torch.zeros(3, 1), "deep": torch.zeros(3, 1)}, CUT, MAX_BATCH, None)
    check_cut_tensors({"wide": torch.zeros(3, 1), "deep": torch.zeros(3, 1)}, CUT, MAX_BATCH)  # None is the default
    with pytest.raises(ProtocolError, match=r"^tensors\.wide: 6-bit quantised, expected float32$"):
        check_cut_tensors(quantised(3), CUT, MAX_BATCH, None)
    with pytest.raises(ProtocolError, match=r"^tensors\.deep: 6-bit quantised, expected float32$"):
        check_cut_tensors({"wide": torch.zeros(3, 1), "deep": quantised(3)["deep"]}, CUT, MAX_BATCH, None)


def test_check_cut_tensors_quantized_job_accepts() -> None:
    check_cut_tensors(quantised(3, bits=6), CUT, MAX_BATCH, 6)
    check_cut_tensors(quantised(MAX_BATCH, bits=1), CUT, MAX_BATCH, 1)


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        pytest.param(
            {"wide": torch.zeros(3, 1), "deep": torch.zeros(3, 1)},
            r"^tensors\.wide: dtype float32, expected 6-bit quantised$",
            id="float32",
        ),
        pytest.param(
            quantised(3, bits=4), r"^tensors\.wide: 4-bit quantised, expected 6-bit quantised$", id="other-bits"
        ),
        pytest.param(
            {"wide": quantised(3)["wide"], "deep": torch.zeros(3, 1)},
            r"^tensors\.deep: dtype float32, expected 6-bit quantised$",
            id="mixed",
        ),
        pytest.param(
            {name: quantize(torch.randn(3, 2), 6) for name in ("wide", "deep")},
            r"^tensors\.wide: shape \[3, 2\], expected \[B, 1\]$",
            id="shape",
        ),
        pytest.param(
            {name: quantize(torch.randn(3), 6) for name in ("wide", "deep")},
            r"^tensors\.wide: shape \[3\], expected \[B, 1\]$",
            id="flat",
        ),
        pytest.param(
            quantised(MAX_BATCH + 1),
            rf"^tensors\.wide: batch of {MAX_BATCH + 1}, expected 1\.\.{MAX_BATCH}$",
            id="too-big",
        ),
        pytest.param(
            {"wide": quantised(3)["wide"], "deep": quantised(4)["deep"]},
            r"^tensors: batch sizes differ \(3 and 4\)$",
            id="batches-differ",
        ),
        pytest.param({"wide": quantised(3)["wide"]}, r"^tensors: expected exactly wide, deep; got wide$", id="names"),
    ],
)
def test_check_cut_tensors_quantized_job_refuses(tensors: WireTensors, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        check_cut_tensors(tensors, CUT, MAX_BATCH, 6)


def test_check_points_refuses_quantized_points() -> None:
    points = quantize(torch.randint(0, 256, (3, 32)).float(), 8)
    with pytest.raises(ProtocolError, match=r"^tensors\.points: 8-bit quantised \[3, 32\], expected uint8"):
        check_points({"points": points}, 10)


# -------------------------------------------------------------------------------------------- a real server


def with_quantize(job: JobSpec, embeddings: int | None = None, gradients: int | None = None) -> JobSpec:
    privacy = PrivacySpec(quantize=QuantizeSpec(embeddings=embeddings, gradients=gradients))
    return job.model_copy(update={"privacy": privacy})


@pytest.fixture
def leader_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LEADER_ENV, LEADER_PASSWORD)  # the leader's key is encrypted


@pytest.mark.usefixtures("leader_env")
def test_server_of_a_quantizing_job_takes_quantized_embeddings_only(certs: Path) -> None:  # noqa: F811
    job = with_quantize(build_job(certs), embeddings=6)
    telemetry = Telemetry("leader")
    sent = quantised(5)
    with party_server(job, "leader", telemetry) as inbox, follower_client(job) as client:
        body = tensor_body(job, seq=1, tensors=sent)
        response = client.post("/v1/tensors", content=body)
        assert (response.status_code, response.json()) == (200, {"status": "accepted"})
        message = inbox.next_tensors("bob", "embeddings", 1)
        assert message is not None and message.tensors == sent
        assert telemetry.value("vfl_bytes_received_total", peer="follower", kind="embeddings") == len(body)

        for tensors, reason in [
            ({"wide": torch.zeros(5, 1), "deep": torch.zeros(5, 1)}, "tensors.wide: dtype float32, expected 6-bit"),
            (quantised(5, bits=4), "tensors.wide: 4-bit quantised, expected 6-bit quantised"),
        ]:
            response = client.post("/v1/tensors", content=tensor_body(job, seq=2, tensors=tensors))
            assert response.status_code == 400 and reason in response.json()["error"]
        assert inbox.pending("bob", "embeddings") == 0


@pytest.mark.usefixtures("leader_env")
@pytest.mark.parametrize("gradients", [None, 6], ids=["no-quantize", "gradients-only"])
def test_server_of_a_float32_job_refuses_quantized_embeddings(certs: Path, gradients: int | None) -> None:  # noqa: F811
    # privacy.quantize.gradients is about what the leader sends: the embeddings it takes stay float32.
    job = with_quantize(build_job(certs), gradients=gradients)
    with party_server(job, "leader") as inbox, follower_client(job) as client:
        response = client.post("/v1/tensors", content=tensor_body(job, tensors=quantised(5)))
        assert response.status_code == 400
        assert response.json() == {"error": "tensors.wide: 6-bit quantised, expected float32"}
        assert inbox.pending("bob", "embeddings") == 0


@pytest.mark.usefixtures("leader_env")
def test_https_peers_carry_quantized_tensors_both_ways(certs: Path) -> None:  # noqa: F811
    job = with_quantize(build_job(certs), embeddings=6, gradients=3)
    leader, follower = connect(job)
    try:
        embeddings, gradients = quantised(7, bits=6), quantised(7, bits=3, seed=1)
        follower.send("leader", "embeddings", KEY, embeddings)
        assert leader.receive("follower", "embeddings", KEY) == embeddings
        with pytest.raises(PeerRefused, match=r"tensors\.wide: dtype float32, expected 3-bit quantised \(HTTP 400\)"):
            leader.send("follower", "gradients", KEY, {"wide": torch.zeros(7, 1), "deep": torch.zeros(7, 1)})
        leader.send("follower", "gradients", KEY, gradients)
        assert follower.receive("leader", "gradients", KEY) == gradients
    finally:
        leader.close()
        follower.close()
