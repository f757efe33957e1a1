"""Fuzzing both parties' HTTPS servers with hypothesis: real uvicorn servers, real mutual TLS, real httpx.

Each test gets the leader's server (it takes "embeddings" from bob) or the follower's (it takes "gradients"
from alice), each with a session open, and a keep-alive client with the peer's certificate. POSTed to
/v1/hello, /v1/tensors and /v1/abort, EXAMPLES times per endpoint per server:
    - arbitrary bytes, and pathological msgpack (nesting deeper than msgpack's stack, 4 GiB declared lengths,
      bad timestamps)
    - arbitrary msgpack structures (None, bools, 64-bit ints, NaN/Inf floats, str, bytes, ext types, lists,
      maps with str, bytes and int keys)
    - mutations of valid hello, tensors and abort bodies: keys dropped, added or renamed (bytes tensor names),
      values replaced by other types (str or bool where an int belongs), huge declared shapes, shapes that
      disagree with the data, NaN/Inf data, unknown dtypes, kinds and phases, negative or huge seq and step;
      then bytes flipped, inserted, deleted, cut off or repeated in the packed body
    - replays: valid bodies of an earlier session, of no session, of another job, with used seqs
    - sent in one piece or chunked, with no, garbage or wrong content-types and odd extra headers
Invariants after every request:
    - no 5xx, and every 4xx is JSON {"error": <str>}; a body that `codec.decode` refuses is answered 400
    - nothing applied: every tensors and abort body carries a session that is not the open one (or another
      job's fingerprint with it), so none may be accepted: nothing queued, no abort, the session, the
      sender's hello and the inbox's byte count unchanged
    - /v1/hello: a refused hello changes nothing; an accepted one is a body `codec.decode` itself reads as a
      Hello of the peer's role, and then it is the sender's hello (or, with the current nonce, a resend)
and after each run the server answers GET /v1/health with 200 on a new connection.

Besides: replays in the open session (three batches accepted, then resends, old seqs and gaps: exactly-once
holds); raw requests over a raw TLS socket with framing httpx will not send (a Content-Length that lies or is
no number, broken chunks, odd methods and HTTP versions; there h11's refusals are uvicorn's plain-text 400);
bodies that never complete, dropped by the read deadline. All runs are derandomized: CI sees the same cases.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.test_transport import (  # noqa: F401 - certs and leader_server are fixtures
    BATCH,
    KEY,
    LEADER_ENV,
    LEADER_PASSWORD,
    build_job,
    certs,
    cut,
    follower_client,
    hello,
    leader_answer,
    leader_server,
    party_server,
    session_of,
    tensor_body,
)
from vfl_cli.errors import ProtocolError
from vfl_cli.job import JobSpec, Role
from vfl_cli.protocol import KINDS, PROTOCOL_VERSION, RECEIVES, BatchKey, Hello, Kind, session_id
from vfl_cli.transport.codec import DTYPES, AbortMessage, HelloMessage, Message, TensorMessage, decode, encode
from vfl_cli.transport.inbox import Inbox

EXAMPLES = 2000  # fuzzed requests per endpoint per server
RAW_EXAMPLES = 200  # raw-socket requests per server (each opens its own TLS connection)
ENDPOINTS = ("hello", "tensors", "abort")
WRONG_SESSION = "0" * 16
OTHER_JOB = "feedfacefeedface"
UVICORN_400 = b"Invalid HTTP request received."

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# -------------------------------------------------------------------------------------------------- servers


@dataclass(repr=False)
class Target:
    """One party's running server, its inbox, and a keep-alive client holding the peer's certificate."""

    role: Role
    job: JobSpec
    inbox: Inbox
    client: httpx.Client
    sender: str  # the peer's name: the inbox keeps its state under it
    accepts: Kind
    url: str
    tls: ssl.SSLContext  # the client's, for raw sockets
    sent: Counter[str] = field(default_factory=Counter)
    strategies: dict[str, dict[str, st.SearchStrategy[bytes]]] = field(default_factory=dict)  # see bodies_of

    def __repr__(self) -> str:  # short, and no cycle: the strategies in `strategies` refer to their target
        return f"<the {self.role}'s server at {self.url}>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # what hypothesis prints in its reports
        printer.text(repr(self))

    @property
    def peer_role(self) -> Role:
        return peer_of(self.role)

    @property
    def peer_hello(self) -> Hello:
        """The peer's Hello that the fixture put in (the leader's names the follower's nonce in its group)."""
        return hello(self.job, "follower") if self.role == "leader" else leader_answer(self.job)

    @property
    def session(self) -> str:
        return session_of(self.job)


@pytest.fixture
def follower_server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[JobSpec, Inbox]]:
    """`leader_server` with the roles flipped: the follower's server, alice's hello open."""
    monkeypatch.setenv(LEADER_ENV, LEADER_PASSWORD)
    job = build_job(request.getfixturevalue("certs"), read_timeout_s=2, max_unauthenticated=8, max_pending=4)
    with party_server(job, "follower") as inbox:
        yield job, inbox


