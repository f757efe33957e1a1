"""Simulate organisations from one Kaggle-format Criteo file (`vfl prep split`): the leader and one or more
followers.

Writes the leader's table (id column, label column, the leader's columns) and each follower's (id column, the
follower's columns) as TSV with a header row, the inputs `vfl prep table` reads. Column names come from each
party's schema: its id column, the leader's label column, the columns by name (Criteo's I1..I13, C1..C26).

Who is in which table: source row r (0-based line) draws u = u(seed', r), the splitmix64 uniform of
`data_prep.splits.split_uniform` under a seed derived from `seed`, and with n parties (w = (1 - overlap) / n) is
    in every table            if u < overlap
    in party i's only         if overlap + i w <= u < overlap + (i + 1) w   (the last party: u >= overlap + (n-1) w)
So `overlap` is the expected share of source rows every party holds; with two parties each table holds
(1 + overlap) / 2 of the source rows, and the shared ones are 2 overlap / (1 + overlap) of each table.
Each table comes in its own
order, a seeded random permutation (different per party).

Customer id of row r: "c" + 12 hex digits of a 4-round Feistel permutation of the 48-bit row number keyed by
`seed`: unique for every row (a permutation cannot collide), stable for a given seed, and without the key
the order of ids says nothing about the order of rows.

Values are written as the source has them: numeric integers as integers (`260`), strings as they were, a
missing value as an empty cell. Memory: this is a simulation tool and holds the selected columns of the
whole input in memory (Arrow, about the size of the raw text's used columns; fine for a few million rows,
not for the 45M-row Kaggle file), plus one output chunk at a time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from data_prep.errors import DataError
from data_prep.reader import BLOCK_SIZE, LABEL, BatchReader, ProgressFn
from data_prep.schema import PartySchema
from data_prep.splits import split_uniform

WRITE_CHUNK = 100_000  # rows per output chunk
_MEMBERSHIP_SALT = 0x5EED_0F_0B1A5  # derives the membership seed from `seed`, apart from the test split's
_MASK24 = np.uint64(0xFFFFFF)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def customer_ids(seed: int, rows: np.ndarray) -> np.ndarray:
    """ "c" + 12 hex digits of a keyed permutation of each row number (< 2**48): unique, stable, opaque."""
    keys = _mix(np.array([(seed * 0x9E3779B97F4A7C15 + k) % 2**64 for k in range(1, 5)], dtype=np.uint64))
    left = (rows.astype(np.uint64) >> np.uint64(24)) & _MASK24
    right = rows.astype(np.uint64) & _MASK24
    with np.errstate(over="ignore"):
        for key in keys:  # Feistel rounds on 24-bit halves: a bijection of [0, 2**48) whatever the round function
            left, right = right, left ^ (_mix(right ^ key) & _MASK24)
    value = (left << np.uint64(24)) | right
    return np.array([f"c{v:012x}" for v in value.tolist()])


def membership(seed: int, rows: int, overlap: float, parties: int = 2) -> list[np.ndarray]:
    """Per party (in order), whether each source row is in its table, as the module docstring defines."""
    u = split_uniform(seed ^ _MEMBERSHIP_SALT, np.arange(rows, dtype=np.int64))
    every = u < overlap
    width = (1 - overlap) / parties
    only = [(u >= overlap + i * width) & (u < overlap + (i + 1) * width) for i in range(parties - 1)]
    only.append(~(every | np.logical_or.reduce(only)) if only else ~every)
    return [every | mine for mine in only]


@dataclass(frozen=True)
class SplitResult:
    source_rows: int
    shared: int
    tables: dict[str, tuple[Path, int]]  # role -> (file, rows)


def split_parties(
    path: Path,
    schemas: Sequence[PartySchema],
    overlap: float,
    seed: int,
    out: Path,
    on_progress: ProgressFn | None = None,
    block_size: int = BLOCK_SIZE,
) -> SplitResult:
    """Write `<out>/<role>.tsv` per party from the Kaggle-format file at `path`, the columns of each party's
    schema (the leader's first in `schemas`, one with the label)."""
    if not 0.0 <= overlap <= 1.0:
        raise DataError(f"--overlap must be between 0 and 1, got {overlap}")
    by_role = {schema.role: schema for schema in schemas}
    if len(by_role) != len(schemas) or len(schemas) < 2 or sum(s.label is not None for s in schemas) != 1:
        raise ValueError("split_parties needs the leader's schema and at least one follower's")
    columns = {name: kind for schema in schemas for name, kind in schema.columns}  # each raw column read once
    reader = BatchReader(path, list(columns.items()), True, on_progress, block_size)
    pieces = []
    for _, batch in reader.batches("read"):
        decoded = [c.dictionary_decode() if isinstance(c, pa.DictionaryArray) else c for c in batch.columns]
        pieces.append(pa.RecordBatch.from_arrays(decoded, names=batch.schema.names))
    if not pieces or sum(p.num_rows for p in pieces) == 0:
        raise DataError(f"{path}: empty input, no rows")
    source = pa.Table.from_batches(pieces).combine_chunks()
    rows = source.num_rows
    members = membership(seed, rows, overlap, len(schemas))
    rng = np.random.default_rng([seed % 2**32, 8])
    try:
        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, tuple[Path, int]] = {}
        for role, member in zip(by_role, members, strict=True):
            order = rng.permutation(np.flatnonzero(member))
            target = out / f"{role}.tsv"
            _write_table(source, by_role[role], order, seed, target)
            written[role] = (target, len(order))
            if on_progress is not None:
                on_progress(f"write {role}", len(order), len(order))
    except OSError as exc:
        raise DataError(f"{out}: cannot write the tables: {exc.strerror or exc}") from exc
    return SplitResult(source_rows=rows, shared=int(np.logical_and.reduce(members).sum()), tables=written)


def _write_table(source: pa.Table, party: PartySchema, order: np.ndarray, seed: int, target: Path) -> None:
    """One party's TSV, rows in `order`, written to a temporary name and renamed when complete."""
    label = [party.label.column] if party.label is not None else []
    names = [party.id_column, *label, *party.fields]
    columns = ([LABEL] if label else []) + list(party.fields)
    # Arrow writes a float64 260.0 as "260" and 1.5 as "1.5": integers stay integers, as in the source.
    schema = pa.schema(
        [pa.field(party.id_column, pa.string())]
        + [pa.field(name, source.schema.field(column).type) for name, column in zip(names[1:], columns, strict=True)]
    )
    partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    options = pa_csv.WriteOptions(delimiter="\t", quoting_style="needed")
    try:
        with pa_csv.CSVWriter(str(partial), schema, write_options=options) as writer:
            for start in range(0, len(order), WRITE_CHUNK):
                rows = order[start : start + WRITE_CHUNK]
                chunk = source.select(columns).take(pa.array(rows))
                arrays = [pa.array(customer_ids(seed, rows))] + [chunk.column(c).combine_chunks() for c in columns]
                writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
