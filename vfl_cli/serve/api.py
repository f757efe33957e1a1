"""The label party's API for its own applications (`vfl serve` at the label party, HTTPS on `serve.listen`):

    POST /v1/predict        {"ids": [...]} (1 to serve.max_batch; optionally "rows": the label party's own columns
                            per id, fresher than its store: `vfl_cli.serve.rows`) -> {"model": {"run", "step"},
                            "predictions": [{"id", "probability"} | {"id", "probabilities"} | {"id", "value"} |
                            {"id", "error", "missing_at"}]}, one per id in the order asked
    POST /v1/admin/reload   {} or {"step": N}: every party loads the selected checkpoint (or step N of the run)
    GET  /metrics           the serving counters (`vfl_cli.serve.telemetry`), Prometheus text format
    GET  /healthz           no authentication: whether every follower answers, and the model served
    GET  /docs              the OpenAPI page (and /openapi.json)

Who may call: a bearer token (`Authorization: Bearer ...`, `serve.token_env` or `serve.token_file`) or a client
certificate from the job's CA whose CN is in `serve.clients`. The check reads the headers and the TLS handshake
only, so an unauthenticated caller is answered 401 before a byte of its body is read (the routes read their
bodies themselves, after the check, bounded by `transport.max_body_bytes`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vfl_cli.errors import CheckpointError
from vfl_cli.job import JobSpec
from vfl_cli.serve.batcher import MicroBatcher
from vfl_cli.serve.leader import Scored, Scorer, Unavailable
from vfl_cli.serve.rows import RowEncoder, RowError
from vfl_cli.serve.telemetry import ServeTelemetry
from vfl_cli.transport.server import Refusal, answer_refusals, client_common_name, read_body

UNAUTHORIZED = "a bearer token or a client certificate named in serve.clients is needed"


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[str | int] = Field(min_length=1, description="customer ids, as `vfl infer` writes them")
    rows: list[dict[str, str | int | float | None]] | None = Field(
        None, description="the label party's own columns for each id, instead of its store's (fresher data)")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int | None = Field(None, description="a step of the current run (default: the selected checkpoint)")


class ModelRef(BaseModel):
    run: str
    step: int


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[dict[str, Any]]


def entries(ids: list[str], scored: Scored, offset: int, kind: str) -> list[dict[str, Any]]:
    """One answer per id: the task's prediction, or why there is none."""
    values = scored.predictions[offset: offset + len(ids)].tolist()
    out: list[dict[str, Any]] = []
    for i, (cid, value) in enumerate(zip(ids, values, strict=True)):
        missing = scored.missing.get(offset + i)
        if missing:
            out.append({"id": cid, "error": "unknown customer", "missing_at": missing})
        elif kind == "binary":
            out.append({"id": cid, "probability": value})
        elif kind == "multiclass":
            out.append({"id": cid, "probabilities": value})
        else:
            out.append({"id": cid, "value": value})
    return out