def peer_of(role: Role) -> Role:
    """The other party of the two-party job."""
    return "follower" if role == "leader" else "leader"


def client_context(job: JobSpec, role: Role) -> ssl.SSLContext:
    """What party `role` presents to its peer's server: its certificate, and trust in the job's CA."""
    party = job.party(role)
    assert job.tls.ca is not None and party.cert is not None and party.key is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(job.tls.ca))
    context.load_cert_chain(str(party.cert), str(party.key), password=LEADER_PASSWORD if role == "leader" else None)
    return context


def leader_client(job: JobSpec) -> httpx.Client:
    """alice's certificate, talking to bob's (the follower's) server."""
    return httpx.Client(
        base_url=f"https://{job.follower.listen}", verify=client_context(job, "leader"), timeout=5, trust_env=False
    )


@pytest.fixture(params=["leader", "follower"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    role: Role = request.param
    job, inbox = request.getfixturevalue(f"{role}_server")
    peer_role = peer_of(role)
    client = follower_client(job) if role == "leader" else leader_client(job)
    with client:
        yield Target(role, job, inbox, client, job.party(peer_role).name, RECEIVES[role], job.party(role).listen,
                     client_context(job, peer_role))


# ----------------------------------------------------------------------------------------------- strategies

SPECIAL_INTS = [0, 1, -1, 2, 3, BATCH, BATCH + 1, 2**31 - 1, 2**31, 2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1,
                2**64 - 1, -(2**31), -(2**63)]
INTS = st.integers(-(2**63), 2**64 - 1) | st.sampled_from(SPECIAL_INTS)
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([math.nan, math.inf, -math.inf, -0.0])
NOT_INTS = st.sampled_from([True, False, "1", b"1", 1.0, math.nan, math.inf, None, [1], {"n": 1}])
INT_LIKE = INTS | NOT_INTS
SCALARS = (
    st.none() | st.booleans() | INTS | FLOATS | st.text(max_size=16) | st.binary(max_size=24)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12))
)
KEYS = st.text(max_size=8) | st.binary(max_size=8)
# What replaces a field: at most two levels deep (cheaper to draw than st.recursive, and deep enough to be wrong).
VALUES = SCALARS | st.lists(SCALARS, max_size=3) | st.dictionaries(KEYS, SCALARS, max_size=3)
ANY_KEYS = KEYS | INTS | st.none() | st.booleans()
ANY_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(ANY_KEYS, inner, max_size=5), max_leaves=10
)
HOSTILE_SHAPES: list[Any] = [
    [2**40, 1], [0, 2**62], [2**62, 0], [0, 2**40], [2**31, 1], [2**31 - 1, 2**31 - 1], [2**64 - 1, 1],
    [-4, 1], [4, -1], [0], [], [4], [4, 1, 1], [1] * 5, [1] * 200, [2**20] * 4, [4, 1.0], [4, "1"], [4, True],
    [4, None], "4,1", None, {"0": 4}, [[4], [1]], [BATCH + 1, 1], [2, 2], [1, 4], [8, 1],
]
DTYPE_NAMES = st.sampled_from(
    [*DTYPES, "float", "f4", "<f4", ">f4", "bfloat16", "complex64", "object", "bool", "", "FLOAT32", b"float32", None]
)
PATHOLOGICAL: list[bytes] = [
    b"", b"\xc0", b"\xc1", b"\x80", b"\x90", b"\xa0", b"\x91" * 5000 + b"\xc0", b"\x81\xa0" * 2500 + b"\xc0",
    b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
    b"\xc9\xff\xff\xff\xff\x01", b"\xd5\xff\x00\x00", b"\xd6\xff\xff\xff\xff\xff", b"\xc7\x05\xff\x00\x00\x00\x00\x00",
    b"\xd7\xff" + b"\xff" * 8, b"\x81\xc0\xc0", b"\x81\x01\x02", b"\x81\x91\x01\x02", b"\x81\x80\x01",
    b"\x82\xa1v\x02\xa1v\x03", b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00", b"\xff" * 64, b"\x00" * 64,
]


