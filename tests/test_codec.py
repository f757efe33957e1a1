"""The wire codec: a round trip per message type, and every kind of malformed body refused with a reason."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from vfl_cli.errors import ProtocolError
from vfl_cli.protocol import BatchKey, Hello
from vfl_cli.transport.codec import (
    MAX_DIMS,
    WIRE_VERSION,
    AbortMessage,
    HelloMessage,
    TensorMessage,
    decode,
    encode,
)

JOB = "0123456789abcdef"
SESSION = "a1b2c3d4e5f60718"
KEY = BatchKey("train", 2, 17)


def hello() -> Hello:
    return Hello(
        role="follower",
        name="bob",
        job_fingerprint=JOB,
        data_fingerprint={"train": {"rows": 1000, "sample_ids_digest": "ab" * 32}},
        command="train",
        run_id="4f1c2a9be0d3",
        checkpoint_steps=(500, 1000),
        nonce="feedbeef00112233",
        extra={"split": "test"},
    )


def tensors(batch: int = 5) -> dict[str, torch.Tensor]:
    return {"wide": torch.randn(batch, 1), "deep": torch.randn(batch, 1)}


def tensor_body(**overrides: Any) -> dict[str, Any]:
    """A valid raw tensors body as a dict, with top-level keys replaced by `overrides`."""
    body = msgpack.unpackb(encode(TensorMessage(SESSION, "embeddings", KEY, 1, tensors()), JOB), raw=False)
    body.update(overrides)
    return body


def refused(body: object) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(msgpack.packb(body, use_bin_type=True))
    return str(info.value)


def test_hello_round_trip() -> None:
    job, message = decode(encode(HelloMessage(hello()), JOB))
    assert job == JOB
    assert message == HelloMessage(hello())


def test_tensor_round_trip_is_bit_exact() -> None:
    sent = tensors(7)
    job, message = decode(encode(TensorMessage(SESSION, "gradients", KEY, 42, sent), JOB))
    assert job == JOB
    assert isinstance(message, TensorMessage)
    assert (message.kind, message.key, message.seq) == ("gradients", KEY, 42)
    assert set(message.tensors) == {"wide", "deep"}
    for name, tensor in sent.items():
        assert message.tensors[name].dtype == torch.float32
        assert torch.equal(message.tensors[name], tensor)
    message.tensors["wide"].add_(1)  # the decoded tensor owns writable memory, not the request body


def test_tensor_round_trip_other_dtypes_and_views() -> None:
    grad_tracking = torch.randn(3, 1, requires_grad=True) * 2
    sent = {
        "q": torch.arange(6, dtype=torch.uint8).reshape(3, 2),
        "t": torch.randn(2, 3).t(),
        "g": grad_tracking,
    }
    _, message = decode(encode(TensorMessage(SESSION, "embeddings", KEY, 1, sent), JOB))
    assert isinstance(message, TensorMessage)
    for name, tensor in sent.items():
        assert torch.equal(message.tensors[name], tensor.detach())


def test_abort_round_trip_and_control_characters() -> None:
    assert decode(encode(AbortMessage(SESSION, "out of memory"), JOB)) == (JOB, AbortMessage(SESSION, "out of memory"))
    _, message = decode(encode(AbortMessage(SESSION, "bad\x1b[31m\nthing"), JOB))
    assert message == AbortMessage(SESSION, "bad?[31m?thing")


def test_body_is_plain_msgpack_with_raw_little_endian_tensors() -> None:
    sent = {"wide": torch.tensor([[1.5], [-2.0]]), "deep": torch.zeros(2, 1)}
    raw = msgpack.unpackb(encode(TensorMessage(SESSION, "embeddings", KEY, 3, sent), JOB), raw=False)
    assert raw["v"] == WIRE_VERSION and raw["job"] == JOB and raw["type"] == "tensors"
    assert raw["key"] == {"phase": "train", "epoch": 2, "step": 17} and raw["seq"] == 3
    assert raw["tensors"]["wide"] == {
        "dtype": "float32",
        "shape": [2, 1],
        "data": np.array([1.5, -2.0], "<f4").tobytes(),
    }


@pytest.mark.parametrize(
    "body",
    [b"", b"\xc1", b"\x93\x01", msgpack.packb({"v": 1}) + b"trailing"],
    ids=["empty", "reserved-byte", "truncated", "trailing-bytes"],
)
def test_not_msgpack(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="not valid msgpack|expected"):
        decode(body)


def test_envelope_errors() -> None:
    assert "expected a map" in refused([1, 2, 3])
    assert "wire version 99" in refused(tensor_body(v=99))
    assert "v: expected an integer, got bool" in refused(tensor_body(v=True))
    assert "job: expected a string" in refused(tensor_body(job=5))
    assert "unknown message type" in refused(tensor_body(type="pickle"))
    assert "hello: expected a map" in refused({"v": WIRE_VERSION, "job": JOB, "type": "hello"})
    assert "reason: expected a string" in refused({"v": WIRE_VERSION, "job": JOB, "type": "abort", "reason": b"x"})


def test_tensor_message_field_errors() -> None:
    assert "seq: expected an integer, got str" in refused(tensor_body(seq="1"))
    assert "seq: must be >= 1" in refused(tensor_body(seq=0))
    assert "kind: unknown" in refused(tensor_body(kind="weights"))
    assert "key.phase: unknown" in refused(tensor_body(key={"phase": "test", "epoch": 0, "step": 0}))
    assert "key.step: expected an integer" in refused(
        tensor_body(key={"phase": "train", "epoch": 0, "step": 1.0})
    )
    assert "tensors: expected a map" in refused(tensor_body(tensors=[]))
    assert "session: expected a string" in refused(tensor_body(session=None))
    assert "tensors: keys must be strings" in refused(tensor_body(tensors={b"wide": tensor_spec()}))


def tensor_spec(**overrides: Any) -> dict[str, Any]:
    spec = {"dtype": "float32", "shape": [2, 1], "data": np.zeros(2, "<f4").tobytes()}
    spec.update(overrides)
    return spec


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (tensor_spec(dtype="object"), "dtype: unknown 'object'"),
        (tensor_spec(dtype=1), "dtype: expected a string"),
        (tensor_spec(shape=[3, 1]), "8 bytes, shape [3, 1] of float32 needs 12"),
        (tensor_spec(data=np.zeros(3, "<f4").tobytes()[:-1]), "11 bytes"),
        (tensor_spec(data="text"), "data: expected bytes"),
        (tensor_spec(shape=[1] * (MAX_DIMS + 1), data=b"\0" * 4), f"at most {MAX_DIMS}"),
        (tensor_spec(shape=[-2, -1]), "dimensions must lie in 1.."),
        (tensor_spec(shape=[0, 2**40], data=b""), "dimensions must lie in 1.."),
        (tensor_spec(shape=[0, 1], data=b""), "dimensions must lie in 1.."),
        (tensor_spec(shape="2x1"), "shape: expected a list"),
        (tensor_spec(shape=[2.0, 1]), "shape: expected an integer"),
        (tensor_spec(data=np.array([0.0, np.nan], "<f4").tobytes()), "NaN or infinity"),
        (tensor_spec(data=np.array([np.inf, 0.0], "<f4").tobytes()), "NaN or infinity"),
        ("not a map", "tensors.wide: expected a map"),
    ],
    ids=[
        "dtype",
        "dtype-type",
        "short",
        "odd-bytes",
        "data-type",
        "dims",
        "negative",
        "zero-size-huge",
        "zero-size",
        "shape-type",
        "float-dim",
        "nan",
        "inf",
        "spec-type",
    ],
)
def test_malformed_tensor(spec: object, needle: str) -> None:
    assert needle in refused(tensor_body(tensors={"wide": spec}))


def test_malformed_hello() -> None:
    raw = msgpack.unpackb(encode(HelloMessage(hello()), JOB), raw=False)
    raw["hello"]["checkpoint_steps"] = ["3"]
    assert "hello.checkpoint_steps: expected an integer" in refused(raw)
    raw["hello"]["checkpoint_steps"] = list(range(100))
    assert "hello.checkpoint_steps: expected a list of at most" in refused(raw)
    raw = msgpack.unpackb(encode(HelloMessage(hello()), JOB), raw=False)
    raw["hello"]["data_fingerprint"]["train"]["rows"] = [1]
    assert "expected int or string" in refused(raw)
    raw = msgpack.unpackb(encode(HelloMessage(hello()), JOB), raw=False)
    raw["hello"]["extra"] = {"split": 1}
    assert "hello.extra.split: expected a string" in refused(raw)


def test_unsendable_dtype_is_refused_before_the_wire() -> None:
    with pytest.raises(ProtocolError, match="cannot be sent"):
        encode(TensorMessage(SESSION, "embeddings", KEY, 1, {"c": torch.zeros(2, dtype=torch.complex64)}), JOB)
