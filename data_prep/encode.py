"""One party's encoding (`PartyVocab`): its id layout, categorical vocabulary, numeric scales and classes.

Built from pass 1's `Counts` (`build`) or read back from a prepared directory (`load`, for `--vocab-from`);
written beside the arrays as vocab.json and dense_max.json; applied batch by batch in pass 2 (`encode`,
`labels`). Kinds come from the schema, never from a column's name.

- The columns of ids/vals follow the order of the party's columns in the schema.
- Ids: the columns in that order get consecutive ranges. A numeric column has one id; a categorical column
  has its OOV id first, then one id per frequent value in lexicographic order of the raw string.
- A categorical value counted more than `threshold` times gets its own id; rarer, unseen and missing values
  get the column's OOV id; categorical val = 1.0. A numeric val is its scaled value (`data_prep.scaling`).
- vocab.json: categorical column -> its frequent values in id order. dense_max.json: `data_prep.scaling`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.errors import DataError
from data_prep.fit import Counts
from data_prep.labels import encode_labels
from data_prep.meta import criteo_kinds
from data_prep.reader import LABEL, dictionary_indices
from data_prep.scaling import Scale, read_scales, scales_json
from data_prep.schema import Kind, PartySchema, Role, Scaling, Task


@dataclass(frozen=True)
class PartyVocab:
    role: Role
    columns: tuple[tuple[str, Kind], ...]  # (name, kind) in the arrays' column order
    offsets: dict[str, int]  # first id of each column's range (a categorical column's OOV id)
    size: int  # total ids
    frequent: dict[str, pa.Array]  # categorical column -> its frequent values in id order
    scaling: Scaling  # how the numeric columns were fitted
    scales: dict[str, Scale]  # numeric column -> its fitted scale
    task: Task | None = None  # the label party's task, which encodes its labels
    classes: tuple[str, ...] = ()  # multiclass: the classes in index order

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    @property
    def kinds(self) -> tuple[Kind, ...]:
        return tuple(kind for _, kind in self.columns)

    @classmethod
    def build(cls, schema: PartySchema, counts: Counts) -> PartyVocab:
        frequent = {name: counts.frequent[name] for name in schema.categorical}
        offsets, size = _layout(schema.columns, frequent)
        return cls(
            role=schema.role,
            columns=schema.columns,
            offsets=offsets,
            size=size,
            frequent=frequent,
            scaling=schema.scaling,
            scales={name: counts.scales[name] for name in schema.numeric},
            task=schema.task,
            classes=counts.classes,
        )

    @classmethod
    def load(cls, directory: Path, schema: PartySchema) -> PartyVocab:
        """The encoding a previous `vfl prep criteo` or `vfl prep table` wrote to `directory` (to encode new
        rows). Its scaling and classes win over the job's; its columns and kinds must be the job's."""
        role = schema.role
        try:
            meta = json.loads((directory / "meta.json").read_text())
            frequent = json.loads((directory / "vocab.json").read_text())
            dense = json.loads((directory / "dense_max.json").read_text())
            fields, offsets, size = tuple(meta["fields"]), dict(meta["field_offsets"]), int(meta["vocab_size"])
            kinds = tuple(meta.get("kinds") or criteo_kinds(fields))
            if len(kinds) != len(fields):
                raise ValueError("meta.json has not one kind per field")
            task = meta.get("task", "binary" if meta.get("has_labels") else None)
            classes = tuple(str(c) for c in meta.get("classes") or ())
            values = {name: pa.array(frequent.get(name, []), pa.string()) for name in schema.categorical}
        except FileNotFoundError as exc:
            raise DataError(f"{exc.filename}: missing; --vocab-from needs a prepared party's directory") from exc
        except (ValueError, TypeError, KeyError, pa.ArrowException) as exc:
            raise DataError(f"{directory}: unreadable vocabulary ({exc!r})") from exc
        if meta.get("role") != role:
            raise DataError(f"{directory}: holds the {meta.get('role')}'s vocabulary, not the {role}'s")
        if fields != schema.fields:
            raise DataError(f"{directory}: columns {', '.join(fields) or '(none)'} differ from the job's "
                            f"{', '.join(schema.fields) or '(none)'}")
        if kinds != tuple(kind for _, kind in schema.columns):
            wrong = [f"{name} is {was} there, {kind} in the job"
                     for (name, kind), was in zip(schema.columns, kinds, strict=True) if kind != was]
            raise DataError(f"{directory}: column kinds differ from the job's ({'; '.join(wrong)})")
        if task is not None and schema.task is not None and task != schema.task:
            raise DataError(f"{directory}: prepared for a {task} label, but the job's task is {schema.task}")
        try:
            scaling, scales = read_scales(dense, schema.numeric)
        except (ValueError, TypeError, KeyError) as exc:
            raise DataError(f"{directory / 'dense_max.json'}: {exc}") from exc
        if _layout(schema.columns, values) != (offsets, size):  # else the files disagree with each other
            raise DataError(f"{directory}: vocab.json does not match the id layout in meta.json")
        return cls(role, schema.columns, offsets, size, values, scaling, scales, schema.task, classes)

    def to_json(self) -> str:
        """vocab.json: categorical column -> frequent values in id order, enough to encode new rows."""
        return json.dumps({name: values.to_pylist() for name, values in self.frequent.items()}, indent=1)

    def scales_json(self) -> str:
        """dense_max.json: what was fitted on the numeric columns (layouts in `data_prep.scaling`)."""
        return scales_json(self.scaling, self.scales)

    def encode(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """One batch -> (ids int32 [N, F], vals float32 [N, F]), vectorised per column."""
        ids = np.empty((batch.num_rows, len(self.columns)), dtype=np.int32)
        vals = np.ones((batch.num_rows, len(self.columns)), dtype=np.float32)
        for j, (name, kind) in enumerate(self.columns):
            offset = self.offsets[name]
            column = batch.column(name)
            if kind == "numeric":
                ids[:, j] = offset
                vals[:, j] = self.scales[name].apply(column.to_numpy(zero_copy_only=False))  # NaN where missing
            else:
                # Look up each distinct value of the batch once, then map every row through that table.
                found = pc.index_in(column.dictionary, value_set=self.frequent[name]).fill_null(-1).to_numpy()
                table = np.append(np.where(found >= 0, offset + 1 + found, offset), offset).astype(np.int32)
                ids[:, j] = table[dictionary_indices(column)]
        return ids, vals

    def labels(self, batch: pa.RecordBatch) -> np.ndarray:
        """One batch's labels -> float32 [N] (`data_prep.labels` for what each task stores)."""
        assert self.task is not None, "only the label party encodes labels"
        return encode_labels(batch.column(LABEL), self.task, self.classes)


def _layout(columns: tuple[tuple[str, Kind], ...], frequent: dict[str, pa.Array]) -> tuple[dict[str, int], int]:
    """Each column's first id, and the total: consecutive ranges, 1 id per numeric column, 1 + frequent per
    categorical one."""
    offsets: dict[str, int] = {}
    next_id = 0
    for name, kind in columns:
        offsets[name] = next_id
        next_id += 1 if kind == "numeric" else 1 + len(frequent[name])
    return offsets, next_id