def nonfinite_data(count: int) -> st.SearchStrategy[bytes]:
    """float32 little-endian bytes of `count` values with at least one NaN or infinity among them."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        values = draw(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=count,
                               max_size=count))
        values[draw(st.integers(0, count - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        return np.asarray(values, dtype="<f4").tobytes()

    return build()


def bases(t: Target) -> dict[str, dict[str, Any]]:
    """The valid bodies the mutations start from, unpacked. No tensors or abort body here could be applied:
    each carries a session that is not the open one."""
    fingerprint = t.job.fingerprint()
    theirs = replace(hello(t.job, t.peer_role), nonce="fuzz-nonce", run_id="r1", checkpoint_steps=(10, 20),
                     extra={"split": "test"})
    other_kind: Kind = "gradients" if t.accepts == "embeddings" else "embeddings"
    bodies = {
        "hello": encode(HelloMessage(theirs), fingerprint),
        "hello-own-role": encode(HelloMessage(hello(t.job, t.role)), fingerprint),
        "tensors": tensor_body(t.job, kind=t.accepts, session=WRONG_SESSION, tensors=cut(4, fill=0.5)),
        "tensors-other-kind": tensor_body(t.job, kind=other_kind, session=WRONG_SESSION, tensors=cut(4, fill=0.5)),
        "abort": encode(AbortMessage(WRONG_SESSION, "fuzzed stop"), fingerprint),
    }
    return {name: msgpack.unpackb(body, raw=False) for name, body in bodies.items()}


def earlier_session(job: JobSpec) -> str:
    """The session id of a run before this one: same leader hello, another follower nonce."""
    return session_id(replace(hello(job, "leader"), group=("earlier-nonce",)))


def field_values(t: Target) -> dict[tuple[str, ...], st.SearchStrategy[Any]]:
    """Targeted replacements: field path -> values that are wrong in an interesting way."""
    sessions = st.sampled_from([WRONG_SESSION, earlier_session(t.job), "", "0" * 64, WRONG_SESSION.encode(), 0, None])
    data = st.binary(max_size=40) | nonfinite_data(4) | st.sampled_from([b"", b"\0" * 15, b"\0" * 17, "abcd" * 4])
    values: dict[tuple[str, ...], st.SearchStrategy[Any]] = {
        ("v",): st.sampled_from([0, 1, 3, -1, 2**64 - 1, True, "2", 2.0, None]),
        ("job",): st.sampled_from([OTHER_JOB, "", t.job.fingerprint().encode(), t.job.fingerprint() + "x", 0, None]),
        ("type",): st.sampled_from(["hello", "tensors", "abort", "HELLO", "", "tensor", b"tensors", 0, None]),
        ("session",): sessions,
        ("kind",): st.sampled_from(["embeddings", "gradients", "Embeddings", "", b"gradients", 1, None]),
        ("seq",): INT_LIKE,
        ("key",): VALUES,
        ("key", "phase"): st.sampled_from(["train", "eval", "infer", "TRAIN", "", b"train", 0, None]),
        ("key", "epoch"): INT_LIKE,
        ("key", "step"): INT_LIKE,
        ("tensors",): VALUES | st.just({f"t{i}": {} for i in range(17)}) | st.just({}),
        ("reason",): st.text(max_size=300) | VALUES | st.sampled_from(["\x1b[31mred\x1b[0m", "x" * 5000, "\0"]),
        ("hello",): VALUES,
        ("hello", "role"): st.sampled_from(["leader", "follower", "", "LEADER", b"follower", None, 1]),
        ("hello", "protocol"): INT_LIKE,
        ("hello", "checkpoint_steps"): st.lists(INT_LIKE, max_size=20) | VALUES,
        ("hello", "data_fingerprint"): VALUES | st.dictionaries(KEYS, st.dictionaries(KEYS, SCALARS, max_size=3),
                                                                max_size=3),
        ("hello", "extra"): VALUES | st.dictionaries(KEYS, SCALARS, max_size=3),
    }
    for name in ("wide", "deep"):
        values[("tensors", name)] = VALUES
        values[("tensors", name, "shape")] = st.sampled_from(HOSTILE_SHAPES) | st.lists(INT_LIKE, max_size=6)
        values[("tensors", name, "dtype")] = DTYPE_NAMES
        values[("tensors", name, "data")] = data
    for name in ("name", "job_fingerprint", "command", "run_id", "nonce"):
        values[("hello", name)] = VALUES
    return values


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a nested structure of maps and lists, the root excluded."""
    found: list[tuple[Any, ...]] = []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in children:
        found.append((*prefix, key))
        found += paths(child, (*prefix, key))
    return found


