"""The job spec: one YAML file in `jobs/`, validated once at load into typed, frozen objects.

Every later step reads the spec, never the raw YAML. Unknown keys are errors that name the key and file.
Relative paths in the job are resolved against the current directory (run `vfl` from the project root).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_prep.schema import CRITEO_SCALING, Kind, Label, PartySchema, Role, Scaling, Task, criteo_columns
from vfl_cli.errors import JobError
from vfl_cli.privacy_spec import PrivacySpec, QuantizeSpec
from vfl_cli.serve_spec import ServeSpec

__all__ = ["Role", "JobSpec", "PartySpec", "PrivacySpec", "QuantizeSpec", "load_job", "parse_job"]

PARTY_KEY = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # a party's key in `parties:` (its directory, `--party`) and its name
CUT_TENSOR = "cut"  # the name of an mlp bottom's one cut tensor
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartySpec(_Spec):
    """One party: its columns, where it listens, how it computes and how it proves who it is.

    Columns are given either as `columns: {name: numeric | categorical, ...}` (any table; names are this
    party's own) or, for the Criteo preset, as `fields: [I1, C1, ...]` (kinds from the names). The label party
    may hold no feature columns (`columns: {}`).
    """

    name: str = Field(pattern=PARTY_KEY)  # certificate common name, e.g. "leader"
    columns: dict[str, Kind]  # name -> kind, in the order of the prepared arrays
    preset: Literal["criteo"] | None = None  # set by `fields:`; the Criteo preset's defaults apply
    id_column: str = "id"  # `vfl prep table`: the column with the customer id that PSI matches on
    label_column: str = "label"  # `vfl prep table`: the label party's label column (the followers have none)
    task: Task = "binary"  # the label party's: binary (0/1), multiclass (classes from the training rows), regression
    listen: str = "127.0.0.1:8701"  # host:port its HTTPS server binds
    address: str | None = None  # host:port its peers connect to; default `listen` (differs behind NAT or a proxy)
    threads: PositiveInt | None = None  # torch intra-op threads; None = all cores (set it when parties share a machine)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when this party has one, else cpu
    # the CPU matmul kernels of its linear layers: auto = the faster of MKL and oneDNN, measured at start on this
    # machine (`vfl_cli.model.kernels`); a local choice (summation order only), not in the fingerprint
    gemm: Literal["auto", "mkl", "onednn"] = "auto"
    # worker processes, each with its shard of every batch, paired with the same rank at every party (listen port
    # + rank); `vfl train` starts them itself, or reads RANK/WORLD_SIZE under torchrun; not in the fingerprint
    workers: PositiveInt = 1
    # where its peers reach each worker, by rank, when the workers are on several machines (torchrun); worker i then
    # listens on `listen`'s host at this entry's port. Default: `address` (else `listen`) with its port + i
    worker_addresses: list[str] | None = None
    cert: Path | None = None  # PEM certificate signed by tls.ca, with CN = name
    key: Path | None = None  # PEM private key of `cert`
    key_password_env: str | None = None  # name of the environment variable holding the key's password
    key_password_file: Path | None = None  # or a file holding it

    @model_validator(mode="before")
    @classmethod
    def _fields_are_the_criteo_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "fields" not in data:
            return data
        if "columns" in data:
            raise ValueError("give either `fields` (the Criteo preset) or `columns`, not both")
        data = dict(data)
        fields = data.pop("fields")
        if not isinstance(fields, list | tuple) or not all(isinstance(f, str) for f in fields):
            raise ValueError("fields: must be a list of Criteo field names")
        if len(set(fields)) != len(fields):
            raise ValueError("fields: a field is listed twice")
        if not fields:
            raise ValueError("fields: a party needs at least one field")
        try:
            data["columns"] = dict(criteo_columns(tuple(fields)))
        except ValueError as exc:
            raise ValueError(f"fields: {exc}") from exc
        data["preset"] = "criteo"
        return data

    @model_validator(mode="after")
    def _distinct_columns(self) -> PartySpec:
        if self.id_column == self.label_column or {self.id_column, self.label_column} & set(self.columns):
            raise ValueError("id_column, label_column and the columns must all be different columns")
        return self

    @property
    def fields(self) -> tuple[str, ...]:
        """The column names, in the prepared arrays' order."""
        return tuple(self.columns)

    @field_validator("listen", "address")
    @classmethod
    def _host_port(cls, listen: str | None) -> str | None:
        return None if listen is None else host_port(listen)

    @field_validator("worker_addresses")
    @classmethod
    def _host_ports(cls, addresses: list[str] | None) -> list[str] | None:
        return None if addresses is None else [host_port(a) for a in addresses]

    @model_validator(mode="after")
    def _one_address_per_worker(self) -> PartySpec:
        if self.worker_addresses is not None and len(self.worker_addresses) != self.workers:
            raise ValueError(f"worker_addresses: {len(self.worker_addresses)} given for {self.workers} workers")
        return self

    @property
    def connect_to(self) -> str:
        """host:port where its peers reach this party."""
        return self.address or self.listen

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    def table_schema(self, role: Role, data: DataSpec, holds_label: bool) -> PartySchema:
        """This party's table as data preparation sees it (`role`: its key in the job)."""
        scaling = data.dense or (CRITEO_SCALING if self.preset == "criteo" else "standard")
        label = Label(self.label_column, self.task) if holds_label else None
        return PartySchema(role, tuple(self.columns.items()), self.id_column, label, scaling, data.threshold)


def host_port(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}", value) or not 0 < int(value.rsplit(":", 1)[1]) < 65536:
        raise ValueError("must be host:port, e.g. 127.0.0.1:8701")
    return value


class DataSpec(_Spec):
    dir: Path = Path("runs/data")  # where `vfl prep` writes and training reads: <dir>/<role>/{train,test}/
    threshold: Annotated[int, Field(ge=0)] = 100  # a categorical value seen more than this many times gets an id
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1  # share of rows in the seeded test split
    # numeric value scaling, fitted on each party's own rows: standard ((x - mean) / std), max (x / column max) or
    # log (log(1 + max(x, 0)) / its column max); missing values take the mean (standard) or 0; None = the
    # preset's: max for Criteo's `fields`, standard for `columns`
    dense: Scaling | None = None
    # share of the training rows held out for validation (carved at training time from the seed, the same rows
    # at both parties); > 0 turns on model selection: each epoch is scored on validation, eval and infer use the
    # best epoch, and the test split is scored once, at the end
    valid_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # which training rows are held out: "random" (seeded) or "tail" (the last rows in stored order: the input
    # file's order after `vfl prep criteo`, so for time-ordered data the ones most like a later test file;
    # after a PSI the order is by customer id, so there "tail" is no more than another fixed carve)
    valid_split: Literal["random", "tail"] = "random"


class ModelSpec(_Spec):
    """Each party's bottom and the label party's top (the head). The defaults are the Criteo preset: Wide&Deep
    bottoms whose (wide, deep) [B, 1] each are the cut layer, and a top of Linear(4, 1) over them."""

    bottom: Literal["wide_deep", "mlp"] = "wide_deep"  # mlp: an embedding per categorical column + the numeric
    #                                                    columns, an MLP of deep_layers, then Linear -> cut_dim
    top: Literal["concat", "sum"] = "concat"  # how the head combines the parties' cut outputs
    top_layers: tuple[PositiveInt, ...] = ()  # the head's hidden widths (ReLU between), then Linear -> the task's width
    cut_dim: PositiveInt = 16  # width of an mlp bottom's output (the cut layer); wide_deep's is (1, 1)
    emb_dim: PositiveInt = 80  # embedding width per categorical column (wide_deep: per field)
    deep_layers: tuple[PositiveInt, ...] = (1024, 512, 256, 128)  # MLP widths, ReLU between

    def cut_widths(self, columns: int) -> dict[str, int]:
        """The cut tensors a party with `columns` feature columns sends, name -> width ({} with none): what the
        handshake agrees on (through the fingerprint) and the server enforces."""
        if columns == 0:
            return {}
        return {"wide": 1, "deep": 1} if self.bottom == "wide_deep" else {CUT_TENSOR: self.cut_dim}

    def shared(self) -> dict[str, Any]:
        """What the fingerprint hashes: the settings not at their default among those added with `bottom`, so a
        Criteo job keeps the fingerprint it had before they existed."""
        new = ("bottom", "top", "top_layers", "cut_dim")
        return self.model_dump(mode="json", exclude={k for k in new if getattr(self, k) == getattr(_MODEL_DEFAULTS, k)})


_MODEL_DEFAULTS = ModelSpec()


class FtrlSpec(_Spec):
    lr: PositiveFloat = 5e-2
    l1: NonNegativeFloat = 1e-8
    l2: NonNegativeFloat = 1e-8
    initial_accumulator: PositiveFloat = 1.0


class AdamSpec(_Spec):
    lr: PositiveFloat = 3.5e-4
    eps: PositiveFloat = 1e-8


class EarlyStoppingSpec(_Spec):
    patience: PositiveInt  # stop after this many epochs without a better validation score (the task's primary metric)


class TrainSpec(_Spec):
    epochs: PositiveInt = 15
    batch_size: PositiveInt = 16000  # samples per step
    log_every: PositiveInt = 100  # steps between log lines
    wide_optimizer: FtrlSpec = FtrlSpec()  # FTRL-Proximal for the wide embeddings and bias
    deep_optimizer: AdamSpec = AdamSpec()  # Adam for deep embeddings, MLPs and the top
    l2_coef: NonNegativeFloat = 8e-5  # L2 on each party's deep embedding table
    checkpoint_every: PositiveInt = 500  # steps between checkpoints (each epoch end is one too); both parties agree
    # fp32, or bf16: the bottoms' matmuls in bfloat16 under autocast (CPUs with AVX512-BF16/AMX, CUDA), with
    # float32 weights, optimiser states and cut-layer tensors; ~2.5x faster at the reference size here
    precision: Literal["fp32", "bf16"] = "fp32"
    early_stopping: EarlyStoppingSpec | None = None  # needs data.valid_fraction > 0
    run_dir: Path = Path("runs/train")  # checkpoints and metrics.jsonl go to <run_dir>/<role>/
    # also write TensorBoard event files to <run_dir>/<role>/tensorboard/ (needs `pip install 'vfl[tensorboard]'`);
    # a local choice, not part of the fingerprint
    tensorboard: bool = False


class TransportSpec(_Spec):
    timeout_s: PositiveFloat = 120.0  # how long to wait for the peer's next message before giving up
    connect_timeout_s: PositiveFloat = 120.0  # how long to wait for the peer to come up (handshake)
    retries: Annotated[int, Field(ge=0)] = 5  # resends on connection errors and 5xx, with backoff
    max_body_bytes: PositiveInt = 64 * 1024 * 1024  # larger request bodies are refused with 413
    read_timeout_s: PositiveFloat = 30.0  # TLS handshake, and a request's headers + body, must arrive within this;
    #                                       connections idle for longer are closed
    max_pending: PositiveInt = 64  # messages queued per sender and kind; beyond it the server answers 503
    max_unauthenticated: PositiveInt = 32  # connections still in their TLS handshake; beyond it a flood's go first


class TlsSpec(_Spec):
    enabled: bool = True  # false = plain HTTP (warned about); only for debugging on loopback
    ca: Path | None = None  # PEM CA certificate that signed both parties' certificates


class MetricsSpec(_Spec):
    """A plain-HTTP listener for monitoring (GET /metrics in Prometheus text format, GET /healthz)."""

    # host:port per party key, e.g. {leader: 127.0.0.1:9101, follower: 127.0.0.1:9102}; a party not named has none
    listen: dict[str, str] = Field(default_factory=dict)

    @field_validator("listen")
    @classmethod
    def _host_ports(cls, listen: dict[str, str]) -> dict[str, str]:
        return {role: host_port(value) for role, value in listen.items()}


class PsiSpec(_Spec):
    """Private set intersection of the parties' customer ids (`vfl psi`)."""

    min_intersection: PositiveInt = 100  # fewer common ids is refused: a wrong file, or a peer probing for ids
    batch_size: PositiveInt = 50_000  # ids per message and per blinding batch (bounds memory)
    # threads for the curve arithmetic (rbcl releases the GIL); None = the party's `threads`, else 1. Local, so
    # not in the fingerprint
    threads: PositiveInt | None = None


class JobSpec(_Spec):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # job name, part of the fingerprint
    seed: int = 0  # shared seed: batch order, test split, initial weights
    data: DataSpec = DataSpec()
    # the parties by key (`--party KEY`, <data.dir>/<key>/): the label party (`label_party`) and one or more
    # followers, each with its own columns; followers talk to the label party only (a star)
    parties: dict[Annotated[str, Field(pattern=PARTY_KEY)], PartySpec]
    label_party: str = "leader"  # the key of the party that holds the label (the leader)
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    transport: TransportSpec = TransportSpec()
    tls: TlsSpec = TlsSpec()
    metrics: MetricsSpec = MetricsSpec()  # monitoring listeners (local settings, not in the fingerprint)
    psi: PsiSpec = PsiSpec()  # aligning the organisations' tables by customer id
    privacy: PrivacySpec = PrivacySpec()
    serve: ServeSpec = ServeSpec()  # `vfl serve` (local settings, not in the fingerprint)

    @model_validator(mode="after")
    def _parties(self) -> JobSpec:
        if self.label_party not in self.parties:
            raise ValueError(f"parties: needs the label party {self.label_party!r} (label_party), "
                             "and at least one follower")
        if len(self.parties) < 2:
            raise ValueError("parties: needs at least one follower beside the label party")
        reserved = sorted(set(self.parties) & {"top", "central", "local", "tables", "leader-only"})
        if reserved:  # names of model parts, --role choices and data.dir's table folder
            raise ValueError(f"parties: {', '.join(reserved)} is reserved; give the party another key")
        for key in self.followers:
            if not self.parties[key].columns:
                raise ValueError(f"parties.{key}: needs at least one column")
        names = [p.name for p in self.parties.values()]
        if len(set(names)) != len(names):
            raise ValueError("parties: every party needs a name of its own")
        workers = {p.workers for p in self.parties.values()}
        if len(workers) > 1:  # worker i of every party pairs with worker i of each peer
            raise ValueError("parties: every party needs the same number of workers (worker i pairs with worker i); "
                             + ", ".join(f"{key} has {p.workers}" for key, p in self.parties.items()))
        if self.leader.workers > self.train.batch_size:
            raise ValueError(f"parties: {self.leader.workers} workers need train.batch_size >= {self.leader.workers}")
        if self.leader.workers > 1:
            _worker_ports_apart(self.parties, self.leader.workers)
        criteo = [(key, p) for key, p in self.parties.items() if p.preset == "criteo"]
        seen: dict[str, str] = {}
        for key, party in criteo:  # one Criteo file holds them all
            shared = sorted(f for f in party.fields if f in seen)
            if shared:
                both = " and ".join(sorted((seen[shared[0]], key)))
                raise ValueError(f"parties: field(s) {', '.join(shared)} held by both {both}")
            seen |= dict.fromkeys(party.fields, key)
        task = self.leader.task
        if task != "binary" and self.privacy.marvell is not None:
            raise ValueError(f"privacy.marvell: binary labels only; this job's task is {task}")
        if task == "regression" and self.privacy.label_dp is not None:
            raise ValueError("privacy.label_dp: randomised response needs class labels; this job's task is regression")
        if self.train.early_stopping is not None and self.data.valid_fraction == 0:
            raise ValueError("train.early_stopping needs a validation split: set data.valid_fraction > 0")
        unknown = sorted(set(self.metrics.listen) - set(self.parties))
        if unknown:
            raise ValueError(f"metrics.listen: {', '.join(unknown)} is not a party of this job")
        unknown = sorted(set(self.serve.follower_listen) - set(self.followers))
        if unknown:
            raise ValueError(f"serve.follower_listen: {', '.join(unknown)} is not a follower of this job")
        return self

    @property
    def leader(self) -> PartySpec:
        """The label party."""
        return self.parties[self.label_party]

    @property
    def followers(self) -> tuple[str, ...]:
        """The followers' keys, in the job's order (the order of their cuts in the top)."""
        return tuple(key for key in self.parties if key != self.label_party)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every party's key: the leader's, then the followers' in the job's order."""
        return (self.label_party, *self.followers)

    @property
    def follower(self) -> PartySpec:
        """The first follower (the only one of a two-party job)."""
        return self.parties[self.followers[0]]

    def is_leader(self, role: str) -> bool:
        return role == self.label_party

    def table_schema(self, role: str) -> PartySchema:
        return self.party(role).table_schema(role, self.data, self.is_leader(role))

    def cut_widths(self, role: str) -> dict[str, int]:
        """The cut tensors `role` sends (the leader's go to its own top), name -> width."""
        return self.model.cut_widths(len(self.party(role).columns))

    def party(self, role: str) -> PartySpec:
        """The party keyed `role`; JobError naming the job's parties for any other."""
        if role not in self.parties:
            raise JobError(f"unknown party {role!r}; this job's parties are {', '.join(self.keys)}")
        return self.parties[role]

    def peers_of(self, role: str) -> tuple[str, ...]:
        """Who `role` talks to: the leader every follower, a follower the leader alone."""
        return self.followers if self.is_leader(role) else (self.label_party,)

    def key_of(self, name: str) -> str | None:
        """The key of the party named `name` (its certificate's CN), or None."""
        return next((key for key, party in self.parties.items() if party.name == name), None)

    def party_key(self, party: str) -> str:
        """`--party`'s value, a key in `parties:` or a party's name, as the party's key; JobError otherwise."""
        key = party if party in self.parties else self.key_of(party)
        if key is None:
            raise JobError(f"--party {party}: this job's parties are {', '.join(self.keys)}")
        return key

    def fingerprint(self) -> str:
        """Hash of what both parties must agree on; local settings (paths, threads, device, keys) are left out."""
        shared = {
            "name": self.name,
            "seed": self.seed,
            "fields": {role: list(p.fields) for role, p in sorted(self.parties.items())},
            # beyond the Criteo preset: each column's kind, the scaling, the label and task (Criteo jobs keep the
            # fingerprint they had before these existed)
            **({"schema": {role: {"columns": p.columns, "scaling": self.data.dense, "label": p.label_column,
                                  "task": p.task} for role, p in sorted(self.parties.items())}}
               if any(p.preset != "criteo" or p.task != "binary" for p in self.parties.values()) else {}),
            "names": {role: p.name for role, p in sorted(self.parties.items())},
            **({"label_party": self.label_party} if self.label_party != "leader" else {}),
            "data": {"threshold": self.data.threshold, "test_fraction": self.data.test_fraction,
                     "valid_fraction": self.data.valid_fraction,
                     # named only when not the default, so jobs from before the setting keep their fingerprint
                     **({"dense": self.data.dense} if self.data.dense not in (None, "max") else {}),
                     **({"valid_split": self.data.valid_split} if self.data.valid_split != "random" else {})},
            "psi": self.psi.model_dump(mode="json", exclude={"threads"}),
            "model": self.model.shared(),
            "train": self.train.model_dump(mode="json", exclude={"run_dir", "log_every", "tensorboard"}),
            "privacy": self.privacy.model_dump(mode="json"),
        }
        return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]


def _worker_ports_apart(parties: dict[str, PartySpec], workers: int) -> None:
    """Worker i of a party listens on its port + i: on one host, no two parties' port ranges may overlap."""
    taken: dict[tuple[str, int], str] = {}
    for key, party in parties.items():
        if party.worker_addresses is not None:  # placed by hand, on machines of their own
            continue
        if party.port + workers - 1 > 65535:
            raise ValueError(f"parties.{key}.listen: {workers} workers need ports up to {party.port + workers - 1}")
        for port in range(party.port, party.port + workers):
            other = taken.setdefault((party.host, port), key)
            if other != key:
                raise ValueError(f"parties: with {workers} workers each, {other} and {key} both listen on {party.host}:"
                                 f"{port} (worker i listens on the listen port + i); space their ports {workers} apart")


def _describe(err: Any) -> str:
    where = ".".join(str(part) for part in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("greater_than", "int_parsing") and "gt" in (err.get("ctx") or {}):
        message = "must be a positive number"
    return f"{where}: {message}"


def parse_job(data: object, source: str = "<job>") -> JobSpec:
    if not isinstance(data, dict):
        raise JobError(f"{source}: the job must be a YAML mapping")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        first = _describe(exc.errors()[0])
        more = len(exc.errors()) - 1
        raise JobError(f"{source}: {first}" + (f" (and {more} more)" if more else "")) from exc


def load_job(path: Path) -> JobSpec:
    """Read and validate a job file; every problem becomes one JobError line naming the file."""
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise JobError(f"{path}: job file not found") from exc
    except OSError as exc:
        raise JobError(f"{path}: cannot read job file: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise JobError(f"{path}:{line} malformed YAML: {getattr(exc, 'problem', None) or exc}") from exc
    return parse_job(data, str(path))
