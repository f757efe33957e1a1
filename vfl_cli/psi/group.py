"""The ristretto255 group (RFC 9496) through `rbcl` (libsodium): hashing ids to points, blinding, validation.

Points travel as uint8 arrays of shape [n, 32] (the canonical 32-byte encodings); scalars are 32-byte strings.
No curve arithmetic is written here: every group operation is a libsodium call. rbcl calls libsodium through
ctypes, which releases the GIL for the duration of each call, so the per-point loops below run on `threads`
threads (measured: 2 threads give ~1.9x on 2 cores; `python -m benchmarks.psi_crypto`).

Domain separation: an id's point is `from_hash(SHA-512(tag || id))` with `tag = psi_tag(fingerprint)`
= b"vfl-psi-v1\\0" + the job fingerprint (ASCII) + b"\\0". The protocol label keeps these points apart from
any other use of the same ids; the fingerprint makes a job's points useless in another job (another job's
points are unrelated group elements, so nothing matches). Within a job the tag has one fixed length, so
`tag || id` determines the id.

Example:
    >>> k = new_scalar()
    >>> points = hash_to_group(psi_tag("0123456789abcdef"), [b"alice", b"bob"])  # uint8 [2, 32]
    >>> blinded = multiply(k, points, what="example")                             # uint8 [2, 32]
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import rbcl

from vfl_cli.errors import ProtocolError

POINT_BYTES = 32  # crypto_core_ristretto255_BYTES
HASH_BYTES = 64  # crypto_core_ristretto255_HASHBYTES: SHA-512's digest size
PROTOCOL_LABEL = b"vfl-psi-v1\0"
_IDENTITY = bytes(POINT_BYTES)  # the identity element's canonical encoding: 32 zero bytes
T = TypeVar("T")
_MIN_CHUNK = 256  # points per thread below which a thread pool costs more than it saves

assert rbcl.crypto_core_ristretto255_BYTES == POINT_BYTES
assert rbcl.crypto_core_ristretto255_HASHBYTES == HASH_BYTES


def psi_tag(fingerprint: str) -> bytes:
    """The domain-separation tag of one job: protocol label, job fingerprint, NUL."""
    if not fingerprint or not fingerprint.isascii() or not fingerprint.isprintable():
        raise ValueError(f"a PSI tag needs a printable ASCII job fingerprint, not {fingerprint!r}")
    return PROTOCOL_LABEL + fingerprint.encode("ascii") + b"\0"


def new_scalar() -> bytes:
    """A fresh secret scalar, uniform in [1, L) from libsodium's randombytes (which never returns zero)."""
    return rbcl.crypto_core_ristretto255_scalar_random()


def hash_to_group(tag: bytes, ids: Sequence[bytes], threads: int = 1) -> np.ndarray:
    """Points P = from_hash(SHA-512(tag || id)) for `ids`: uint8 [len(ids), 32]."""
    prefix = hashlib.sha512(tag)

    def one(id_: bytes) -> bytes:
        h = prefix.copy()
        h.update(id_)
        return rbcl.crypto_core_ristretto255_from_hash(h.digest())

    return _as_points(parallel_map(one, ids, threads))


def multiply(k: bytes, points: np.ndarray, what: str, threads: int = 1, validate: bool = False) -> np.ndarray:
    """k * P for every row of `points` (uint8 [n, 32]), same order; `validate` checks each point first.

    libsodium refuses a non-canonical encoding and a product equal to the identity; both are translated to a
    ProtocolError naming `what` and the point's index (our own points never trigger it).
    """
    encoded = points_to_bytes(points, what)
    if validate:
        check_points(encoded, what, threads)

    def one(p: bytes) -> bytes:
        return rbcl.crypto_scalarmult_ristretto255(k, p)

    try:
        return _as_points(parallel_map(one, encoded, threads))
    except RuntimeError as exc:  # rbcl: "input cannot be larger than the size of the group and ..."
        bad = _first_invalid(encoded)  # libsodium refuses nothing else when k is not zero
        reason = "libsodium refused it" if bad is None else _describe(encoded[bad])
        raise ProtocolError(f"{what}, point {bad}: {reason}") from exc


def check_points(encoded: Sequence[bytes], what: str, threads: int = 1) -> None:
    """Refuse anything but a canonical encoding of a non-identity ristretto255 point, naming `what` and index."""
    valid = parallel_map(_is_valid, encoded, threads)
    if not all(valid):
        bad = valid.index(False)
        raise ProtocolError(f"{what}, point {bad}: {_describe(encoded[bad])}")


def points_to_bytes(points: np.ndarray, what: str) -> list[bytes]:
    """The rows of a uint8 [n, 32] array as 32-byte strings; ProtocolError for any other dtype or shape."""
    check_shape(points, what)
    raw = np.ascontiguousarray(points).tobytes()
    return [raw[i : i + POINT_BYTES] for i in range(0, len(raw), POINT_BYTES)]


def check_shape(points: np.ndarray, what: str) -> None:
    """ProtocolError unless `points` is a uint8 array of shape [n, 32]."""
    if not isinstance(points, np.ndarray) or points.dtype != np.uint8 or points.ndim != 2:
        shape = getattr(points, "shape", None)
        dtype = getattr(points, "dtype", type(points).__name__)
        raise ProtocolError(f"{what}: expected uint8 points of shape [n, {POINT_BYTES}], got {dtype} {shape}")
    if points.shape[1] != POINT_BYTES:
        raise ProtocolError(f"{what}: points of {points.shape[1]} bytes, expected {POINT_BYTES} (shape {points.shape})")


def _is_valid(p: bytes) -> bool:
    # libsodium's is_valid_point checks the encoding only: it accepts the identity, which must be refused too
    return p != _IDENTITY and rbcl.crypto_core_ristretto255_is_valid_point(p)


def _first_invalid(encoded: Sequence[bytes]) -> int | None:
    return next((i for i, p in enumerate(encoded) if not _is_valid(p)), None)


def _describe(p: bytes) -> str:
    if p == _IDENTITY:
        return "the identity element"
    return "not a canonical ristretto255 encoding"


def _as_points(encoded: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).reshape(len(encoded), POINT_BYTES).copy()


def parallel_map(fn: Callable[[bytes], T], items: Sequence[bytes], threads: int) -> list[T]:
    """[fn(x) for x in items], on up to `threads` threads in contiguous chunks (rbcl releases the GIL)."""
    n = len(items)
    threads = max(1, min(threads, n // _MIN_CHUNK))
    if threads == 1:
        return [fn(x) for x in items]
    bounds = [n * t // threads for t in range(threads + 1)]
    chunks = [items[bounds[t] : bounds[t + 1]] for t in range(threads)]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="psi") as pool:
        parts = list(pool.map(lambda chunk: [fn(x) for x in chunk], chunks))
    return [p for part in parts for p in part]