def at(node: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


def other_types(value: Any) -> list[Any]:
    """The value again, as something of another wire type."""
    others: list[Any] = [None, str(value)[:40], [value], {"value": value}]
    if isinstance(value, bool):
        others += [int(value), str(value).lower()]
    elif isinstance(value, int):
        others += [bool(value), float(value), str(value).encode(), -value if value <= 2**63 else -(2**63)]
    elif isinstance(value, str):
        others += [value.encode(), len(value), [*value][:8]]
    elif isinstance(value, bytes):
        others += [value.decode("latin-1"), list(value[:8]), len(value)]
    elif isinstance(value, dict):
        others += [[[k, v] for k, v in value.items()], list(value), {str(k).encode(): v for k, v in value.items()}]
    elif isinstance(value, list):
        others += [{str(i): v for i, v in enumerate(value)}, bytes(len(value)), len(value)]
    return others


def pick(draw: st.DrawFn, items: list[Any]) -> Any:
    """One of `items`: st.integers is cached by its arguments, a new st.sampled_from would be built each time."""
    return items[draw(st.integers(0, len(items) - 1))]


OPERATIONS = st.sampled_from(["targeted", "targeted", "drop", "replace", "retype", "add", "rename"])
DAMAGES = st.sampled_from(["flip", "insert", "delete", "truncate", "repeat"])


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any], targeted: dict[tuple[str, ...], st.SearchStrategy[Any]]) -> bytes:
    """A valid body changed in one to three places, packed, and perhaps damaged byte by byte after."""
    tree = msgpack.unpackb(msgpack.packb(base, use_bin_type=True), raw=False)  # a deep copy
    for _ in range(draw(st.integers(1, 3))):
        operation = draw(OPERATIONS)
        if operation == "targeted":
            chosen = pick(draw, [p for p in targeted if p[:-1] == () or _exists(tree, p[:-1])])
            # A copy: sampled values are shared between examples, and later mutations change them in place.
            at(tree, chosen[:-1])[chosen[-1]] = copy.deepcopy(draw(targeted[chosen]))
            continue
        where = paths(tree)
        if not where:
            continue
        path = pick(draw, where)
        parent = at(tree, path[:-1])
        if operation == "drop":
            del parent[path[-1]]
        elif operation == "replace":
            parent[path[-1]] = draw(VALUES)
        elif operation == "retype":
            parent[path[-1]] = pick(draw, other_types(parent[path[-1]]))
        elif operation == "add" and isinstance(parent, dict):
            parent[draw(KEYS)] = draw(VALUES)
        elif operation == "rename" and isinstance(parent, dict):  # e.g. a bytes tensor name, or "logits"
            new = draw(st.sampled_from([str(path[-1]).encode(), "logits", "", str(path[-1]).upper()]) | KEYS)
            parent[new] = parent.pop(path[-1])
    try:
        body = msgpack.packb(tree, use_bin_type=draw(st.booleans()))
    except (OverflowError, ValueError, TypeError):  # nothing a sender could put on the wire either
        assume(False)
    return draw(damaged(body))


def _exists(tree: Any, path: tuple[Any, ...]) -> bool:
    try:
        return isinstance(at(tree, path), dict)
    except (KeyError, IndexError, TypeError):
        return False


@st.composite
def damaged(draw: st.DrawFn, body: bytes) -> bytes:
    """The packed body, usually untouched, else with bytes flipped, inserted, deleted, cut off or repeated."""
    for _ in range(max(0, draw(st.integers(-3, 2)))):
        i = draw(st.integers(0, len(body)))
        j = draw(st.integers(i, min(len(body), i + 16)))
        operation = draw(DAMAGES)
        if operation == "flip" and i < len(body):
            body = body[:i] + bytes([body[i] ^ draw(st.integers(1, 255))]) + body[i + 1 :]
        elif operation == "insert":
            body = body[:i] + draw(st.binary(min_size=1, max_size=8)) + body[i:]
        elif operation == "delete":
            body = body[:i] + body[j:]
        elif operation == "truncate":
            body = body[:i]
        else:
            body = body + body[i:j]
    return body


def replays(t: Target) -> list[bytes]:
    """Well-formed bodies that must still be refused: an earlier session, no session, another job's
    fingerprint with the open session; seqs used or not yet, either kind, one row or a full batch. Built once:
    encoding tensors costs more than sending them."""
    fingerprint = t.job.fingerprint()
    sessions = [earlier_session(t.job), WRONG_SESSION, "", t.session]
    found = []
    for session, job, kind, seq, key, rows in itertools.product(
        sessions, [fingerprint, OTHER_JOB], KINDS, [1, 2, 4], [KEY, BatchKey("eval", 1, 3)], [1, BATCH]
    ):
        if session == t.session and job == fingerprint:
            continue  # the one combination that could rightly be applied
        found.append(encode(TensorMessage(session, kind, key, seq, cut(rows, fill=0.25)), job))
    for session, job in itertools.product(sessions[:3], [fingerprint, OTHER_JOB]):  # an open session's abort counts
        found.append(encode(AbortMessage(session, "replayed"), job))
    return found


def semi_structured(t: Target, endpoint: str) -> st.SearchStrategy[bytes]:
    """A map with the right envelope and arbitrary everything else: reaches past the first checks."""
    envelope = {"v": PROTOCOL_VERSION, "job": t.job.fingerprint(), "type": endpoint}
    return st.builds(
        lambda extra, keep: msgpack.packb({**extra, **{k: v for k, v in envelope.items() if k in keep}}),
        st.dictionaries(st.sampled_from(["hello", "session", "kind", "key", "seq", "tensors", "reason"]) | KEYS,
                        VALUES, max_size=4),
        st.sets(st.sampled_from(list(envelope))),
    )


