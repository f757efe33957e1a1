"""The label party while serving: `Scorer.score(ids)` scores one micro-batch with every party's part of one model,
and `Scorer.reload()` moves every party to a new checkpoint.

One batch = one round trip to each follower, all at once (a thread each), over the same mutually
authenticated channel as training: the follower's certificate must carry its party name, ours is checked by
it. The batch takes the current generation (the leader's `ServedPart`: its run, step and model) once, asks
every follower for that step, and refuses any answer of another step: a response never mixes two steps.

A follower that cannot answer within the request's budget (down, slow, another model) makes the batch fail
with `Unavailable` (the API answers 503 + Retry-After); the next batch tries it again, so serving resumes by
itself as soon as it is back. A reload loads the new checkpoint here, asks every follower to load the same step,
and only then swaps the generation: batches already running finish with the old step, which the followers still
hold.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from vfl_cli.errors import ProtocolError
from vfl_cli.party import PartyContext
from vfl_cli.privacy.cut_layer import CutLayerDefences
from vfl_cli.protocol import check_cut_tensors
from vfl_cli.serve.feature_store import FeatureStore
from vfl_cli.serve.model import Cut, ServedPart
from vfl_cli.serve.telemetry import ServeTelemetry
from vfl_cli.transport.codec import MAX_IDS, CutAnswer, CutRequest, ModelMessage, decode, encode
from vfl_cli.transport.https_grid import peer_client, refusal_reason
from vfl_cli.transport.tls import client_ssl_context

log = logging.getLogger(__name__)


Given = tuple[np.ndarray, np.ndarray]  # the label party's own rows given in a request: ids int64, vals float32


CONNECT_LOAD_S = 30.0  # a follower's first load of a checkpoint may take a while: a longer budget than a batch's


class Unavailable(Exception):
    """A batch that cannot be scored now (a follower down, slow or serving another model): 503."""


@dataclass(frozen=True)
class Scored:
    run_id: str
    step: int
    predictions: np.ndarray  # [B] or [B, k]
    missing: dict[int, list[str]] = field(default_factory=dict)  # row -> the parties that do not hold that id


def follower_address(ctx: PartyContext, key: str) -> str:
    """Where follower `key` answers while serving: `serve.follower_listen`, else its training address."""
    return ctx.job.serve.follower_listen.get(key) or ctx.peers[key].connect_to


class FollowerLink:
    """The label party's keep-alive HTTPS client to one follower's serving endpoint."""

    def __init__(self, ctx: PartyContext, key: str, verify: ssl.SSLContext | bool, connections: int) -> None:
        self.key, self.name = key, ctx.peers[key].name
        scheme = "https" if ctx.job.tls.enabled else "http"
        self.url = f"{scheme}://{follower_address(ctx, key)}"
        self._fingerprint = ctx.job.fingerprint()
        self.client = peer_client(self.url, verify, ctx.name, connections)

    def call(self, path: str, message: CutRequest | ModelMessage, timeout_s: float) -> CutAnswer | ModelMessage:
        """POST one message and decode the answer; Unavailable with the reason for anything short of an answer."""
        try:
            response = self.client.post(path, content=encode(message, self._fingerprint), timeout=timeout_s,
                                        extensions={"sni_hostname": self.name})
        except httpx.TimeoutException as exc:
            raise Unavailable(f"the {self.key} did not answer within {timeout_s * 1000:.0f} ms") from exc
        except httpx.TransportError as exc:
            raise Unavailable(f"the {self.key} at {self.url} cannot be reached ({type(exc).__name__})") from exc
        if response.status_code != 200:
            raise Unavailable(f"the {self.key} refused: {refusal_reason(response)} (HTTP {response.status_code})")
        try:
            _, answer = decode(response.content)
        except ProtocolError as exc:
            raise Unavailable(f"the {self.key} answered a malformed message: {exc}") from exc
        if not isinstance(answer, CutAnswer | ModelMessage):
            raise Unavailable(f"the {self.key} answered a {type(answer).__name__}")
        return answer

    def close(self) -> None:
        self.client.close()


class Scorer:
    """The label party's serving state: its feature store, its current generation and a link to each follower."""

    def __init__(self, ctx: PartyContext, run_dir: Path, store: FeatureStore, first: ServedPart,
                 telemetry: ServeTelemetry) -> None:
        job = ctx.job
        self.ctx, self.run_dir, self.store = ctx, run_dir, store
        self.timeout_s = job.serve.timeout_ms / 1000
        self.backend = job.serve.backend
        self.generation = first  # the model every party serves now: the leader's part, its run and step
        in_flight = job.serve.batches_in_flight
        verify: ssl.SSLContext | bool = client_ssl_context(job, ctx.role) if job.tls.enabled else False
        self.links = {key: FollowerLink(ctx, key, verify, in_flight + 1) for key in ctx.followers}
        self._pool = ThreadPoolExecutor(max(len(self.links) * (in_flight + 1), 1), thread_name_prefix="vfl-serve")
        self._reloading = threading.Lock()
        self.telemetry = telemetry
        telemetry.step.set(first.step)
        self.followers_ready: dict[str, str] = dict.fromkeys(self.links, "not contacted yet")

    # ------------------------------------------------------------------------------------------------ scoring

    def score(self, segments: list[tuple[list[str], Given | None]]) -> Scored:
        """Every party's part of the current generation for these requests' customers, the label party's own rows
        from its store or as given with a request: one round trip to each follower."""
        started = time.monotonic()
        generation = self.generation  # once: every part of this batch comes from this step
        ids = [cid for segment, _ in segments for cid in segment]
        request = CutRequest(generation.run_id, generation.step, tuple(ids))
        futures = {key: self._pool.submit(self._cut, link, request, started) for key, link in self.links.items()}
        rows = self.store.lookup(ids)
        offset = 0
        for segment, given in segments:
            if given is not None:  # fresher than the store: the request's own
                end = offset + len(segment)
                rows.ids[offset:end], rows.vals[offset:end] = given
                rows.found[offset:end] = True
            offset += len(segment)
        own = generation.cut(rows.ids, rows.vals)
        answers: dict[str, CutAnswer] = {}
        failure: Unavailable | None = None
        for key, future in futures.items():
            try:
                answers[key] = future.result()
            except Unavailable as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        missing: dict[int, list[str]] = {int(i): [self.ctx.role] for i in np.flatnonzero(~rows.found)}
        cuts: list[Cut] = [own]
        for key in self.links:
            answer = answers[key]
            for i in np.flatnonzero(~np.array(answer.found, dtype=bool)):
                missing.setdefault(int(i), []).append(key)
            cuts.append({name: t.numpy() for name, t in CutLayerDefences.received(answer.tensors).items()})
        predictions = generation.predict(cuts)
        return Scored(generation.run_id, generation.step, predictions, missing)

    def _cut(self, link: FollowerLink, request: CutRequest, started: float) -> CutAnswer:
        left = self.timeout_s - (time.monotonic() - started)
        if left <= 0:
            raise Unavailable(f"no time left for the {link.key} within {self.timeout_s * 1000:.0f} ms")
        sent = time.perf_counter()
        try:
            answer = link.call("/v1/serve/cut", request, left)
        except Unavailable as exc:
            self.followers_ready[link.key] = str(exc)
            raise
        self.telemetry.round_trip(link.key, time.perf_counter() - sent)
        if not isinstance(answer, CutAnswer) or (answer.run_id, answer.step) != (request.run_id, request.step):
            raise Unavailable(f"the {link.key} answered for another model than run {request.run_id[:8]} "
                              f"step {request.step}")
        job = self.ctx.job
        try:  # what an embeddings message must be in training, for as many rows as were asked for
            check_cut_tensors(answer.tensors, job.cut_widths(link.key), MAX_IDS, job.privacy.quantize.embeddings)
            if len(answer.found) != len(request.ids):
                raise ProtocolError(f"{len(answer.found)} rows for {len(request.ids)} ids")
        except ProtocolError as exc:
            raise Unavailable(f"the {link.key} answered a cut that is not its cut of these ids: {exc}") from exc
        self.followers_ready[link.key] = "ok"
        return answer

    # ---------------------------------------------------------------------------------------- model changes

    def connect(self, wait_s: float) -> None:
        """Ask every follower to hold this generation's run and step (the same check as `vfl eval`'s), until each
        has or `wait_s` passes; a follower that cannot is reported in `followers_ready`, not fatal: serving
        answers 503 until it can."""
        deadline = time.monotonic() + wait_s
        self.probe(CONNECT_LOAD_S)
        while not self.ready and time.monotonic() <= deadline:
            time.sleep(0.2)
            self.probe(CONNECT_LOAD_S)

    def probe(self, timeout_s: float | None = None) -> None:
        """Ask each follower not known to hold this generation (not contacted yet, or failed last time) whether it
        does now; /healthz calls it too, so that health recovers without traffic."""
        generation = self.generation
        for key, state in list(self.followers_ready.items()):
            if state != "ok":
                try:
                    self._load(key, generation.run_id, generation.step, timeout_s or self.timeout_s)
                except Unavailable as exc:
                    self.followers_ready[key] = str(exc)

    @property
    def ready(self) -> bool:
        """Whether every follower answered for the current generation last time."""
        return all(state == "ok" for state in self.followers_ready.values())

    def _load(self, key: str, run_id: str, step: int, timeout_s: float = CONNECT_LOAD_S) -> None:
        answer = self.links[key].call("/v1/serve/load", ModelMessage(run_id, step), max(self.timeout_s, timeout_s))
        if not isinstance(answer, ModelMessage) or (answer.run_id, answer.step) != (run_id, step):
            raise Unavailable(f"the {key} holds another model than run {run_id[:8]} step {step}")
        self.followers_ready[key] = "ok"

    def reload(self, at: tuple[str, int] | None = None) -> ServedPart:
        """Load the selected checkpoint (or run `at[0]` step `at[1]`) here and at every follower, then serve it.
        Unavailable (and the old model served on) when a follower cannot load it."""
        with self._reloading:
            part = ServedPart.load(self.ctx.job, self.ctx.role, self.run_dir, at, self.backend)
            futures = [self._pool.submit(self._load, key, part.run_id, part.step) for key in self.links]
            for future in futures:
                future.result()
            self.generation = part  # one assignment: each batch sees the old or the new, whole
            self.telemetry.step.set(part.step)
            log.warning("serving run %s step %s", part.run_id[:8], part.step)
            return self.generation

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for link in self.links.values():
            link.close()
