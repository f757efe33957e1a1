"""A follower while serving: its models by (run, step) and its feature store, answering the label party alone.

Routes (msgpack bodies, `vfl_cli.transport.codec`; refusals are `{"error": reason}` as in training):
    POST /v1/serve/cut     a CutRequest: this follower's cut of those customers from the model of that run and
                           step, with one `found` flag per id (see `serve.unknown`) -> a CutAnswer
    POST /v1/serve/load    a ModelMessage: hold the model of that run and step (loaded from this follower's own
                           checkpoint; 409 where it has none) -> the same ModelMessage
    GET  /v1/health        liveness, and the steps held

Who may call: the listener requires a client certificate from the job's CA in the TLS handshake, and every
request must come from the label party's (403 otherwise, before the body is read), as in training.

A follower holds the models of the last two steps it was asked for, so that while the label party reloads,
the batches still in flight with the old step are answered with the old step: no answer mixes two steps.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from vfl_cli.errors import CheckpointError, JobError, ProtocolError
from vfl_cli.party import PartyContext
from vfl_cli.privacy.cut_layer import CutLayerDefences
from vfl_cli.protocol import BatchKey
from vfl_cli.serve.feature_store import FeatureStore, Rows
from vfl_cli.serve.model import ServedPart
from vfl_cli.transport.codec import CutAnswer, CutRequest, Message, ModelMessage, decode, encode
from vfl_cli.transport.server import Refusal, answer_refusals, peer_sender, read_body

log = logging.getLogger(__name__)

SERVING_KEY = BatchKey("infer", 0, 0)  # what seeds the defences' generators (none is drawn from while serving)
MODELS_HELD = 2  # the current step's model and the one before it (batches in flight during a reload)


class FollowerModels:
    """This follower's served models by (run id, step), loaded on demand from its own checkpoints."""

    def __init__(self, ctx: PartyContext, run_dir: Path, backend: str) -> None:
        if ctx.job.privacy.embedding_dp is not None or ctx.job.privacy.embedding_rr is not None:
            raise JobError("vfl serve: this job adds noise to the followers' embeddings (privacy.embedding_dp or "
                           "embedding_rr), which serving does not do yet; serve a job without them")
        self.ctx, self.run_dir, self.backend = ctx, run_dir, backend
        self.defences = CutLayerDefences(ctx.job.privacy, ctx.job.seed, party=ctx.role)
        self._held: OrderedDict[tuple[str, int], ServedPart] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, at: tuple[str, int] | None = None) -> ServedPart:
        """The model of run `at[0]` step `at[1]` (default: the selected checkpoint, else the newest)."""
        with self._lock:
            if at is not None and at in self._held:
                self._held.move_to_end(at)
                return self._held[at]
            part = ServedPart.load(self.ctx.job, self.ctx.role, self.run_dir, at, self.backend)
            self._held[part.run_id, part.step] = part
            while len(self._held) > MODELS_HELD:
                self._held.popitem(last=False)
            return part

    @property
    def held(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._held)


def unknown_rows(store: FeatureStore) -> tuple[np.ndarray, np.ndarray]:
    """The row of a customer this follower does not hold, as `serve.unknown: default_row` scores it: every value
    missing, encoded as preparation encodes a missing value (a categorical column's OOV id; a numeric column's
    id with val 0, i.e. the training mean under standard scaling)."""
    meta = store.data.meta
    ids = np.array([meta.field_offsets[f] for f in meta.fields], dtype=np.int64)
    vals = np.array([0.0 if kind == "numeric" else 1.0 for kind in meta.kinds], dtype=np.float32)
    return ids, vals


def answer_cut(part: ServedPart, defences: CutLayerDefences, store: FeatureStore, request: CutRequest,
               policy: str) -> CutAnswer:
    """This follower's cut of the requested customers by `part` (the model of the request's step): zeros where not
    held, with `found` false, or under `default_row` the unknown customer's cut for them, every `found` true."""
    rows: Rows = store.lookup(request.ids)
    found = rows.found
    if policy == "default_row" and not found.all():
        ids, vals = unknown_rows(store)
        rows.ids[~found], rows.vals[~found] = ids, vals
        found = np.ones_like(found)
    cut = part.cut(rows.ids, rows.vals)
    if policy == "missing":
        for tensor in cut.values():
            tensor[~found] = 0.0  # the leader scores no id that lacks a part: send nothing computed for it
    # What leaves the follower passes its embedding defences as in `vfl infer` (quantisation, where the job has
    # it; the noise defences are refused at start, see FollowerModels).
    wire = defences.embeddings_out({name: torch.from_numpy(np.ascontiguousarray(t)) for name, t in cut.items()},
                                          SERVING_KEY)
    return CutAnswer(part.run_id, part.step, tuple(found.tolist()), wire)


def create_follower_app(ctx: PartyContext, models: FollowerModels, store: FeatureStore) -> FastAPI:
    job = ctx.job
    fingerprint, limit, policy = job.fingerprint(), job.transport.max_body_bytes, job.serve.unknown
    from_leader = Depends(peer_sender(ctx))
    router = APIRouter(prefix="/v1")

    async def read(request: Request, expected: type) -> Message:
        body = await read_body(request, limit)
        try:
            job_of_message, message = decode(body)
        except ProtocolError as exc:
            raise Refusal(400, str(exc)) from exc
        if job_of_message != fingerprint:
            raise Refusal(409, f"job fingerprint {job_of_message[:40]} differs from this side's {fingerprint}",
                          "wrong_job")
        if not isinstance(message, expected):
            raise Refusal(400, f"expected a {expected.__name__}, got {type(message).__name__}")
        return message

    def held(at: tuple[str, int]) -> ServedPart:
        try:
            return models.load(at)
        except CheckpointError as exc:
            raise Refusal(409, f"this follower cannot serve run {at[0][:8]} step {at[1]}: {exc}", "no_model") from exc

    @router.post("/serve/cut")
    async def cut(request: Request, name: str = from_leader) -> Response:
        message = await read(request, CutRequest)
        assert isinstance(message, CutRequest)

        def compute() -> CutAnswer:  # one hop to a worker thread per request: the model's step, then its cut
            return answer_cut(held((message.run_id, message.step)), models.defences, store, message, policy)

        answer = await run_in_threadpool(compute)
        return Response(encode(answer, fingerprint), media_type="application/msgpack")

    @router.post("/serve/load")
    async def load(request: Request, name: str = from_leader) -> Response:
        message = await read(request, ModelMessage)
        assert isinstance(message, ModelMessage)
        part = await run_in_threadpool(held, (message.run_id, message.step))
        log.warning("serving run %s step %s", part.run_id[:8], part.step)
        return Response(encode(ModelMessage(part.run_id, part.step), fingerprint), media_type="application/msgpack")

    @router.get("/health")
    async def health(name: str = from_leader) -> dict[str, object]:
        return {"status": "ok", "role": ctx.role, "held": [f"{run[:8]}:{step}" for run, step in models.held]}

    app = FastAPI(title=f"vfl serve {ctx.role}", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(router)
    answer_refusals(app, lambda code: None)
    return app
