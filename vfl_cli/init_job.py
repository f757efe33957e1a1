"""`vfl init`'s decisions: the leader's file and one or more followers' -> what their new job says (`Draft`).

It owns reading a file's header and first rows (CSV or TSV, plain or gzip, the delimiter found from the header
line as `vfl prep table` finds it; Parquet through pyarrow), inferring each column's kind and the task from them
(with the comments that say why, where it was a guess), the size-dependent settings (`training_defaults`: the one
place to tune them), each follower's key (`follower_keys`: `follower` alone, else follower1, follower2, ... or
the NAME of `--follower NAME=FILE`) and a free local port per party. `vfl_cli.commands.init` writes the draft as
the job's YAML text.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.schema import Kind, Task
from vfl_cli.errors import DataError, JobError

SAMPLE_ROWS = 20_000  # rows read to infer the kinds and the task
COUNT_BYTES = 50 * 2**20  # a file under this size has its rows counted; a larger one's are estimated
FEW_CODES = 10  # an integer column with at most this many values gets the "integer codes" comment
MAX_CLASSES = 10  # an integer label with at most this many values is multiclass
SMALL_TABLE = 100_000  # under this many rows every categorical value seen twice gets its own id
NAME_NOISE = {"guest", "host", "hetero", "homo", "leader", "follower", "party", "train", "data"}  # dropped from names
JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # as vfl_cli.job.JobSpec.name and a party's key
LEADER = "leader"  # the label party's key and name in the job
RESERVED_KEYS = ("top", "central", "local", "tables", "leader-only")  # as vfl_cli.job.JobSpec._parties refuses


@dataclass(frozen=True)
class TableSample:
    """A party's file as far as `vfl init` reads it: the header and the first rows (text cells, "" = missing)."""

    path: Path
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    total_rows: int  # counted, or when not `counted` estimated from the sample's bytes per row and the file size
    counted: bool

    def values(self, name: str) -> list[str]:
        index = self.header.index(name)
        return [row[index] for row in self.rows]

    def partial(self) -> str:
        """The comment that says how much of the file the kinds come from; '' when from all of it."""
        if len(self.rows) >= self.total_rows:
            return ""
        total = f"{self.total_rows:,}" if self.counted else f"about {self.total_rows:,} (estimated)"
        return f"kinds inferred from the first {len(self.rows):,} of {total} rows"


def read_sample(path: Path, limit: int = SAMPLE_ROWS) -> TableSample:
    """The header and first `limit` rows of a CSV/TSV (plain or .gz) or Parquet file; DataError if unusable."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    sample = _read_parquet(path, limit) if path.suffix.lower() == ".parquet" else _read_text(path, limit)
    repeated = sorted({name for name in sample.header if sample.header.count(name) > 1})
    if repeated:
        raise DataError(f"{path}: column {repeated[0]!r} appears twice in the header")
    if not sample.rows:
        raise DataError(f"{path}: empty file, no rows after the header")
    return sample


def _read_text(path: Path, limit: int) -> TableSample:
    rows: list[tuple[str, ...]] = []
    try:
        with path.open("rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            text = io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if gz else raw, encoding="utf-8-sig",
                                    errors="replace", newline="")
            line = text.readline()
            if not line.strip():
                raise DataError(f"{path}: empty file, no header row")
            delimiter = "\t" if "\t" in line else ","
            header = tuple(next(csv.reader([line.rstrip("\r\n")], delimiter=delimiter)))
            for number, row in enumerate(csv.reader(text, delimiter=delimiter), start=2):
                if not row or row == [""]:
                    continue  # a blank line
                if len(row) != len(header):
                    raise DataError(f"{path} line {number}: {len(row)} cells, the header has {len(header)}")
                rows.append(tuple(row))
                if len(rows) == limit:
                    break
            consumed = raw.tell()  # bytes of the file behind the sample, give or take a read buffer
            complete = len(rows) < limit or not text.read(1 << 16).strip()
    except (OSError, EOFError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from exc
    size = path.stat().st_size
    if complete:
        return TableSample(path, header, tuple(rows), len(rows), True)
    if size < COUNT_BYTES:
        with gzip.open(path, "rb") if gz else path.open("rb") as handle:
            return TableSample(path, header, tuple(rows), sum(1 for line in handle if line.strip()) - 1, True)
    estimate = max(len(rows) + 1, round(len(rows) * size / max(consumed, 1)))  # compressed bytes for .gz
    return TableSample(path, header, tuple(rows), estimate, False)


def _read_parquet(path: Path, limit: int) -> TableSample:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        batch = next(parquet.iter_batches(batch_size=limit), None)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read it as Parquet ({exc})") from exc
    columns = [[_cell(v) for v in column.to_pylist()] for column in batch.columns] if batch is not None else []
    rows = tuple(zip(*columns, strict=True)) if columns else ()
    return TableSample(path, tuple(parquet.schema_arrow.names), rows, parquet.metadata.num_rows, True)


def _cell(value: object) -> str:
    """A Parquet value as the text a CSV export would hold: null and NaN empty, floats exact."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _listing(values: Sequence[str], most: int = 5) -> str:
    return ", ".join(values[:most]) + (", ..." if len(values) > most else "")


