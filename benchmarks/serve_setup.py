"""bench-serve's set-up: a two-party job at the reference model size with 1,000,000 customers per store, written
straight in the aligned-store format (no `vfl prep` / `vfl psi` over a million rows), certificates, and one
untrained checkpoint per party (latency does not depend on the weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.train import ROLES, TEST_ROWS, VOCAB_PER_PARTY, ZIPF_A, write_job

CUSTOMERS = 1_000_000
STEP = 1  # the untrained checkpoint's step, the same at both parties


def write_store(job: Any, role: str, customers: np.ndarray, rng: np.random.Generator) -> None:
    """One party's aligned data as `vfl psi` publishes it (store arrays, customer_ids.npy, vocab.json and
    dense_max.json), in the id layout `vfl prep` gives: one id per numeric column, OOV + frequent values per
    categorical one, the frequent values sized so the vocabulary is bench-train's VOCAB_PER_PARTY."""
    from data_prep.store import PartyMeta, write_meta, write_split

    schema, leader, rows = job.table_schema(role), job.is_leader(role), len(customers)
    numeric = [name for name, kind in schema.columns if kind == "numeric"]
    frequent = (VOCAB_PER_PARTY - len(numeric)) // (len(schema.columns) - len(numeric)) - 1
    offsets, size = {}, 0
    ids = np.empty((rows, len(schema.columns)), dtype=np.int32)
    vals = np.ones((rows, len(schema.columns)), dtype=np.float32)
    for j, (name, kind) in enumerate(schema.columns):
        offsets[name] = size
        if kind == "numeric":
            ids[:, j], vals[:, j], size = size, rng.random(rows, dtype=np.float32), size + 1
        else:  # Zipf ranks, like Criteo's value counts; past the frequent ones a value is OOV (the column's first id)
            rank = rng.zipf(ZIPF_A, rows) - 1
            ids[:, j] = np.where(rank < frequent, size + 1 + rank, size)
            size += 1 + frequent
    labels = (rng.random(rows) < 0.25).astype(np.float32) if leader else None
    directory, train = job.data.dir / role, rows - TEST_ROWS
    splits = {}
    for name, part in (("train", slice(0, train)), ("test", slice(train, rows))):
        splits[name] = write_split(directory / name, ids[part], vals[part], None if labels is None else labels[part],
                                   np.arange(rows, dtype=np.int64)[part])
        np.save(directory / name / "customer_ids.npy", customers[part], allow_pickle=False)
    vocab = {name: [f"{name}:{i}" for i in range(frequent)] for name, kind in schema.columns if kind != "numeric"}
    (directory / "vocab.json").write_text(json.dumps(vocab) + "\n")
    (directory / "dense_max.json").write_text(json.dumps(dict.fromkeys(numeric, 1.0)) + "\n")
    write_meta(directory, PartyMeta(role=role, fields=schema.fields, has_labels=leader, vocab_size=size,
                                    field_offsets=offsets, threshold=job.data.threshold, splits=splits,
                                    source="benchmarks.serve synthetic", kinds=tuple(k for _, k in schema.columns),
                                    task=schema.task))


def build(work: Path) -> Path:
    """The data, certificates and checkpoints under `work`; the base job file (no serve section)."""
    import torch

    from data_prep.store import PartyData
    from vfl_cli.checkpoint import CheckpointStore, new_run_id
    from vfl_cli.job import load_job
    from vfl_cli.train.parties import build_party
    from vfl_cli.transport.tls import make_dev_certs

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = write_job(work, "base", work / "certs")
    job = load_job(base)
    print(f"bench-serve: writing {CUSTOMERS:,} customers per party to {job.data.dir}", flush=True)
    rng = np.random.default_rng(1)
    customers = np.array([f"c{i:09d}".encode() for i in rng.permutation(CUSTOMERS)], dtype="S10")
    for role in ROLES:  # aligned: row i is the same customer at both parties
        write_store(job, role, customers, rng)
    make_dev_certs(job)
    run_id = new_run_id()
    for role in ROLES:
        party = build_party(job, role, PartyData(job.data.dir / role).meta, torch.device("cpu"))
        store = CheckpointStore(job.train.run_dir / role, job.fingerprint())
        store.directory.mkdir(parents=True, exist_ok=True)
        store.begin(run_id, STEP, ())
        store.save(run_id, STEP, 0, STEP, party.state_dict())
    (work / "built.json").write_text(json.dumps({"run_id": run_id, "customers": CUSTOMERS}) + "\n")
    return base
