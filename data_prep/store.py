"""The on-disk format of one party's prepared data, its reader, and its writer (`SplitWriter`, `publish`).

    <data.dir>/<role>/meta.json              PartyMeta as JSON
    <data.dir>/<role>/<split>/ids.npy         int32   [N, F]  embedding ids, one column per field
    <data.dir>/<role>/<split>/vals.npy        float32 [N, F]  value multiplying each id's embedding
    <data.dir>/<role>/<split>/labels.npy      float32 [N]     the label party's labels, by meta.task: 0/1
                                                              (binary), the index into meta.classes
                                                              (multiclass), the value (regression)
    <data.dir>/<role>/<split>/sample_ids.npy  int64   [N]     row number in the raw input (the join key)
    <data.dir>/<role>/vocab.json              categorical field -> its frequent raw values in id order
    <data.dir>/<role>/dense_max.json          numeric field -> what was fitted to scale it: its divisor
                                              (max, log; "scaling": "log" for log, absent = max) or, for
                                              standard, {"scaling": "standard", "columns": {field: {"mean",
                                              "std"}}} (`data_prep.scaling` has the layouts)

F may be 0 (a label party with no feature columns): ids and vals are then [N, 0].

meta.json (`data_prep.meta`) says each field's kind, and for the label party its task and classes.

The two JSON files are what `vfl prep` used to encode; a later step needs them to encode new rows the
same way. The reader below does not need them.

`vfl prep table` writes one party's own table (keyed by customer id, before any alignment) as a single
unsplit block in the same array format, `<data.dir>/tables/<role>/` (or `--out`):

    table/meta.json          TableMeta as JSON (role, fields, kinds, task, classes, rows, id_column,
                             id_width, checksums, ...)
    table/ids.npy            int32   [N, F]  as above, rows in the party's file order
    table/vals.npy           float32 [N, F]
    table/labels.npy         float32 [N]     leader only (absent when scoring new rows without labels)
    table/sample_ids.npy     int64   [N]     0-based data row in the party's file (header not counted)
    table/customer_ids.npy   S<w>    [N]     the customer ids, UTF-8, NUL-padded to the longest (w bytes)
    table/vocab.json, table/dense_max.json   as above

Row i of every array is the same customer; ids are unique. `open_table` reads it (memory-mapped).

Arrays are little-endian .npy files (a fixed header, then raw data) so the trainer memory-maps them;
they are loaded with allow_pickle=False. `split` is `train` or `test`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from data_prep.errors import DataError
from data_prep.meta import FORMAT_VERSION, PartyMeta, SplitMeta, TableMeta

SPLITS = ("train", "test")
ARRAY_FILES = ("ids.npy", "vals.npy", "labels.npy", "sample_ids.npy")


@dataclass(frozen=True)
class SplitArrays:
    ids: np.ndarray  # int32 [N, F]
    vals: np.ndarray  # float32 [N, F]
    labels: np.ndarray | None  # float32 [N], leader only
    sample_ids: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return int(self.sample_ids.shape[0])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


Meta = TypeVar("Meta", "PartyMeta", "TableMeta")


def read_meta(directory: Path, parse: Callable[[str], Meta], missing: str, corrupt: str) -> Meta:
    """`<directory>/meta.json` parsed by `parse`; a missing, corrupt or other-format file is one DataError."""
    meta_path = directory / "meta.json"
    try:
        meta = parse(meta_path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{meta_path}: {missing}") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise DataError(f"{meta_path}: {corrupt} ({exc})") from exc
    if meta.format != FORMAT_VERSION:
        raise DataError(f"{meta_path}: format {meta.format}, this vfl reads {FORMAT_VERSION}")
    return meta


class PartyData:
    """One party's prepared data directory, opened read-only with memory-mapped arrays."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.meta = read_meta(
            directory, PartyMeta.from_json, "no prepared data here; run `vfl prep criteo` first (one Kaggle file) "
            "or `vfl psi` (each party's own table)", "corrupt meta.json"
        )

    def split(self, name: str) -> SplitArrays:
        if name not in self.meta.splits:
            raise DataError(f"{self.dir}: no split named {name!r} (have {', '.join(self.meta.splits)})")
        folder = self.dir / name
        expected_rows = self.meta.splits[name].rows

        def load(file: str) -> np.ndarray:
            return load_rows(folder / file, expected_rows, "prepared data")

        return SplitArrays(
            ids=load("ids.npy"),
            vals=load("vals.npy"),
            labels=load("labels.npy") if self.meta.has_labels else None,
            sample_ids=load("sample_ids.npy"),
        )

    def customer_ids(self, split: str) -> np.ndarray | None:
        """S<w> [N]: the customer id of each row, where `vfl psi` aligned the data (None for `prep criteo`'s)."""
        path = self.dir / split / "customer_ids.npy"
        return load_rows(path, self.meta.splits[split].rows, "prepared data") if path.exists() else None

    def verify(self) -> None:
        """Check every array file against the checksums in meta.json."""
        for name, split in self.meta.splits.items():
            for file, expected in split.sha256.items():
                if file_sha256(self.dir / name / file) != expected:
                    raise DataError(f"{self.dir / name / file}: checksum does not match meta.json")

    def fingerprint(self, split: str) -> dict[str, Any]:
        """What the other party must agree with: rows and the digest of the sample ids (and, for data aligned
        by `vfl psi`, the intersection's digest, equal on both sides only if they hold the same customers)."""
        meta = self.meta.splits[split]
        found: dict[str, Any] = {"rows": meta.rows, "sample_ids_digest": meta.sample_ids_digest}
        if self.meta.psi is not None:
            found["psi_digest"] = self.meta.psi["digest"]
        return found


