"""The wire format: named messages <-> msgpack bodies. Every msgpack call of vfl lives in this module.

A body is one msgpack map:

    {"v": 1, "job": <job fingerprint>, "type": "hello" | "tensors" | "abort", ...type-specific keys}

    hello    {"hello": {role, name, job_fingerprint, data_fingerprint, command, run_id, checkpoint_steps,
                        nonce, protocol, extra, group}}   (group: the leader's, every follower's nonce)
    tensors  {"session": <session id>, "kind": "embeddings", "key": {"phase", "epoch", "step"}, "seq": 1,
              "tensors": {name: <tensor>}}
    abort    {"session": <session id>, "reason": "..."}

  while serving (`vfl serve`; a request from the label party, answered in the response body):
    cut_request  {"run_id", "step", "ids": <the customer ids' UTF-8, concatenated>, "lengths": <uint16 LE each>}
    cut          {"run_id", "step", "found": <one byte 0/1 per id>, "tensors": {name: <tensor>}}
    model        {"run_id", "step"}   (the label party's "load this checkpoint", and the follower's answer)

    tensor   {"dtype": "float32", "shape": [B, 1], "data": <raw little-endian bytes>}   (or another of DTYPES)
             {"dtype": "minmax", "bits": 1..8, "min": float64, "max": float64, "shape": [B, 1],
              "data": <ceil(numel * bits / 8) bytes of bit-packed codes>}   (a `QuantizedTensor`; packing as in
              `vfl_cli.privacy.quantize`)

Tensors travel as raw bytes, never pickled. `decode` trusts nothing: every type is checked, and anything
malformed raises ProtocolError with a reason the server sends back to the sender. Before msgpack builds
anything, `extent.check_extent` walks the body's headers and refuses one that holds more objects, deeper nesting or
more text than any vfl message does, so decoding costs about the body's size in memory whatever it claims
(16 MiB of empty lists would otherwise be ~1 GiB of Python objects).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

from vfl_cli.errors import ProtocolError
from vfl_cli.privacy.quantize import FLOAT32_MAX, MAX_BITS, MIN_BITS, QuantizedTensor, packed_size
from vfl_cli.protocol import KINDS, PHASES, PROTOCOL_VERSION, BatchKey, Hello, Kind, WireTensor, WireTensors
from vfl_cli.transport.extent import MAX_OBJECTS, MAX_TEXT_BYTES, check_extent

WIRE_VERSION = PROTOCOL_VERSION
MAX_DIMS = 4  # cut-layer tensors are [B, 1]; anything deeper is not ours
MAX_TENSORS = 16
MAX_DIM = 1 << 31  # no cut-layer dimension comes near this; larger ones are hostile
MAX_REASON_CHARS = 1000  # an abort reason is shown to a human: keep it to a line or so
MAX_CHECKPOINTS = 16  # a Hello lists the few checkpoints a party keeps
MAX_GROUP = 256  # the leader's Hello lists every follower's nonce

# Wire dtype name -> (numpy little-endian dtype, torch dtype). Floats are checked for finiteness.
DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype("<f4"), torch.float32),
    "float64": (np.dtype("<f8"), torch.float64),
    "float16": (np.dtype("<f2"), torch.float16),
    "int64": (np.dtype("<i8"), torch.int64),
    "int32": (np.dtype("<i4"), torch.int32),
    "int8": (np.dtype("i1"), torch.int8),
    "uint8": (np.dtype("u1"), torch.uint8),
}
_TORCH_TO_WIRE = {torch_dtype: name for name, (_, torch_dtype) in DTYPES.items()}
MINMAX = "minmax"  # the wire dtype of a QuantizedTensor: bit-packed codes with their min and max


@dataclass(frozen=True)
class HelloMessage:
    hello: Hello


@dataclass(frozen=True)
class TensorMessage:
    session: str  # the session id of the handshake (`vfl_cli.protocol.session_id`)
    kind: Kind
    key: BatchKey
    seq: int  # 1, 2, 3, ... per kind per run: lets the receiver drop retried duplicates
    tensors: WireTensors


@dataclass(frozen=True)
class AbortMessage:
    session: str
    reason: str


@dataclass(frozen=True)
class CutRequest:
    """The label party asks a follower for its cut of these customers, from the model of run_id at step."""

    run_id: str
    step: int
    ids: tuple[str, ...]


@dataclass(frozen=True)
class CutAnswer:
    run_id: str
    step: int  # the step of the model that computed the tensors: the leader checks it is the one it asked for
    found: tuple[bool, ...]  # per id: whether this follower holds the customer (all True under `unknown: default_row`)
    tensors: WireTensors


@dataclass(frozen=True)
class ModelMessage:
    run_id: str
    step: int


Message = HelloMessage | TensorMessage | AbortMessage | CutRequest | CutAnswer | ModelMessage
MAX_ID_BYTES = 256  # one customer id, as UTF-8
MAX_IDS = 4096  # ids in one cut request (`serve.max_batch` is at most this)


# --------------------------------------------------------------------------------------------------- encode


def encode(message: Message, job_fingerprint: str) -> bytes:
    """The msgpack body of one message."""
    body: dict[str, Any] = {"v": WIRE_VERSION, "job": job_fingerprint}
    if isinstance(message, HelloMessage):
        h = message.hello
        body["type"] = "hello"
        body["hello"] = {
            "role": h.role,
            "name": h.name,
            "job_fingerprint": h.job_fingerprint,
            "data_fingerprint": h.data_fingerprint,
            "command": h.command,
            "run_id": h.run_id,
            "checkpoint_steps": list(h.checkpoint_steps),
            "nonce": h.nonce,
            "protocol": h.protocol,
            "extra": h.extra,
            "group": list(h.group),
        }
    elif isinstance(message, TensorMessage):
        body["type"] = "tensors"
        body["session"] = message.session
        body["kind"] = message.kind
        body["key"] = {"phase": message.key.phase, "epoch": message.key.epoch, "step": message.key.step}
        body["seq"] = message.seq
        body["tensors"] = {name: _encode_tensor(name, t) for name, t in message.tensors.items()}
    elif isinstance(message, AbortMessage):
        body["type"] = "abort"
        body["session"] = message.session
        body["reason"] = message.reason
    else:
        body["run_id"], body["step"] = message.run_id, message.step
        if isinstance(message, CutRequest):
            encoded = [cid.encode() for cid in message.ids]
            body["type"] = "cut_request"
            body["ids"] = b"".join(encoded)
            body["lengths"] = np.array([len(e) for e in encoded], dtype="<u2").tobytes()
        elif isinstance(message, CutAnswer):
            body["type"] = "cut"
            body["found"] = bytes(message.found)
            body["tensors"] = {name: _encode_tensor(name, t) for name, t in message.tensors.items()}
        else:
            body["type"] = "model"
    return msgpack.packb(body, use_bin_type=True)


def _encode_tensor(name: str, tensor: WireTensor) -> dict[str, Any]:
    if isinstance(tensor, QuantizedTensor):
        return {
            "dtype": MINMAX,
            "bits": tensor.bits,
            # float(): msgpack packs a Python float as float64, whatever numeric type min and max came as.
            "min": float(tensor.min),
            "max": float(tensor.max),
            "shape": list(tensor.shape),
            "data": tensor.data,
        }
    wire_dtype = _TORCH_TO_WIRE.get(tensor.dtype)
    if wire_dtype is None:
        raise ProtocolError(f"tensor {name!r}: dtype {tensor.dtype} cannot be sent")
    array = tensor.detach().to("cpu").contiguous().numpy()
    # astype is a no-op on little-endian machines; it fixes the byte order elsewhere.
    data = array.astype(DTYPES[wire_dtype][0], copy=False).tobytes()
    return {"dtype": wire_dtype, "shape": list(array.shape), "data": data}


# --------------------------------------------------------------------------------------------------- decode


def decode(body: bytes) -> tuple[str, Message]:
    """(job fingerprint, message) of one body; ProtocolError with a reason when anything is off."""
    check_extent(body)
    try:
        # The limits repeat check_extent's, so that msgpack alone would stop a body that slipped past it.
        raw = msgpack.unpackb(
            body, raw=False, strict_map_key=True, use_list=True, max_str_len=MAX_TEXT_BYTES,
            max_bin_len=len(body), max_array_len=MAX_OBJECTS, max_map_len=MAX_OBJECTS, max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"body is not valid msgpack ({type(exc).__name__})") from exc
    top = _map(raw, "body")
    version = _int(top.get("v"), "v")
    if version != WIRE_VERSION:
        raise ProtocolError(f"wire version {version}, this side speaks {WIRE_VERSION}")
    job = _str(top.get("job"), "job")
    kind = _str(top.get("type"), "type")
    if kind == "hello":
        return job, HelloMessage(_decode_hello(_map(top.get("hello"), "hello")))
    if kind == "tensors":
        return job, _decode_tensors(top)
    if kind == "abort":
        reason = printable(_str(top.get("reason"), "reason"))[:MAX_REASON_CHARS]
        return job, AbortMessage(_str(top.get("session"), "session"), reason)
    if kind in ("cut_request", "cut", "model"):
        return job, _decode_serving(kind, top)
    raise ProtocolError(f"unknown message type {kind[:40]!r}")


def _decode_hello(raw: dict[str, Any]) -> Hello:
    data_fingerprint: dict[str, dict[str, int | str]] = {}
    for split, info in _map(raw.get("data_fingerprint"), "hello.data_fingerprint").items():
        entries = _map(info, f"hello.data_fingerprint.{split}")
        for name, value in entries.items():
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise ProtocolError(f"hello.data_fingerprint.{split}.{name}: expected int or string")
        data_fingerprint[split] = entries
    extra = _map(raw.get("extra"), "hello.extra")
    for name, value in extra.items():
        _str(value, f"hello.extra.{name}")
    return Hello(
        role=_str(raw.get("role"), "hello.role"),
        name=_str(raw.get("name"), "hello.name"),
        job_fingerprint=_str(raw.get("job_fingerprint"), "hello.job_fingerprint"),
        data_fingerprint=data_fingerprint,
        command=_str(raw.get("command"), "hello.command"),
        run_id=_str(raw.get("run_id"), "hello.run_id"),
        checkpoint_steps=_steps(raw.get("checkpoint_steps")),
        nonce=_str(raw.get("nonce"), "hello.nonce"),
        protocol=_int(raw.get("protocol"), "hello.protocol"),
        extra=extra,
        group=_group(raw.get("group", [])),
    )


def _group(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_GROUP:
        raise ProtocolError(f"hello.group: expected a list of at most {MAX_GROUP} nonces")
    return tuple(_str(nonce, "hello.group")[:64] for nonce in value)


def _steps(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_CHECKPOINTS:
        raise ProtocolError(f"hello.checkpoint_steps: expected a list of at most {MAX_CHECKPOINTS} integers")
    return tuple(_int(step, "hello.checkpoint_steps") for step in value)


def _decode_tensors(top: dict[str, Any]) -> TensorMessage:
    session = _str(top.get("session"), "session")
    kind = _str(top.get("kind"), "kind")
    if kind not in KINDS:
        raise ProtocolError(f"kind: unknown {kind[:40]!r}, expected one of {', '.join(KINDS)}")
    raw_key = _map(top.get("key"), "key")
    phase = _str(raw_key.get("phase"), "key.phase")
    if phase not in PHASES:
        raise ProtocolError(f"key.phase: unknown {phase[:40]!r}, expected one of {', '.join(PHASES)}")
    key = BatchKey(phase, _int(raw_key.get("epoch"), "key.epoch"), _int(raw_key.get("step"), "key.step"))
    seq = _int(top.get("seq"), "seq")
    if seq < 1:
        raise ProtocolError(f"seq: must be >= 1, got {seq}")
    raw_tensors = _map(top.get("tensors"), "tensors")
    if len(raw_tensors) > MAX_TENSORS:
        raise ProtocolError(f"tensors: {len(raw_tensors)} tensors, at most {MAX_TENSORS}")
    tensors = {name: _decode_tensor(name, value) for name, value in raw_tensors.items()}
    return TensorMessage(session, kind, key, seq, tensors)


def _decode_serving(kind: str, top: dict[str, Any]) -> CutRequest | CutAnswer | ModelMessage:
    run_id, step = _str(top.get("run_id"), "run_id"), _int(top.get("step"), "step")
    if kind == "model":
        return ModelMessage(run_id, step)
    if kind == "cut_request":
        blob, lengths = _bytes(top.get("ids"), "ids"), _bytes(top.get("lengths"), "lengths")
        sizes = np.frombuffer(lengths, dtype="<u2") if len(lengths) % 2 == 0 else None
        if sizes is None or not 0 < len(sizes) <= MAX_IDS or int(sizes.sum()) != len(blob):
            raise ProtocolError(f"ids: 1 to {MAX_IDS} ids whose lengths add up to the bytes given")
        if (sizes > MAX_ID_BYTES).any():
            raise ProtocolError(f"ids: a customer id is longer than {MAX_ID_BYTES} bytes")
        ends = np.cumsum(sizes).tolist()
        try:
            ids = tuple(blob[a:b].decode() for a, b in zip([0, *ends[:-1]], ends, strict=True))
        except UnicodeDecodeError as exc:
            raise ProtocolError("ids: not UTF-8") from exc
        return CutRequest(run_id, step, ids)
    found = _bytes(top.get("found"), "found")
    if not set(found) <= {0, 1}:
        raise ProtocolError("found: one byte 0 or 1 per id")
    raw_tensors = _map(top.get("tensors"), "tensors")
    if len(raw_tensors) > MAX_TENSORS:
        raise ProtocolError(f"tensors: {len(raw_tensors)} tensors, at most {MAX_TENSORS}")
    tensors = {name: _decode_tensor(name, value) for name, value in raw_tensors.items()}
    if any(t.shape[0] != len(found) for t in tensors.values()):
        raise ProtocolError(f"tensors: every tensor needs one row per id ({len(found)})")
    return CutAnswer(run_id, step, tuple(bool(b) for b in found), tensors)


def _decode_tensor(name: str, raw: object) -> WireTensor:
    where = f"tensors.{name[:40]}"
    spec = _map(raw, where)
    dtype_name = _str(spec.get("dtype"), f"{where}.dtype")
    if dtype_name == MINMAX:
        return _decode_quantized(where, spec)
    if dtype_name not in DTYPES:
        raise ProtocolError(
            f"{where}.dtype: unknown {dtype_name[:40]!r}, expected one of {', '.join([*DTYPES, MINMAX])}"
        )
    np_dtype, _ = DTYPES[dtype_name]
    shape = _shape(spec.get("shape"), where)
    data = _bytes(spec.get("data"), f"{where}.data")
    expected = math.prod(shape) * np_dtype.itemsize
    if len(data) != expected:
        raise ProtocolError(
            f"{where}.data: {len(data)} bytes, shape {shape} of {dtype_name} needs {expected}"
        )
    # astype copies into native byte order: the tensor must own writable memory, not the request body.
    array = np.frombuffer(data, dtype=np_dtype).reshape(shape).astype(np_dtype.newbyteorder("="))
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ProtocolError(f"{where}: contains NaN or infinity")
    return torch.from_numpy(array)


def _decode_quantized(where: str, spec: dict[str, Any]) -> QuantizedTensor:
    """A "minmax" tensor; every field is checked here, and QuantizedTensor checks them again on construction."""
    bits = _int(spec.get("bits"), f"{where}.bits")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ProtocolError(f"{where}.bits: must lie in {MIN_BITS}..{MAX_BITS}, got {bits}")
    low, high = _float(spec.get("min"), f"{where}.min"), _float(spec.get("max"), f"{where}.max")
    if low > high:
        raise ProtocolError(f"{where}.min: {low} is greater than max {high}")
    for field, value in (("min", low), ("max", high)):  # beyond it, values dequantise to infinity
        if abs(value) > FLOAT32_MAX:
            raise ProtocolError(f"{where}.{field}: {value} lies outside float32's range (+-{FLOAT32_MAX:.7g})")
    shape = _shape(spec.get("shape"), where)
    if not shape:  # a scalar is no wire tensor of ours; plain dtypes allow it only because they always did
        raise ProtocolError(f"{where}.shape: no dimensions, a {MINMAX} tensor has 1..{MAX_DIMS}")
    data = _bytes(spec.get("data"), f"{where}.data")
    expected = packed_size(math.prod(shape), bits)
    if len(data) != expected:
        raise ProtocolError(f"{where}.data: {len(data)} bytes, shape {shape} of {bits}-bit codes needs {expected}")
    try:
        return QuantizedTensor(data, tuple(shape), bits, low, high)
    except ValueError as exc:  # all but the padding bits were checked above: this is about the data
        raise ProtocolError(f"{where}.data: {exc}") from exc


def _shape(value: object, where: str) -> list[int]:
    """At most MAX_DIMS dimensions, each in 1..MAX_DIM - 1."""
    if not isinstance(value, list):
        raise ProtocolError(f"{where}.shape: expected a list of ints")
    if len(value) > MAX_DIMS:
        raise ProtocolError(f"{where}.shape: {len(value)} dims, at most {MAX_DIMS}")
    shape = [_int(d, f"{where}.shape") for d in value]
    # No zero: an empty tensor with huge other dimensions is "too big" for numpy's reshape.
    if any(not 1 <= d < MAX_DIM for d in shape):
        raise ProtocolError(f"{where}.shape: dimensions must lie in 1..{MAX_DIM - 1}, got {shape[:MAX_DIMS]}")
    return shape


# ---------------------------------------------------------------------------------------------- type checks


def _map(value: object, where: str) -> dict[str, Any]:
    """A map whose keys are all strings (msgpack also allows bytes keys, which no vfl message has)."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: expected a map, got {_type_name(value)}")
    if not all(isinstance(key, str) for key in value):
        raise ProtocolError(f"{where}: keys must be strings")
    return value


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{where}: expected a string, got {_type_name(value)}")
    return value


def _int(value: object, where: str) -> int:
    # bool is an int in Python; on the wire it is a different type and never a valid number here.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{where}: expected an integer, got {_type_name(value)}")
    return value


def _float(value: object, where: str) -> float:
    # Only a msgpack float: an integer, bool, string or nil is a different type on the wire.
    if not isinstance(value, float):
        raise ProtocolError(f"{where}: expected a float, got {_type_name(value)}")
    if not math.isfinite(value):
        raise ProtocolError(f"{where}: {value} is not finite")
    return value


def _bytes(value: object, where: str) -> bytes:
    if not isinstance(value, bytes):
        raise ProtocolError(f"{where}: expected bytes")
    return value


def _type_name(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def printable(text: str) -> str:
    """Text from the peer ends up on our terminal: no control characters (escape sequences)."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)