def infer_kind(values: Sequence[str]) -> tuple[Kind, str]:
    """numeric when every non-empty value is a finite number, else categorical; and a comment where not obvious."""
    present = [v for v in values if v != ""]
    if not present:
        return "categorical", f"empty in all {len(values):,} rows read: kind unknown; write numeric if it holds numbers"
    numbers = [_number(v) for v in present]
    codes = {n for n in numbers if n is not None}
    empty = f"{1 - len(present) / len(values):.0%} empty" if len(present) < len(values) else ""
    also = f"; {empty}" if empty else ""
    if len(set(present)) == 1:
        kind: Kind = "numeric" if codes else "categorical"
        return kind, f"one value ({present[0][:20]!r}) in all rows read: it tells nothing apart{also}"
    if None not in numbers:
        if len(codes) <= FEW_CODES and all(n.is_integer() for n in codes):
            return "numeric", f"integer codes, {len(codes)} values: numeric; write categorical if the codes are not " \
                              f"ordered{also}"
        return "numeric", empty
    words = [v for v, n in zip(present, numbers, strict=True) if n is None]
    if len(words) < len(present):
        return "categorical", f"{words[0][:20]!r} is not a number ({len(words):,} of {len(present):,} values)"
    if len(set(present)) == len(present) > 50:
        return "categorical", f"every value read differs (an id or free text?): consider leaving it out{also}"
    return "categorical", empty


def infer_task(values: Sequence[str]) -> tuple[Task, str]:
    """The task from the label's values, and why: {0, 1} binary; strings or <= 10 integers multiclass; regression."""
    present = [v for v in values if v != ""]
    numbers = {_number(v) for v in present}
    if None in numbers:
        classes = sorted(set(present))
        return "multiclass", f"{len(classes)} values, not all numbers ({_listing(classes)}): multiclass"
    distinct = sorted(n for n in numbers if n is not None)
    shown = [str(int(n)) if n.is_integer() else f"{n:g}" for n in distinct]
    if set(distinct) <= {0.0, 1.0}:
        return "binary", ("2 values: 0, 1" if len(distinct) == 2
                          else f"only the value {shown[0]} in the rows read: binary assumed; check the label")
    if not all(n.is_integer() for n in distinct):
        return "regression", f"{len(distinct):,} distinct numbers from {shown[0]} to {shown[-1]}: regression"
    values_are = f"{len(distinct)} integer values " + (", ".join(shown) if len(distinct) <= 5
                                                        else f"{shown[0]}..{shown[-1]}")
    if len(distinct) > MAX_CLASSES:
        return "regression", f"{values_are}: regression; use --task multiclass for classes"
    return "multiclass", f"{values_are}: multiclass" + ("; binary needs 0/1 labels" if len(distinct) == 2 else "")


def check_task(task: Task, values: Sequence[str], where: str) -> None:
    """Refuse a --task that the label's values rule out: binary with values other than 0/1, regression on words."""
    present = sorted({v for v in values if v != ""})
    if task == "binary" and any(_number(v) not in (0.0, 1.0) for v in present):
        others = [v for v in present if _number(v) not in (0.0, 1.0)]
        raise JobError(f"--task binary: {where} holds values other than 0 and 1 ({_listing(others, 3)}); "
                       "use --task multiclass or regression")
    if task == "regression" and any(_number(v) is None for v in present):
        word = next(v for v in present if _number(v) is None)
        raise JobError(f"--task regression: {where} holds {word!r}, not a number; use --task multiclass")


