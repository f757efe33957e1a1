"""The job's `serve:` section: how `vfl serve` answers the label party's applications, validated at load with the
rest of the job (`JobSpec.serve`). Serving settings are local to the parties that serve: they are not part of the
job's fingerprint, so a trained job can be given a `serve:` section later and keep its checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
MAX_BATCH_LIMIT = 4096  # ids per request and per batch a follower is asked for; bounds every message's size


class ServeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = "127.0.0.1:8443"  # the label party's API for its applications (HTTPS, its own certificate)
    # where each follower answers the label party while serving; default its `listen` (pick another port to serve
    # while the same follower trains)
    follower_listen: dict[str, str] = {}
    max_batch: Annotated[int, Field(gt=0, le=MAX_BATCH_LIMIT)] = 256  # ids per request, and per micro-batch
    max_wait_ms: NonNegativeFloat = 2.0  # how long a batch waits for more requests once the first has come
    timeout_ms: PositiveFloat = 1000.0  # a request's whole budget; a follower slower than this gets a 503
    token_env: str | None = None  # the environment variable holding the callers' bearer token
    token_file: Path | None = None  # or a file holding it (one line)
    clients: tuple[str, ...] = ()  # or client certificates from the job's CA whose CN is one of these
    # what a follower answers for a customer id it does not hold: "missing" (the id gets no score, and the label
    # party is told which party lacks it) or "default_row" (the follower's part for a customer with every value
    # missing; the score is marked as imputed). Either way the label party can tell (see README, serving).
    unknown: Literal["missing", "default_row"] = "missing"
    backend: Literal["torch", "onnxruntime"] = "torch"  # what computes each party's part (see bench-serve)
    batches_in_flight: Annotated[int, Field(gt=0, le=16)] = 2  # micro-batches computed at once (one per thread)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        from vfl_cli.job import host_port

        return host_port(value)

    @field_validator("follower_listen")
    @classmethod
    def _each_host_port(cls, value: dict[str, str]) -> dict[str, str]:
        from vfl_cli.job import host_port

        return {key: host_port(address) for key, address in value.items()}

    @model_validator(mode="after")
    def _one_token_source(self) -> ServeSpec:
        if self.token_env is not None and self.token_file is not None:
            raise ValueError("give token_env or token_file, not both")
        return self

    @property
    def authenticates(self) -> bool:
        """Whether any caller can be authenticated at all (a token, or client certificates)."""
        return self.token_env is not None or self.token_file is not None or bool(self.clients)