def bodies(t: Target, endpoint: str) -> dict[str, st.SearchStrategy[bytes]]:
    """Families of bodies for one endpoint, each a strategy."""
    base, targeted = bases(t), field_values(t)
    own = {"hello": ["hello", "hello-own-role"], "tensors": ["tensors", "tensors-other-kind"], "abort": ["abort"]}
    others = [name for name in base if name not in own[endpoint]]
    return {
        "bytes": st.binary(max_size=200),
        "pathological": st.sampled_from(PATHOLOGICAL),
        "msgpack": st.builds(lambda v, bin_type: msgpack.packb(v, use_bin_type=bin_type), ANY_VALUES, st.booleans()),
        "semi-structured": semi_structured(t, endpoint),
        "own": st.one_of([mutated(base[name], targeted) for name in own[endpoint]]),
        "own-valid": st.sampled_from([msgpack.packb(base[name]) for name in own[endpoint]]),
        "other": st.one_of([mutated(base[name], targeted) for name in others]),
        "replay": st.sampled_from(replays(t)),
    }


def bodies_of(t: Target, endpoint: str) -> dict[str, st.SearchStrategy[bytes]]:
    """`bodies`, built once per target and endpoint (building them unpacks and encodes the bases)."""
    if endpoint not in t.strategies:
        t.strategies[endpoint] = bodies(t, endpoint)
    return t.strategies[endpoint]


# Weights by repetition: most requests are mutations of the endpoint's own messages.
FAMILIES = ["bytes", "pathological", "msgpack", "semi-structured", "own", "own", "own", "own", "own", "own-valid",
            "other", "replay", "replay"]
CONTENT_TYPES = ["application/msgpack", "application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "", "*/*", "application/msgpack; charset=utf-16"]
# Headers besides the body's framing: mostly none; one sampled set per request (cheaper to draw than a dict).
HEADER_SETS: list[dict[str, str]] = [
    {}, {}, {}, {}, {}, {}, {}, {},
    *({"content-type": content_type} for content_type in CONTENT_TYPES),
    {"host": "evil.example"}, {"host": ""}, {"accept-encoding": "gzip, br"}, {"content-encoding": "gzip"},
    {"expect": "100-continue"}, {"connection": "upgrade", "upgrade": "h2c"}, {"authorization": "Bearer x"},
    {"cookie": "a=b"}, {"x-forwarded-for": "10.0.0.1", "x-forwarded-proto": "http"},
    {"content-type": "application/json", "accept": "*/*", "x-fuzz": "1"},
]


# ---------------------------------------------------------------------------------------------- one request


@dataclass(frozen=True)
class Snapshot:
    """What a request may change in the inbox: `hello` by identity, the rest by value."""

    hello: Hello | None
    session: str | None
    pending: tuple[int, int]
    aborted: str | None
    bytes_received: int

    @classmethod
    def of(cls, t: Target) -> Snapshot:
        inbox = t.inbox
        return cls(inbox.wait_hello(t.sender, 0), inbox.session(t.sender),
                   (inbox.pending(t.sender, "embeddings"), inbox.pending(t.sender, "gradients")),
                   inbox.aborted(t.sender), inbox.bytes_received)

    def same(self, other: Snapshot) -> bool:
        return self.hello is other.hello and (self.session, self.pending, self.aborted, self.bytes_received) == (
            other.session, other.pending, other.aborted, other.bytes_received)


def decoded(body: bytes) -> tuple[str, Message] | None:
    try:
        return decode(body)
    except ProtocolError:
        return None


def could_be_applied(t: Target, message: tuple[str, Message] | None) -> bool:
    """Whether a decoded tensors or abort body could legitimately be accepted: the fuzz must never send one."""
    if message is None:
        return False
    job, inner = message
    if isinstance(inner, AbortMessage):
        return inner.session == t.session
    if isinstance(inner, TensorMessage):
        return inner.session == t.session and job == t.job.fingerprint()
    return False


@dataclass(frozen=True)
class Case:
    """One fuzzed request: what hypothesis prints when one fails."""

    family: str
    body: bytes
    headers: dict[str, str]
    chunks: tuple[int, ...] | None  # where a chunked body is cut; None: sent in one piece with a Content-Length


@st.composite
def cases(draw: st.DrawFn, t: Target, endpoint: str) -> Case:
    """A body of one of FAMILIES, never one that could rightly be applied, and how to send it. One composite
    strategy rather than st.data() draws: cheaper per example, and 12,000 examples add up."""
    family = draw(st.sampled_from(FAMILIES))
    body = draw(bodies_of(t, endpoint)[family])
    assume(not could_be_applied(t, decoded(body)))
    headers = draw(st.sampled_from(HEADER_SETS))
    chunks = tuple(sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))) if draw(st.booleans()) else None
    return Case(family, body, headers, chunks)


