"""`vfl serve` for one party: open its feature store and model, start its server, serve until told to stop.

The label party serves its applications (`vfl_cli.serve.api`) and asks the followers for their parts; a
follower serves the label party alone (`vfl_cli.serve.follower`). Both run until SIGTERM or Ctrl-C. At the label
party, SIGHUP (or POST /v1/admin/reload) moves every party to the selected checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from vfl_cli.errors import CheckpointError, JobError
from vfl_cli.party import PartyContext
from vfl_cli.serve.feature_store import FeatureStore
from vfl_cli.serve.leader import Scorer, Unavailable
from vfl_cli.serve_spec import ServeSpec
from vfl_cli.transport.listener import ServerThread
from vfl_cli.transport.tls import api_ssl_context, server_ssl_context

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
CONNECT_WAIT_S = 30.0  # how long the label party keeps asking a follower that is not up yet, at start


def read_token(serve: ServeSpec) -> str | None:
    """The callers' bearer token, from the environment variable or file the job names (never from argv)."""
    if serve.token_env is not None:
        token = os.environ.get(serve.token_env, "").strip()
        where = f"serve.token_env: the environment variable {serve.token_env}"
        if not token:
            raise JobError(f"{where} is not set or empty")
    elif serve.token_file is not None:
        where = f"serve.token_file: {serve.token_file}"
        try:
            token = serve.token_file.read_text().strip()
        except OSError as exc:
            raise JobError(f"{where}: cannot read ({exc.strerror or exc})") from exc
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise JobError(f"{where} holds a token of {len(token)} characters; give at least {MIN_TOKEN_CHARS}")
    return token


def wait_for_stop(on_reload: Callable[[], None] | None = None) -> None:
    """Block until SIGTERM or SIGINT; SIGHUP calls `on_reload` in a thread of its own."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if on_reload is not None:
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=on_reload, daemon=True).start())
    while not stop.wait(0.5):
        pass


def serve_follower(ctx: PartyContext, run_dir: Path, store_dir: Path, say: Callable[[str], None]) -> None:
    from vfl_cli.serve.follower import FollowerModels, create_follower_app

    job = ctx.job
    store = FeatureStore.open(store_dir)
    models = FollowerModels(ctx, run_dir, job.serve.backend)
    first = models.load()  # its own selected (else newest) checkpoint, so a missing one stops here
    host, port = (job.serve.follower_listen.get(ctx.role) or ctx.spec.listen).rsplit(":", 1)
    context = server_ssl_context(job, ctx.role) if job.tls.enabled else None
    server = ServerThread(create_follower_app(ctx, models, store), host.strip("[]"), int(port), context,
                          read_timeout_s=job.transport.read_timeout_s,
                          max_unauthenticated=job.transport.max_unauthenticated)
    server.start()
    say(f"{ctx.role} serving run {first.run_id[:8]} step {first.step} ({store.size:,} customers) to the "
        f"{ctx.leader} on {host}:{server.port}")
    try:
        wait_for_stop()
    finally:
        server.stop()


def serve_leader(ctx: PartyContext, run_dir: Path, store_dir: Path, step: int | None,
                 say: Callable[[str], None]) -> None:
    from vfl_cli.checkpoint import CheckpointStore
    from vfl_cli.serve.api import create_api
    from vfl_cli.serve.model import ServedPart
    from vfl_cli.serve.rows import RowEncoder
    from vfl_cli.serve.telemetry import ServeTelemetry

    job, serve = ctx.job, ctx.job.serve
    if not serve.authenticates:
        raise JobError("serve: name who may call the API: serve.token_env, serve.token_file or serve.clients")
    if serve.clients and not job.tls.enabled:
        raise JobError("serve.clients: client certificates need tls.enabled")
    token = read_token(serve)
    store = FeatureStore.open(store_dir)
    at = None
    if step is not None:
        run_id = CheckpointStore(run_dir / ctx.role, job.fingerprint()).run_id()
        if run_id is None:
            raise CheckpointError(f"{run_dir / ctx.role}: no checkpoint here; run `vfl train` first")
        at = (run_id, step)
    first = ServedPart.load(job, ctx.role, run_dir, at, serve.backend)
    telemetry = ServeTelemetry()
    scorer = Scorer(ctx, run_dir, store, first, telemetry)
    if not job.tls.enabled:
        log.warning("tls.enabled is false: the API and the followers' answers travel unencrypted (plain HTTP), "
                    "and the bearer token with them")
    context = api_ssl_context(job, ctx.role, bool(serve.clients), token is None) if job.tls.enabled else None
    host, port = serve.listen.rsplit(":", 1)
    encoder = RowEncoder(store_dir, job.table_schema(ctx.role)) if ctx.spec.columns else None
    server = ServerThread(create_api(job, scorer, telemetry, token, encoder), host.strip("[]"), int(port), context,
                          read_timeout_s=job.transport.read_timeout_s,
                          max_unauthenticated=job.transport.max_unauthenticated)
    server.start()
    threading.Thread(target=scorer.connect, args=(CONNECT_WAIT_S,), daemon=True).start()
    scheme = "https" if job.tls.enabled else "http"
    say(f"{ctx.role} serving run {first.run_id[:8]} step {first.step} ({store.size:,} customers) on "
        f"{scheme}://{host}:{server.port}/v1/predict (docs at /docs), with {', '.join(scorer.links)}")

    def reload() -> None:
        try:
            generation = scorer.reload()
            say(f"reloaded: serving run {generation.run_id[:8]} step {generation.step}")
        except (Unavailable, CheckpointError) as exc:
            say(f"not reloaded, still serving step {scorer.generation.step}: {exc}")

    try:
        wait_for_stop(reload)
    finally:
        server.stop()
        scorer.close()