def vocab_threshold(rows: int) -> tuple[int, str]:
    """data.threshold for a table of `rows` rows, and why."""
    if rows < SMALL_TABLE:
        return 1, f"{rows:,} rows (< {SMALL_TABLE:,}): every categorical value seen twice gets its own id"
    return 10, f"{rows:,} rows (>= {SMALL_TABLE:,}): values seen 10 times or fewer share their column's OOV id"


def training_defaults(rows: int, columns: int) -> dict[str, Any]:
    """The model and train sections for `rows` rows and `columns` feature columns (both parties): tune them here.

    ~30k rows: emb 8, MLP 64-32, cut 16, head 32, batch 256, 30 epochs (patience 5), Adam 1e-3. Smaller tables
    take smaller batches and networks and more epochs; larger ones larger batches, wider layers, fewer epochs.
    """
    if rows < 5_000:
        batch, epochs, patience, layers, cut, top = (32 if rows < 1_000 else 64), 60, 10, [32, 16], 8, [16]
    elif rows < 200_000:
        batch, epochs, patience, layers, cut, top = (128 if rows < 20_000 else 256), 30, 5, [64, 32], 16, [32]
    elif rows < 1_000_000:
        batch, epochs, patience, layers, cut, top = 1024, 15, 3, [128, 64], 16, [32]
    else:
        batch, epochs, patience, layers, cut, top = (2048 if rows < 10_000_000 else 4096), 8, 2, [256, 128], 32, [64]
    if columns > 100:  # wide tables: a wider first layer
        layers = [2 * layers[0], *layers[1:]]
    steps = math.ceil(max(1, round(rows * 0.8 * 0.9)) / batch)  # per epoch: less the test, then the validation share
    return {
        "model": {"bottom": "mlp", "top": "concat", "emb_dim": 8, "deep_layers": layers, "cut_dim": cut,
                  "top_layers": top},
        "train": {"epochs": epochs, "batch_size": batch, "log_every": max(1, steps // 4),  # ~4 lines an epoch
                  "deep_optimizer": {"lr": 1e-3, "eps": 1e-8}, "early_stopping": {"patience": patience}},
    }


def free_ports(count: int = 2) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 now (bound all at once, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def job_name(leader: Path) -> str:
    """A job name from the leader file's name, role words dropped: default_credit_hetero_guest.csv -> default_credit."""
    words = re.split(r"([_.-])", re.sub(r"(\.(csv|tsv|txt|gz|parquet))+$", "", leader.name, flags=re.IGNORECASE))
    while len(words) > 2 and words[-1].lower() in NAME_NOISE:
        words = words[:-2]
    return re.sub(r"[^A-Za-z0-9._-]", "_", "".join(words)).lstrip("._-") or "job"


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind
    note: str = ""  # the trailing comment, where the kind was not obvious


@dataclass(frozen=True)
class Party:
    key: str  # its key in the job's `parties:`, also its name (the certificate's CN)
    sample: TableSample
    columns: tuple[Column, ...]
    notes: tuple[str, ...]  # comment lines above its columns


@dataclass(frozen=True)
class Draft:
    """Everything the job says, decided."""

    name: str
    id_column: str
    label_column: str
    task: Task
    task_note: str
    leader: Party
    followers: tuple[Party, ...]  # one or more, in the order given
    ports: tuple[int, ...]  # the leader's, then each follower's

    @property
    def follower(self) -> Party:
        """The first follower (the only one of a two-party job)."""
        return self.followers[0]

    @property
    def parties(self) -> tuple[Party, ...]:
        return (self.leader, *self.followers)

    @property
    def two_party(self) -> bool:
        """A leader and one follower keyed `follower`: the job `--role leader | follower` runs."""
        return [p.key for p in self.followers] == ["follower"]

    @property
    def rows(self) -> int:
        """The most common customers there can be: the smallest file's rows."""
        return min(party.sample.total_rows for party in self.parties)


def _abbreviated(header: Sequence[str], most: int = 8) -> str:
    names = [name if name.isprintable() else repr(name) for name in header[:most]]  # one line, whatever the names
    return ", ".join(names) + (f", ... ({len(header)} columns)" if len(header) > most else "")


def _require(sample: TableSample, column: str, what: str) -> None:
    if column not in sample.header:
        raise DataError(f"{sample.path}: no {what} column {column!r} in the header, which has "
                        f"{_abbreviated(sample.header)}")


def _party(key: str, sample: TableSample, skip: tuple[str, str], label_note: str = "") -> Party:
    notes = [note for note in (sample.partial(), label_note) if note]
    columns = []
    for position, name in enumerate(sample.header, start=1):
        if name == "":
            notes.append(f"column {position} has no name (a written index?): left out")
        elif name not in skip:
            columns.append(Column(name, *infer_kind(sample.values(name))))
    return Party(key, sample, tuple(columns), tuple(notes))


FollowerFile = Path | tuple[str, Path]  # an unnamed follower's file, or (NAME, FILE) from NAME=FILE


def follower_arg(value: str) -> FollowerFile:
    """A `--follower` value: NAME=FILE when it holds '=' and the part before the first '=' is a valid name
    (letters, digits, '.', '_', '-', starting with a letter or digit), else a FILE (write ./a=b.csv for a file
    named a=b.csv)."""
    name, equals, path = value.partition("=")
    if not (equals and JOB_NAME.fullmatch(name)):
        return Path(value)
    if not path:
        raise JobError(f"--follower {value}: name the file after the '=', e.g. {name}=data/{name}.csv")
    return name, Path(path)


def follower_keys(followers: Sequence[FollowerFile]) -> list[tuple[str, Path]]:
    """Each follower's key and file: a named one's NAME; one unnamed `follower`, several follower1, follower2, ...
    JobError for no follower, a name used twice, `leader` or a reserved key."""
    if not followers:
        raise JobError("--follower: give at least one follower's file")
    unnamed = sum(isinstance(f, Path) for f in followers)
    numbers = iter(range(1, unnamed + 1))
    keyed = [f if isinstance(f, tuple) else ("follower" if unnamed == 1 else f"follower{next(numbers)}", f)
             for f in followers]
    seen: set[str] = set()
    for key, path in keyed:
        if key == LEADER or key in RESERVED_KEYS:
            raise JobError(f"--follower {key}={path}: {key!r} is reserved (leader, {', '.join(RESERVED_KEYS)}); "
                           "name the follower otherwise")
        if key in seen:
            raise JobError(f"--follower: two followers are named {key!r} (unnamed ones are follower, or "
                           "follower1, follower2, ... when there are several); give each a NAME= of its own")
        seen.add(key)
    return keyed


def plan_job(leader: Path, followers: Path | Sequence[FollowerFile], id_column: str, label_column: str,
             task: Task | None = None, name: str | None = None) -> Draft:
    """Read every file and decide everything the job says; one JobError or DataError at the first problem.

    `followers`: one file, or a list of them, each a Path (unnamed) or (NAME, Path), keyed as `follower_keys`
    says."""
    if id_column == label_column:
        raise JobError(f"--id and --label both name {id_column!r}; the label must be a column of its own")
    if name is not None and not JOB_NAME.fullmatch(name):
        raise JobError(f"--name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit")
    keyed = follower_keys([followers] if isinstance(followers, Path) else followers)
    lead = read_sample(leader)
    _require(lead, id_column, "id")
    _require(lead, label_column, "label")
    samples = []
    for key, path in keyed:
        sample = read_sample(path)
        _require(sample, id_column, "id")
        samples.append((key, sample))
    labels = lead.values(label_column)
    if all(v == "" for v in labels):
        raise DataError(f"{leader}: the label column {label_column!r} is empty in the first {len(labels):,} rows")
    if task is None:
        task, task_note = infer_task(labels)
    else:
        check_task(task, labels, f"the label column {label_column!r} of {leader}")
        task_note = "given with --task"
    parties = []
    for key, sample in samples:
        clash = (f"the {key}'s file has a column named {label_column!r} like the leader's label: left out"
                 if label_column in sample.header else "")
        party = _party(key, sample, (id_column, label_column), clash)
        if not party.columns:
            raise DataError(f"{sample.path}: no feature columns besides the id column; its header has "
                            f"{_abbreviated(sample.header)}")
        parties.append(party)
    return Draft(name or job_name(leader), id_column, label_column, task, task_note,
                 _party(LEADER, lead, (id_column, label_column)), tuple(parties), tuple(free_ports(1 + len(parties))))