def post(t: Target, endpoint: str, case: Case) -> httpx.Response:
    if case.chunks is None:
        return t.client.post(f"/v1/{endpoint}", content=case.body, headers=case.headers)
    body, cuts = case.body, case.chunks
    pieces = [body[i:j] for i, j in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    return t.client.post(f"/v1/{endpoint}", content=iter(pieces), headers=case.headers)


def check_refusal(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        answer = response.json()
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str), response.text


def fuzz_one(t: Target, endpoint: str, case: Case) -> None:
    """Send one case and check every invariant of the module docstring."""
    body, message = case.body, decoded(case.body)
    before = Snapshot.of(t)
    response = post(t, endpoint, case)
    t.sent[endpoint] += 1
    check_refusal(response)
    after = Snapshot.of(t)
    if len(body) > t.job.transport.max_body_bytes:
        assert response.status_code == 413, response.text
    elif message is None:
        assert response.status_code == 400, response.text
    if response.is_success:
        assert endpoint == "hello", f"{endpoint} applied: {response.text}"
        assert message is not None and isinstance(message[1], HelloMessage), response.text
        accepted = message[1].hello
        assert accepted.role == t.peer_role
        assert before.hello is not None
        if accepted.nonce == before.hello.nonce:  # a resend of the current hello: acknowledged, changes nothing
            assert after.hello is before.hello
        else:
            assert after.hello == accepted
        assert after.pending == (0, 0) and after.aborted is None
    else:
        assert before.same(after), (before, after)


def assert_still_serving_and_nothing_applied(t: Target, hello_changed: bool = False) -> None:
    """A new connection gets a 200 from /v1/health; no tensors wait, no abort, and unless a hello was accepted
    (`hello_changed`) the session, the hello and the byte count are the fixture's."""
    with (follower_client(t.job) if t.role == "leader" else leader_client(t.job)) as fresh:
        response = fresh.get("/v1/health")
    assert response.status_code == 200 and response.json()["role"] == t.role
    inbox = t.inbox
    assert inbox.pending(t.sender, "embeddings") == inbox.pending(t.sender, "gradients") == 0
    assert inbox.aborted(t.sender) is None
    if not hello_changed:
        assert inbox.session(t.sender) == t.session
        assert inbox.wait_hello(t.sender, 0) == t.peer_hello
        assert inbox.bytes_received == 0


# -------------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_fuzzed_bodies_are_refused_without_5xx_and_nothing_applied(target: Target, endpoint: str) -> None:
    """EXAMPLES fuzzed POSTs to one endpoint of one party's server: see the module docstring."""

    @FUZZ
    @given(cases(target, endpoint))
    def fuzz(case: Case) -> None:
        fuzz_one(target, endpoint, case)

    fuzz()
    assert target.sent[endpoint] >= EXAMPLES, target.sent
    assert_still_serving_and_nothing_applied(target, hello_changed=endpoint == "hello")


def test_replays_in_the_open_session_are_never_applied_twice(target: Target) -> None:
    """Three batches accepted in the open session; then resends of them (acknowledged as duplicates only when
    seq and key are the last ones), earlier seqs, gaps, other sessions and jobs: the inbox keeps exactly three."""
    t = target
    keys = [BatchKey("train", 0, step) for step in (1, 2, 3)]
    for seq, key in enumerate(keys, start=1):
        body = tensor_body(t.job, seq=seq, key=key, kind=t.accepts, tensors=cut(4, fill=float(seq)))
        assert t.client.post("/v1/tensors", content=body).json() == {"status": "accepted"}

    @settings(FUZZ, max_examples=300)
    @given(
        seq=st.integers(-2, 9),
        key=st.sampled_from(keys) | st.builds(BatchKey, st.sampled_from(["train", "eval"]), st.integers(0, 1),
                                              st.integers(0, 4)),
        session=st.sampled_from([t.session, t.session, earlier_session(t.job), WRONG_SESSION, ""]),
        fingerprint=st.sampled_from([t.job.fingerprint(), t.job.fingerprint(), OTHER_JOB]),
    )
    def replay(seq: int, key: BatchKey, session: str, fingerprint: str) -> None:
        fresh = session == t.session and fingerprint == t.job.fingerprint()
        assume(not (fresh and seq == 4))  # the one body that would rightly be applied
        body = tensor_body(t.job, seq=seq, key=key, kind=t.accepts, tensors=cut(4, fill=float(seq)), session=session,
                           fingerprint=fingerprint)
        before = t.inbox.bytes_received
        response = t.client.post("/v1/tensors", content=body)
        check_refusal(response)
        if seq < 1:
            expected = 400
        elif fresh and seq == 3 and key == keys[2]:
            expected = 200
        else:
            expected = 409
        assert response.status_code == expected, (seq, key, session, fingerprint, response.text)
        if expected == 200:
            assert response.json() == {"status": "duplicate"} and t.inbox.bytes_received == before + len(body)
        else:
            assert t.inbox.bytes_received == before
        assert t.inbox.pending(t.sender, t.accepts) == 3

    replay()
    for key in keys:  # the three batches, once each, in order
        message = t.inbox.next_tensors(t.sender, t.accepts, 0)
        assert message is not None and message.key == key
    assert_still_serving_and_nothing_applied(t, hello_changed=True)


# ----------------------------------------------------------------------------------- raw HTTP over raw TLS


def raw_exchange(t: Target, request: bytes, timeout_s: float = 10.0) -> list[tuple[int, dict[str, str], bytes]]:
    """Send bytes as they are over a fresh mutual-TLS connection; (status, headers, body) of every response
    until the server closes the connection."""
    host, port = t.url.rsplit(":", 1)
    context = t.tls
    with socket.create_connection((host, int(port)), timeout=timeout_s) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            received = b""
            try:
                tls.sendall(request)
                while chunk := tls.recv(65536):
                    received += chunk
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):  # an aborted connection ends the answer
                pass
    return parse_responses(received)


