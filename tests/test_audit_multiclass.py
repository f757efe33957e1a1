"""`vfl audit` by task: a multiclass job's gradients give its classes away to the clustering attack, measured in the
real loop (every party in this process; each follower on its own gradients) and printed against the majority
share; a regression job, and a sweep of a job that is not binary, are refused before any training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_prep.store import PartyMeta, write_meta, write_split
from tests.conftest import FOLLOWER_FIELDS, LEADER_FIELDS, VALUES_PER_FIELD, job_dict, run_vfl, write_job
from tests.three_parties import FIELDS, SIGNAL, three_party_job
from vfl_cli.audit import CLUSTERING, audit_run
from vfl_cli.job import parse_job

CLASSES = ("red", "green", "blue")


TWO_PARTIES = {"leader": list(LEADER_FIELDS), "follower": list(FOLLOWER_FIELDS)}
TWO_SIGNALS = {"leader": 8, "follower": 7}


def write_multiclass_data(data_dir: Path, rows: int = 1200, seed: int = 0, parties: dict[str, list[str]] | None = None,
                          signals: dict[str, int] | None = None) -> None:
    """Prepared arrays for every party (default: the two-party job's) whose class is planted in one field of each
    party (`signals`: party -> column; each value of it favours one class), class 0 the largest."""
    parties, signals = parties or TWO_PARTIES, signals or TWO_SIGNALS
    rng = np.random.default_rng(seed)
    local = {key: rng.integers(0, VALUES_PER_FIELD, size=(rows, len(fields))) for key, fields in parties.items()}
    favoured = sum(np.eye(3)[local[key][:, column] % 3] for key, column in signals.items())  # (N, 3)
    logits = 2.0 * favoured + np.array([0.5, 0.0, 0.0])
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in p], dtype=np.float32)
    test = np.zeros(rows, dtype=bool)
    test[rng.choice(rows, size=rows // 5, replace=False)] = True
    for key, fields in parties.items():
        ids = (local[key] + np.arange(len(fields)) * VALUES_PER_FIELD).astype(np.int32)
        vals = np.ones_like(ids, dtype=np.float32)
        leader = key == "leader"
        splits = {name: write_split(data_dir / key / name, ids[mask], vals[mask], labels[mask] if leader else None,
                                    np.flatnonzero(mask).astype(np.int64))
                  for name, mask in (("train", ~test), ("test", test))}
        meta = PartyMeta(role=key, fields=tuple(fields), has_labels=leader, vocab_size=len(fields) * VALUES_PER_FIELD,
                         field_offsets={f: i * VALUES_PER_FIELD for i, f in enumerate(fields)}, threshold=1,
                         source="synthetic", splits=splits, task="multiclass" if leader else None,
                         classes=CLASSES if leader else ())
        write_meta(data_dir / key, meta)


def multiclass_spec(tmp_path: Path, **train: Any) -> dict[str, Any]:
    spec = job_dict(tmp_path, **train)
    spec["parties"]["leader"]["task"] = "multiclass"
    write_multiclass_data(Path(spec["data"]["dir"]))
    return spec


def test_the_clustering_attack_reads_the_classes_of_a_multiclass_run(tmp_path: Path) -> None:
    job = parse_job(multiclass_spec(tmp_path))
    result = audit_run(job, tmp_path / "audit")
    assert (result.task, result.metric, [e.epoch for e in result.epochs]) == ("multiclass", "accuracy", [0, 1])
    recorded = np.load(tmp_path / "audit" / "epoch-0.npz")
    assert sorted(np.unique(recorded["labels"])) == [0.0, 1.0, 2.0] and sorted(recorded["rows"]) == list(range(960))
    for e in result.epochs:
        assert set(e.leaks) == {CLUSTERING}
        assert e.majority == pytest.approx(np.bincount(recorded["labels"].astype(int)).max() / 960)
        assert e.leaks[CLUSTERING] > e.majority + 0.3 and e.leaks[CLUSTERING] > e.floor + 0.3
    records = (tmp_path / "audit" / "run" / "leader" / "metrics.jsonl").read_text().splitlines()
    final = json.loads(records[-1])
    assert final["metric"] == "accuracy" and final["test_accuracy"] == result.test_score  # no validation: last epoch
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert (report["task"], report["metric"], report["test_accuracy"]) == ("multiclass", "accuracy", result.test_score)
    assert report["strongest"]["inference_accuracy"] == result.strongest[1]
    assert report["epochs"][1]["majority_share"] == result.epochs[1].majority
    assert report["epochs"][1]["scored_accuracy"] == result.epochs[1].scored


def test_audit_cli_prints_the_inference_accuracy_against_the_majority_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = multiclass_spec(tmp_path, epochs=1)
    code, err = run_vfl(monkeypatch, capsys, "audit", "--job", write_job(tmp_path, spec), "--out", tmp_path / "a")
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    accuracy, majority = report["strongest"]["inference_accuracy"], report["epochs"][0]["majority_share"]
    assert f"label leakage per epoch, test accuracy {report['test_accuracy']:.4f}" in err
    assert "inference accuracy" in err and "majority share" in err and "leak AUC" not in err
    assert (f"label inference ({CLUSTERING}): accuracy {accuracy:.3f} at epoch 0, {accuracy - majority:+.3f} above "
            f"the majority share {majority:.3f}") in err


def test_each_follower_of_a_multiclass_job_is_clustered_on_its_own_gradients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = three_party_job(tmp_path, epochs=1)
    spec["parties"]["leader"]["task"] = "multiclass"
    write_multiclass_data(Path(spec["data"]["dir"]), parties=FIELDS, signals=SIGNAL)
    code, err = run_vfl(monkeypatch, capsys, "audit", "--job", write_job(tmp_path, spec), "--out", tmp_path / "a")
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert report["epochs"] == report["followers"]["follower1"]["epochs"]  # the top level: the first follower's
    for key in ("follower1", "follower2"):
        got = report["followers"][key]
        accuracy, majority = got["strongest"]["inference_accuracy"], got["epochs"][0]["majority_share"]
        floor = got["epochs"][0]["shuffled_floor"]
        assert accuracy > majority + 0.3 and accuracy > floor + 0.3, key  # measured 1.000 each (0.438, 0.414)
        recorded = np.load(tmp_path / "a" / key / "epoch-0.npz")
        assert majority == pytest.approx(np.bincount(recorded["labels"].astype(int)).max() / 960)
        assert f"follower {key}'s label leakage per epoch, test accuracy {report['test_accuracy']:.4f}" in err
        assert (f"label inference (follower {key}, {CLUSTERING}): accuracy {accuracy:.3f} at epoch 0, "
                f"{accuracy - majority:+.3f} above the majority share {majority:.3f}") in err


@pytest.mark.parametrize(("task", "args", "message"), [
    ("regression", (), "label-inference attacks are measured for binary and multiclass tasks only; this job's task "
                       "is regression"),
    ("multiclass", ("--sweep",), "the defences sweep is for binary jobs"),
])
def test_audit_refuses_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str], task: str, args: tuple[str, ...],
                                       message: str) -> None:
    spec = job_dict(tmp_path)  # no prepared data: the refusal comes before any is read
    spec["parties"]["leader"]["task"] = task
    code, err = run_vfl(monkeypatch, capsys, "audit", "--job", write_job(tmp_path, spec), "--out", tmp_path / "a",
                        *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "run").exists()
