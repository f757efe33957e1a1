"""meta.json: what a prepared directory holds, as a record (`PartyMeta` for the split data that training reads,
`TableMeta` for one party's own table before the PSI); `data_prep.store` draws the directories' layout.

Beside the arrays' shapes and checksums, a meta.json says, per field in column order, its kind (`kinds`:
"numeric" or "categorical"), and for the label party its `task` ("binary", "multiclass" or "regression";
None without labels) and, multiclass only, its `classes` (the class names in index order, which labels.npy
holds; () otherwise). A meta.json written before these keys existed still reads (format 1 throughout):
kinds from the Criteo names (I1..I13 numeric, the rest categorical), task "binary" where it has labels, no
classes. Code that builds a record without them gets the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from data_prep.schema import CRITEO_NUMERIC, KINDS, TASKS

FORMAT_VERSION = 1


@dataclass(frozen=True)
class SplitMeta:
    rows: int
    sha256: dict[str, str]  # file name -> hex digest of the file's bytes
    sample_ids_digest: str  # sha256 of the sample_ids array's raw bytes: the data fingerprint


def criteo_kinds(fields: tuple[str, ...]) -> tuple[str, ...]:
    """Each field's kind as the Criteo names say: what a meta.json from before `kinds` existed means."""
    return tuple("numeric" if name in CRITEO_NUMERIC else "categorical" for name in fields)


def _settle_schema(meta: PartyMeta | TableMeta) -> None:
    """Fill in kinds, task and classes where not given (old meta.json, or code that leaves them out), as an
    older meta.json means them, and refuse values that cannot be; ValueError (a corrupt meta.json)."""
    kinds = tuple(meta.kinds) or criteo_kinds(meta.fields)
    if len(kinds) != len(meta.fields) or not set(kinds) <= set(KINDS):
        raise ValueError(f"kinds must be one of {', '.join(KINDS)} per field")
    task = (meta.task or "binary") if meta.has_labels else None
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    classes = tuple(str(c) for c in meta.classes)
    if classes and task not in ("multiclass", None):  # None: new customers encoded with a multiclass vocabulary
        raise ValueError("classes are only for multiclass labels")
    object.__setattr__(meta, "kinds", kinds)
    object.__setattr__(meta, "task", task)
    object.__setattr__(meta, "classes", classes)


@dataclass(frozen=True)
class PartyMeta:
    role: str  # "leader" or "follower"
    fields: tuple[str, ...]  # column order of ids/vals
    has_labels: bool
    vocab_size: int  # ids are in [0, vocab_size)
    field_offsets: dict[str, int]  # first id of each field's id range
    threshold: int
    source: str  # the raw input's file name
    splits: dict[str, SplitMeta]
    format: int = FORMAT_VERSION
    psi: dict[str, Any] | None = None  # after `vfl psi`: {"size", "digest", "my_size", "peer_sizes", "pairwise"}
    kinds: tuple[str, ...] = ()  # per field: "numeric" or "categorical"; () = from the Criteo names
    task: str | None = None  # with labels: "binary", "multiclass" or "regression" (None = binary); else None
    classes: tuple[str, ...] = ()  # multiclass: class names in index order (labels.npy holds the index)

    def __post_init__(self) -> None:
        _settle_schema(self)

    def to_json(self) -> str:
        body: dict[str, Any] = {
            "format": self.format,
            "role": self.role,
            "fields": list(self.fields),
            "kinds": list(self.kinds),
            "has_labels": self.has_labels,
            "task": self.task,
            "classes": list(self.classes),
            "vocab_size": self.vocab_size,
            "field_offsets": self.field_offsets,
            "threshold": self.threshold,
            "source": self.source,
            "splits": {name: vars(split) for name, split in self.splits.items()},
        }
        if self.psi is not None:
            body["psi"] = self.psi
        return json.dumps(body, indent=2)

    @classmethod
    def from_json(cls, text: str) -> PartyMeta:
        raw = json.loads(text)
        splits = {name: SplitMeta(**split) for name, split in raw.pop("splits").items()}
        for key in ("fields", "kinds", "classes"):
            raw[key] = tuple(raw.get(key, ()))
        return cls(splits=splits, **raw)


@dataclass(frozen=True)
class TableMeta:
    role: str  # "leader" or "follower"
    fields: tuple[str, ...]  # column order of ids/vals
    has_labels: bool  # labels.npy present
    vocab_size: int  # ids are in [0, vocab_size)
    field_offsets: dict[str, int]  # first id of each field's id range
    threshold: int  # of the vocabulary used (the vocab_from directory's when set)
    source: str  # the input table's file name
    rows: int
    id_column: str  # the input's customer id column
    id_width: int  # w of customer_ids.npy's dtype S<w>
    sha256: dict[str, str]  # file name -> hex digest of the file's bytes
    sample_ids_digest: str  # sha256 of the sample_ids array's raw bytes
    customer_ids_digest: str  # sha256 of the customer_ids array's raw bytes
    vocab_from: str | None = None  # directory whose vocab.json/dense_max.json encoded it; None = fitted here
    kind: str = "table"
    format: int = FORMAT_VERSION
    kinds: tuple[str, ...] = ()  # as PartyMeta's
    task: str | None = None
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _settle_schema(self)

    def to_json(self) -> str:
        body = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for key in ("fields", "kinds", "classes"):
            body[key] = list(body[key])
        return json.dumps(body, indent=2)

    @classmethod
    def from_json(cls, text: str) -> TableMeta:
        raw = json.loads(text)
        for key in ("fields", "kinds", "classes"):
            raw[key] = tuple(raw.get(key, ()))
        return cls(**raw)