def parse_responses(received: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    responses = []
    while received:
        head, separator, rest = received.partition(b"\r\n\r\n")
        assert separator, f"incomplete response head: {received[:200]!r}"
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        match = re.fullmatch(r"HTTP/1\.1 (\d{3}) .*", status_line)
        assert match, status_line
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(match.group(1))
        if headers.get("transfer-encoding") == "chunked":  # uvicorn's own 400, mostly
            body, received = dechunked(rest)
        elif "content-length" in headers:
            length = int(headers["content-length"])
            body, received = rest[:length], rest[length:]
        else:  # an interim 100 Continue has no body; uvicorn's 400 to an unreadable request line ends at close
            body, received = (b"", rest) if status < 200 else (rest, b"")
        responses.append((status, headers, body))
    return responses


def dechunked(data: bytes) -> tuple[bytes, bytes]:
    """(body, what follows it) of a chunked response body."""
    body = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body, data.partition(b"\r\n")[2]
        body, data = body + data[:size], data[size + 2 :]


def check_raw_responses(responses: list[tuple[int, dict[str, str], bytes]]) -> None:
    for status, headers, body in responses:
        assert status < 500, (status, body)
        if status < 400:
            continue
        if headers.get("content-type", "").startswith("application/json"):
            answer = httpx.Response(status, content=body).json()
            assert isinstance(answer, dict) and isinstance(answer.get("error"), str), body
        else:  # h11 refused the framing: uvicorn answered before the app saw the request
            assert (status, body) == (400, UVICORN_400), (status, headers, body)


def chunked(body: bytes, cuts: list[int]) -> bytes:
    bounds = sorted(cuts)
    pieces = [body[i:j] for i, j in zip([0, *bounds], [*bounds, len(body)], strict=True)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


LENGTH_VALUES = ["abc", "-1", "1e3", "0x10", "", " ", "\xb2", "12 13", "12,13", "+12", "99999999999999999999",
                 "999999999999999999999", str(64 * 1024 + 1), "0"]
# Bare-LF chunk lines (b"2\nab\n0\n\n") are no line ends to h11: that body never completes, so it belongs with the
# read deadline's cases (test_bodies_that_never_complete_...), not with those that get an answer.
BAD_CHUNKS = [b"zz\r\nab\r\n0\r\n\r\n", b"-1\r\nab\r\n0\r\n\r\n", b"2\r\nabc\r\n0\r\n\r\n",
              b"2;ext=1\r\nab\r\n0\r\n\r\n", b"2\r\nab\r\n0\r\nx-trailer: 1\r\n\r\n", b"0\r\n\r\n",
              b"2\r\nab\r\n0\r\n\r\ngarbage"]


@st.composite
def raw_requests(draw: st.DrawFn, t: Target) -> bytes:
    """One HTTP/1.1 request as bytes, framed right or wrong, always with `Connection: close` (so the server
    answers and closes: nothing waits for a read timeout)."""
    endpoint = draw(st.sampled_from(ENDPOINTS))
    body = draw(bodies_of(t, endpoint)[draw(st.sampled_from(FAMILIES))])
    assume(not could_be_applied(t, decoded(body)))
    method = draw(st.sampled_from(["POST", "POST", "POST", "PUT", "GET", "OPTIONS", "FUZZ", "post"]))
    path = draw(st.sampled_from([f"/v1/{endpoint}", f"/v1/{endpoint}/", f"/v1/{endpoint}?x=1", "/v1/", "/",
                                 f"//v1/{endpoint}", "*", f"/V1/{endpoint}", "/v1/../v1/hello"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "http/1.1"]))
    lines = [f"{method} {path} {version}", f"Host: {t.url}"]
    if draw(st.booleans()):  # right after Host: a folded line must not fold into `Connection: close`
        lines.append(draw(st.sampled_from(["Expect: 100-continue", "Transfer-Encoding: gzip",
                                           "Transfer-Encoding: chunked, chunked", "Transfer-Encoding: identity",
                                           "Content-Encoding: gzip", "X-Bad Header: 1", "X-Empty:", ": no name",
                                           " folded: header", "X-Long: " + "l" * 17_000])))
    if (content_type := draw(st.none() | st.sampled_from([*CONTENT_TYPES, "\x01", "a" * 9000]))) is not None:
        lines.append(f"Content-Type: {content_type}")
    framing = draw(st.sampled_from(["exact", "short", "garbage", "duplicate", "chunked", "bad-chunks",
                                    "chunked+length", "none"]))
    payload = body
    if framing == "exact":
        lines.append(f"Content-Length: {len(body)}")
    elif framing == "short":
        lines.append(f"Content-Length: {draw(st.integers(0, max(len(body) - 1, 0)))}")
    elif framing == "garbage":
        lines.append(f"Content-Length: {draw(st.sampled_from(LENGTH_VALUES))}")
    elif framing == "duplicate":
        lines += [f"Content-Length: {len(body)}", f"Content-Length: {draw(st.integers(0, len(body) + 1))}"]
    elif framing in ("chunked", "chunked+length"):
        lines.append("Transfer-Encoding: chunked")
        payload = chunked(body, draw(st.lists(st.integers(0, len(body)), max_size=4)))
        if framing == "chunked+length":
            lines.append(f"Content-Length: {draw(st.integers(0, len(payload)))}")
    elif framing == "bad-chunks":
        lines.append("Transfer-Encoding: chunked")
        payload = draw(st.sampled_from(BAD_CHUNKS))
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def test_raw_http_with_lying_headers_gets_no_5xx(target: Target) -> None:
    """Framing the httpx client would refuse to send (a Content-Length that lies or is no number, broken
    chunks, odd methods and versions) over a raw TLS socket: no 5xx, nothing applied, the server stays up."""
    t = target
    sent = 0

    @settings(FUZZ, max_examples=RAW_EXAMPLES)
    @given(request=raw_requests(t))
    def fuzz(request: bytes) -> None:
        nonlocal sent
        before = Snapshot.of(t)
        responses = raw_exchange(t, request)
        sent += 1
        assert responses, f"no answer to {request[:300]!r}"
        check_raw_responses(responses)
        after = Snapshot.of(t)
        assert after.pending == (0, 0) and after.aborted is None, after
        if all(status >= 300 for status, _, _ in responses):
            assert before.same(after), (before, after)

    fuzz()
    assert sent >= RAW_EXAMPLES
    assert_still_serving_and_nothing_applied(t, hello_changed=True)


@pytest.mark.parametrize("target", ["leader"], indirect=True)  # the listener's business: the same for both parties
def test_bodies_that_never_complete_are_dropped_and_pipelined_leftovers_refused(target: Target) -> None:
    """A Content-Length larger than the body sent, a chunk that never ends (or whose lines end in a bare LF), a
    request that stops in its headers: the read deadline (2 s) closes each without an answer. And a short
    Content-Length on a kept-alive connection: the leftover bytes are a second, broken request, refused with 400.
    Nothing applied."""
    t = target
    body = tensor_body(t.job, seq=1, kind=t.accepts, session=WRONG_SESSION, tensors=cut(4, fill=1.0))
    head = f"POST /v1/tensors HTTP/1.1\r\nHost: {t.url}\r\n"
    hanging = [
        f"{head}Content-Length: {len(body) + 10}\r\n\r\n".encode() + body,
        f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + b"%x\r\n" % (10**9) + body,
        f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + b"2\nab\n0\n\n",  # bare LF: no chunk line ends
        f"{head}Content-Length: {len(body)}\r\n".encode(),  # the headers never end
        b"POST /v1/tensors HT",
    ]
    results: list[list[tuple[int, dict[str, str], bytes]]] = []
    threads = [threading.Thread(target=lambda r=request: results.append(raw_exchange(t, r))) for request in hanging]
    for thread in threads:  # all at once: the whole test waits for one read deadline, not four
        thread.start()
    for thread in threads:
        thread.join(15)
    assert results == [[]] * len(hanging)

    pipelined = f"{head}Content-Length: {len(body) // 2}\r\n\r\n".encode() + body + b"\r\n\r\n"
    responses = raw_exchange(t, pipelined)
    assert [status for status, _, _ in responses] == [400, 400], responses
    check_raw_responses(responses)
    assert_still_serving_and_nothing_applied(t)
