"""The schema of one party's table: its columns by name and kind, its id column, and at the label party the
label column and the task. Criteo is one preset of it (`criteo_columns`).

Both the job (`vfl_cli.job` builds a `PartySchema` per party) and the data preparation use this module; it
imports nothing of `vfl_cli`, so the dependency runs one way: `vfl_cli` -> `data_prep`.

Names are local to their party: `x0` at the leader and `x0` at the follower are two different columns.
A column's position in `columns` is its column in the prepared `ids`/`vals` arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Role = str  # a party's key in the job: "leader", "follower", "follower2", ... (its directory under data.dir)
Kind = Literal["numeric", "categorical"]  # categorical: strings or integer codes, one embedding per value
KINDS: tuple[Kind, ...] = get_args(Kind)
Task = Literal["binary", "multiclass", "regression"]
TASKS: tuple[Task, ...] = get_args(Task)
Scaling = Literal["standard", "max", "log"]  # how numeric values are scaled, fitted on the party's own rows
SCALINGS: tuple[Scaling, ...] = get_args(Scaling)

CRITEO_NUMERIC = tuple(f"I{i}" for i in range(1, 14))  # Criteo's integer fields I1..I13
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))  # Criteo's categorical fields C1..C26
CRITEO_FIELDS = CRITEO_NUMERIC + CRITEO_CATEGORICAL
CRITEO_SCALING: Scaling = "max"  # the preset's default: value / column max, as MindSpore ModelZoo's Wide&Deep


def criteo_columns(fields: tuple[str, ...]) -> tuple[tuple[str, Kind], ...]:
    """The Criteo preset: I1..I13 numeric, C1..C26 categorical; ValueError naming any other name."""
    unknown = [f for f in fields if f not in CRITEO_FIELDS]
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; Criteo has I1..I13 and C1..C26 "
                         "(for other tables name each column's kind under `columns:`)")
    return tuple((f, "numeric" if f in CRITEO_NUMERIC else "categorical") for f in fields)


@dataclass(frozen=True)
class Label:
    column: str
    task: Task = "binary"


@dataclass(frozen=True)
class PartySchema:
    """What data preparation needs to know about one party's table."""

    role: Role
    columns: tuple[tuple[str, Kind], ...]  # (name, kind) in the prepared arrays' column order
    id_column: str = "id"
    label: Label | None = None  # the label party's; None for a feature party
    scaling: Scaling = "standard"
    threshold: int = 100  # a categorical value seen more than this many times gets its own id

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    @property
    def numeric(self) -> tuple[str, ...]:
        return tuple(name for name, kind in self.columns if kind == "numeric")

    @property
    def categorical(self) -> tuple[str, ...]:
        return tuple(name for name, kind in self.columns if kind == "categorical")

    @property
    def kinds(self) -> dict[str, Kind]:
        return dict(self.columns)

    @property
    def task(self) -> Task | None:
        return None if self.label is None else self.label.task
