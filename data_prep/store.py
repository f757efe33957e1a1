"""The on-disk format of one party's prepared data, and its reader.

    <data.dir>/<role>/meta.json              PartyMeta as JSON
    <data.dir>/<role>/<split>/ids.npy         int32   [N, F]  embedding ids, one column per field
    <data.dir>/<role>/<split>/vals.npy        float32 [N, F]  value multiplying each id's embedding
    <data.dir>/<role>/<split>/labels.npy      float32 [N]     0/1 click labels, leader only
    <data.dir>/<role>/<split>/sample_ids.npy  int64   [N]     row number in the raw input (the join key)

Arrays are little-endian .npy files (a fixed header, then raw data) so the trainer memory-maps them;
they are loaded with allow_pickle=False. `split` is `train` or `test`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vfl_cli.errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "test")
ARRAY_FILES = ("ids.npy", "vals.npy", "labels.npy", "sample_ids.npy")


@dataclass(frozen=True)
class SplitMeta:
    rows: int
    sha256: dict[str, str]  # file name -> hex digest of the file's bytes
    sample_ids_digest: str  # sha256 of the sample_ids array's raw bytes: the data fingerprint


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

    def to_json(self) -> str:
        body: dict[str, Any] = {
            "format": self.format,
            "role": self.role,
            "fields": list(self.fields),
            "has_labels": self.has_labels,
            "vocab_size": self.vocab_size,
            "field_offsets": self.field_offsets,
            "threshold": self.threshold,
            "source": self.source,
            "splits": {name: vars(split) for name, split in self.splits.items()},
        }
        return json.dumps(body, indent=2)

    @classmethod
    def from_json(cls, text: str) -> PartyMeta:
        raw = json.loads(text)
        splits = {name: SplitMeta(**split) for name, split in raw.pop("splits").items()}
        raw["fields"] = tuple(raw["fields"])
        return cls(splits=splits, **raw)


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


class PartyData:
    """One party's prepared data directory, opened read-only with memory-mapped arrays."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        meta_path = directory / "meta.json"
        try:
            self.meta = PartyMeta.from_json(meta_path.read_text())
        except FileNotFoundError as exc:
            raise DataError(f"{meta_path}: no prepared data here; run `vfl prep criteo` first") from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise DataError(f"{meta_path}: corrupt meta.json ({exc})") from exc
        if self.meta.format != FORMAT_VERSION:
            raise DataError(f"{meta_path}: format {self.meta.format}, this vfl reads {FORMAT_VERSION}")

    def split(self, name: str) -> SplitArrays:
        if name not in self.meta.splits:
            raise DataError(f"{self.dir}: no split named {name!r} (have {', '.join(self.meta.splits)})")
        folder = self.dir / name
        expected_rows = self.meta.splits[name].rows

        def load(file: str) -> np.ndarray:
            path = folder / file
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError as exc:
                raise DataError(f"{path}: missing; the prepared data is incomplete") from exc
            except ValueError as exc:
                raise DataError(f"{path}: not a readable array ({exc})") from exc
            if array.shape[0] != expected_rows:
                raise DataError(f"{path}: {array.shape[0]} rows, meta.json says {expected_rows}")
            return array

        return SplitArrays(
            ids=load("ids.npy"),
            vals=load("vals.npy"),
            labels=load("labels.npy") if self.meta.has_labels else None,
            sample_ids=load("sample_ids.npy"),
        )

    def verify(self) -> None:
        """Check every array file against the checksums in meta.json."""
        for name, split in self.meta.splits.items():
            for file, expected in split.sha256.items():
                if file_sha256(self.dir / name / file) != expected:
                    raise DataError(f"{self.dir / name / file}: checksum does not match meta.json")

    def fingerprint(self, split: str) -> dict[str, Any]:
        """What the other party must agree with: rows and the digest of the sample ids."""
        meta = self.meta.splits[split]
        return {"rows": meta.rows, "sample_ids_digest": meta.sample_ids_digest}


def open_party(data_dir: Path, role: str) -> PartyData:
    return PartyData(data_dir / role)
