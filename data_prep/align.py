"""A party's rows of the PSI intersection, in the agreed order, as the prepared data that training reads.

    <data.dir>/<role>/{train,test}/   the store format (see store.py), plus customer_ids.npy per split
                                      (one split `all` instead, for new customers to score)
    <data.dir>/<role>/meta.json       PartyMeta with `psi`: {"size", "digest", "my_size", "peer_sizes", "pairwise"}, and
                                      the table's kinds, task and classes
    <data.dir>/<role>/vocab.json, dense_max.json   copied from the table (what encoded it)

Both parties hold their rows in one agreed order (by customer id), so position p means the same customer on both
sides: `sample_ids` are those positions, and the train/test split is decided from them and the job seed
(`in_test_split`, as `vfl prep criteo` decides it from line numbers), identically on both sides without a
message. The output is staged and renamed into place whole, like every prep output.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.splits import in_test_split
from data_prep.store import PartyMeta, SplitMeta, SplitWriter, TableData, publish, staging_dir, write_meta

CHUNK_ROWS = 65_536  # rows gathered from the memory-mapped table at a time


def write_aligned(
    table: TableData,
    rows: np.ndarray,
    data_dir: Path,
    seed: int,
    test_fraction: float | None,
    psi: dict[str, Any],
) -> PartyMeta:
    """Write `table`'s rows `rows` (int64 indices, in the agreed order) to `<data_dir>/<role>`: a train and a
    test split, or with `test_fraction` None one split `all` (new customers to score)."""
    meta, arrays, customer_ids = table.meta, table.arrays(), table.customer_ids()
    positions = np.arange(len(rows), dtype=np.int64)
    if test_fraction is None:
        parts = [("all", np.ones(len(rows), dtype=bool))]
    else:
        in_test = in_test_split(seed, 0, len(rows), test_fraction)
        parts = [("train", ~in_test), ("test", in_test)]
    staging = staging_dir(data_dir, meta.role)
    try:
        splits: dict[str, SplitMeta] = {}
        for name, mask in parts:
            picked, where = rows[mask], positions[mask]
            writer = SplitWriter(staging / name, len(picked), len(meta.fields), meta.has_labels)
            for start in range(0, len(picked), CHUNK_ROWS):
                chunk = picked[start : start + CHUNK_ROWS]
                labels = None if arrays.labels is None else np.asarray(arrays.labels[chunk])
                writer.append(np.asarray(arrays.ids[chunk]), np.asarray(arrays.vals[chunk]), labels,
                              where[start : start + CHUNK_ROWS])
            splits[name] = writer.close()
            np.save(staging / name / "customer_ids.npy", np.asarray(customer_ids[picked]), allow_pickle=False)
        for file in ("vocab.json", "dense_max.json"):
            shutil.copyfile(table.dir / file, staging / file)
        aligned = PartyMeta(
            role=meta.role, fields=meta.fields, has_labels=meta.has_labels, vocab_size=meta.vocab_size,
            field_offsets=meta.field_offsets, threshold=meta.threshold, source=meta.source, splits=splits, psi=psi,
            kinds=meta.kinds, task=meta.task, classes=meta.classes,
        )
        write_meta(staging, aligned)
        publish(staging, data_dir / meta.role)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return aligned