# np.load parses the .npy header with ast.literal_eval, which CPython 3.11 before 3.11.8 cannot run on two
# threads at once ("SystemError: AST constructor recursion depth mismatch", python/cpython#106905); both
# parties of `--role local` load arrays on their own threads. Mapping is cheap, so one lock costs nothing.
_NPY_HEADER_LOCK = threading.Lock()


def load_rows(path: Path, expected_rows: int, what: str) -> np.ndarray:
    """A memory-mapped array of `expected_rows` rows (as meta.json says), never unpickled."""
    try:
        with _NPY_HEADER_LOCK:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing; the {what} is incomplete") from exc
    except ValueError as exc:
        raise DataError(f"{path}: not a readable array ({exc})") from exc
    if array.shape[0] != expected_rows:
        raise DataError(f"{path}: {array.shape[0]} rows, meta.json says {expected_rows}")
    return array


def open_party(data_dir: Path, role: str) -> PartyData:
    return PartyData(data_dir / role)


# --- one party's own table (`vfl prep table`), before alignment -------------------------------------------

TABLE_FILES = ("ids.npy", "vals.npy", "labels.npy", "sample_ids.npy", "customer_ids.npy")


class TableData:
    """One party's prepared table directory, opened read-only with memory-mapped arrays."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.meta = read_meta(directory, TableMeta.from_json, "no prepared table here; run `vfl prep table` first",
                              "corrupt or not a table's meta.json")

    def _load(self, file: str) -> np.ndarray:
        return load_rows(self.dir / file, self.meta.rows, "prepared table")

    def arrays(self) -> SplitArrays:
        return SplitArrays(
            ids=self._load("ids.npy"),
            vals=self._load("vals.npy"),
            labels=self._load("labels.npy") if self.meta.has_labels else None,
            sample_ids=self._load("sample_ids.npy"),
        )

    def customer_ids(self) -> np.ndarray:
        """S<w> [N]; `.astype(str)` or `bytes.decode()` gives the ids back."""
        return self._load("customer_ids.npy")

    def verify(self) -> None:
        """Check every array file against the checksums in meta.json."""
        for file, expected in self.meta.sha256.items():
            if file_sha256(self.dir / file) != expected:
                raise DataError(f"{self.dir / file}: checksum does not match meta.json")


def table_dir(data_dir: Path, role: str) -> Path:
    """Where `vfl prep table` writes a party's table by default: beside, not inside, the aligned data that
    `vfl psi` publishes as `<data.dir>/<role>`."""
    return data_dir / "tables" / role


def open_table(directory: Path) -> TableData:
    return TableData(directory)


# --- writing -------------------------------------------------------------------------------------------
# The writer below produces exactly the layout documented at the top of this module. Output first goes to a
# staging directory beside the target and is renamed into place only when complete, so a crash or an error
# never leaves a directory that looks like finished data.


class ArrayWriter:
    """One preallocated .npy file filled in row order; hashes the file's bytes as they are written.

    `file_hash` covers the whole file (meta.json checksums), `data_hash` the array's raw bytes only.
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        # open_memmap writes the header and sizes the file; we then write rows with pwrite rather than
        # through the mapping, because every touched page of a live mapping counts in the process's RSS,
        # which would make peak memory grow with the number of rows.
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        self.offset = int(array.offset)
        del array
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        self.dtype = np.dtype(dtype)
        self.fd = os.open(path, os.O_RDWR)
        self.file_hash = hashlib.sha256(os.pread(self.fd, self.offset, 0))
        self.data_hash = hashlib.sha256()
        self.rows = 0

    def append(self, chunk: np.ndarray) -> None:
        data = np.ascontiguousarray(chunk, dtype=self.dtype)
        view = data.reshape(-1).view(np.uint8).data  # the raw bytes, no copy
        self.file_hash.update(view)
        self.data_hash.update(view)
        position = self.offset + self.rows * self.row_bytes
        while view:  # pwrite may write less than asked for
            written = os.pwrite(self.fd, view, position)
            view, position = view[written:], position + written
        self.rows += len(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SplitWriter:
    """Writes one split's arrays (`ids`, `vals`, `labels` if any, `sample_ids`), appended chunk by chunk."""

    def __init__(self, folder: Path, rows: int, fields: int, with_labels: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.rows = rows
        self.folder = folder
        self.arrays = {
            "ids.npy": ArrayWriter(folder / "ids.npy", np.dtype("<i4"), (rows, fields)),
            "vals.npy": ArrayWriter(folder / "vals.npy", np.dtype("<f4"), (rows, fields)),
            "sample_ids.npy": ArrayWriter(folder / "sample_ids.npy", np.dtype("<i8"), (rows,)),
        }
        if with_labels:
            self.arrays["labels.npy"] = ArrayWriter(folder / "labels.npy", np.dtype("<f4"), (rows,))

    def append(self, ids: np.ndarray, vals: np.ndarray, labels: np.ndarray | None, sample_ids: np.ndarray) -> None:
        self.arrays["ids.npy"].append(ids)
        self.arrays["vals.npy"].append(vals)
        self.arrays["sample_ids.npy"].append(sample_ids)
        if "labels.npy" in self.arrays:
            assert labels is not None, "a split with labels needs labels in every chunk"
            self.arrays["labels.npy"].append(labels)

    def abort(self) -> None:
        """Close the files after a failure; the caller removes the staging directory."""
        for writer in self.arrays.values():
            writer.close()

    def close(self) -> SplitMeta:
        for writer in self.arrays.values():
            writer.close()
            if writer.rows != self.rows:
                raise DataError(f"{self.folder}: wrote {writer.rows} rows, expected {self.rows}")
        return SplitMeta(
            rows=self.rows,
            sha256={name: writer.file_hash.hexdigest() for name, writer in self.arrays.items()},
            sample_ids_digest=self.arrays["sample_ids.npy"].data_hash.hexdigest(),
        )


def write_split(
    folder: Path, ids: np.ndarray, vals: np.ndarray, labels: np.ndarray | None, sample_ids: np.ndarray
) -> SplitMeta:
    """A whole split held in memory, written in one go by the same writer prep uses (tests, benchmarks)."""
    writer = SplitWriter(folder, len(sample_ids), ids.shape[1], labels is not None)
    writer.append(ids, vals, labels, sample_ids)
    return writer.close()


def write_meta(directory: Path, meta: PartyMeta) -> None:
    (directory / "meta.json").write_text(meta.to_json() + "\n")


def remove_dirs(paths: Iterable[Path]) -> None:
    """Remove staging directories (after a failure, or what publishing left), ignoring what is gone."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def staging_dir(out: Path, role: str) -> Path:
    """A fresh `<out>/.<role>.tmp-*` directory beside the final `<out>/<role>`."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{role}.tmp-", dir=out))
    staging.chmod(0o755)  # mkdtemp makes it private; the published data is an ordinary directory
    return staging


def publish(staging: Path, target: Path) -> None:
    """Move a complete staging directory to `target`, replacing a previous output only at the last step."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        if old is not None:
            old.rename(target)  # put the previous complete output back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