def create_api(job: JobSpec, scorer: Scorer, telemetry: ServeTelemetry, token: str | None,
               rows: RowEncoder | None = None) -> FastAPI:
    serve = job.serve
    limit, max_batch, timeout_s = job.transport.max_body_bytes, serve.max_batch, serve.timeout_ms / 1000
    clients = set(serve.clients)
    task = scorer.generation.task
    assert task is not None
    batcher: MicroBatcher[Scored] = MicroBatcher(scorer.score, max_batch, serve.max_wait_ms / 1000,
                                                 serve.batches_in_flight, telemetry.batch.observe)

    async def caller(request: Request) -> str:
        """Who calls: a client certificate named in serve.clients, or the bearer token; Refusal 401 otherwise."""
        if clients and job.tls.enabled:
            name = client_common_name(request.scope)
            if name in clients:
                return name
        given = request.headers.get("authorization", "")
        if token is not None and given[:7].lower() == "bearer " and hmac.compare_digest(given[7:].encode(),
                                                                                         token.encode()):
            return "token"
        raise Refusal(401, UNAUTHORIZED, "unauthorized")

    authenticated = Depends(caller)

    async def parsed(request: Request, model: type[BaseModel], empty_ok: bool = False) -> Any:
        body = await read_body(request, limit)
        if empty_ok and not body.strip():
            body = b"{}"
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise Refusal(400, f"{where}: {first['msg']}", "bad_request") from exc

    router = APIRouter()

    # The response is built as bytes, not validated against PredictResponse (documented via `responses`): at
    # thousands of requests a second on one core, validating every answer again costs more than the model.
    @router.post("/v1/predict", responses={200: {"model": PredictResponse}}, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}})
    async def predict(request: Request, who: str = authenticated) -> Response:
        """Score customers by id with every party's part of one model."""
        started = time.perf_counter()
        asked: PredictRequest = await parsed(request, PredictRequest)
        if len(asked.ids) > max_batch:
            raise Refusal(400, f"ids: {len(asked.ids)} ids, at most serve.max_batch = {max_batch}", "bad_request")
        ids = [str(cid) for cid in asked.ids]
        given = None
        if asked.rows is not None:
            if rows is None:
                raise Refusal(400, "rows: the label party has no columns of its own", "bad_request")
            if len(asked.rows) != len(ids):
                raise Refusal(400, f"rows: {len(asked.rows)} rows for {len(ids)} ids", "bad_request")
            try:
                given = rows.encode(asked.rows)
            except RowError as exc:
                raise Refusal(400, str(exc), "bad_request") from exc
        try:
            scored, offset = await asyncio.wait_for(batcher.submit(ids, given), timeout_s)
        except TimeoutError as exc:
            raise Refusal(503, f"no answer within serve.timeout_ms = {serve.timeout_ms:g}", "timeout") from exc
        except Unavailable as exc:
            raise Refusal(503, str(exc), "unavailable") from exc
        body = json.dumps({"model": {"run": scored.run_id, "step": scored.step},
                           "predictions": entries(ids, scored, offset, task.kind)}, separators=(",", ":"))
        telemetry.request("ok", time.perf_counter() - started)
        return Response(body, media_type="application/json")

    @router.post("/v1/admin/reload", openapi_extra={"requestBody": {
        "content": {"application/json": {"schema": ReloadRequest.model_json_schema()}}}})
    async def reload(request: Request, who: str = authenticated) -> dict[str, Any]:
        """Load the selected checkpoint (or a step of the run) at every party, then serve it."""
        asked: ReloadRequest = await parsed(request, ReloadRequest, empty_ok=True)
        at = None if asked.step is None else (scorer.generation.run_id, asked.step)
        try:
            generation = await asyncio.get_running_loop().run_in_executor(None, scorer.reload, at)
        except (Unavailable, CheckpointError) as exc:
            raise Refusal(409, f"not reloaded, still serving step {scorer.generation.step}: {exc}",
                          "bad_request") from exc
        return {"model": {"run": generation.run_id, "step": generation.step}}

    @router.get("/metrics")
    async def metrics(who: str = authenticated) -> Response:
        return Response(telemetry.exposition(), media_type="text/plain; version=0.0.4")

    @router.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Whether every follower answers (no authentication)."""
        if not scorer.ready:
            await asyncio.get_running_loop().run_in_executor(None, scorer.probe)
        return {"status": "ok" if scorer.ready else "unavailable", "role": scorer.ctx.role,
                "model": {"run": scorer.generation.run_id, "step": scorer.generation.step},
                "followers": dict(scorer.followers_ready)}

    app = FastAPI(title=f"vfl serve: {job.name}", version="1",
                  description="Scores for the label party's applications, from every party's part of the model.")
    app.include_router(router)
    answer_refusals(app, telemetry.refused)
    app.state.batcher = batcher
    return app
