"""Validation and model selection: a validation split carved from the training rows, the best validation epoch
kept and used by eval and infer, early stopping, the test split scored once at the end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import job_dict, write_planted_data
from vfl_cli.checkpoint import CheckpointStore
from vfl_cli.errors import JobError, ProtocolError
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.party import PartyContext
from vfl_cli.protocol import check_selection
from vfl_cli.train.batches import carve_valid
from vfl_cli.train.session import eval_session, run_local, train_session


def test_carve_is_disjoint_sorted_and_fixed_by_the_seed() -> None:
    train, valid = carve_valid(1000, 0.2, seed=5)
    assert len(valid) == 200 and len(train) == 800
    assert not set(train) & set(valid) and sorted(set(train) | set(valid)) == list(range(1000))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(valid) > 0)
    again_train, again_valid = carve_valid(1000, 0.2, seed=5)
    assert np.array_equal(valid, again_valid) and np.array_equal(train, again_train)
    assert not np.array_equal(valid, carve_valid(1000, 0.2, seed=6)[1])
    with pytest.raises(ValueError, match="leaves no training rows"):
        carve_valid(1, 0.5, seed=0)


def test_a_tail_carve_holds_out_the_last_rows_whatever_the_seed() -> None:
    train, valid = carve_valid(1000, 0.2, seed=5, split="tail")
    assert np.array_equal(valid, np.arange(800, 1000)) and np.array_equal(train, np.arange(800))
    assert np.array_equal(carve_valid(1000, 0.2, seed=6, split="tail")[1], valid)


def test_a_tail_split_validates_on_the_last_stored_rows_at_both_parties(tmp_path: Path) -> None:
    from vfl_cli.grid import LocalGrid
    from vfl_cli.train.session import open_run

    spec = job_dict(tmp_path)
    spec["data"].update(valid_fraction=0.25, valid_split="tail")
    write_planted_data(Path(spec["data"]["dir"]), rows=400)
    job = parse_job(spec)
    for role, end in LocalGrid.star("leader", ("follower",)).items():
        run = open_run(PartyContext.of(job, role), end)
        stored = np.asarray(run.data.split("train").sample_ids)
        valid = run.view("valid").sample_ids
        assert len(valid) == round(0.25 * len(stored)) and np.array_equal(valid, stored[-len(valid):])
    random_spec = {**spec, "data": {**spec["data"], "valid_split": "random"}}
    assert parse_job(random_spec).fingerprint() != job.fingerprint()  # both parties must carve alike


def test_early_stopping_needs_a_validation_split(tmp_path: Path) -> None:
    spec = job_dict(tmp_path, early_stopping={"patience": 2})
    with pytest.raises(JobError, match="valid_fraction"):
        parse_job(spec)


def overfitting_job(tmp_path: Path, **train: object) -> JobSpec:
    """Tiny planted data, a big model and a high learning rate: validation AUC peaks early, then falls."""
    spec = job_dict(tmp_path, **{"epochs": 8, "batch_size": 32, "deep_optimizer": {"lr": 0.05}, **train})
    spec["data"]["valid_fraction"] = 0.25
    spec["model"] = {"emb_dim": 16, "deep_layers": [64, 32]}
    write_planted_data(Path(spec["data"]["dir"]), rows=600)
    return parse_job(spec)


def metrics(job: JobSpec) -> list[dict]:
    return [json.loads(line) for line in (job.train.run_dir / "leader" / "metrics.jsonl").read_text().splitlines()]


def test_eval_uses_the_best_validation_epoch_not_the_last(tmp_path: Path) -> None:
    job = overfitting_job(tmp_path, early_stopping={"patience": 1})
    outcome = run_local(job, train_session)["leader"]
    records = metrics(job)
    valid_aucs = [r["valid_auc"] for r in records if r["event"] == "epoch"]
    best_epoch = int(np.argmax(valid_aucs))
    assert len(valid_aucs) < job.train.epochs  # it stopped early...
    assert best_epoch < len(valid_aucs) - 1  # ...so the last epoch is not the best
    assert all("test_auc" not in r for r in records if r["event"] == "epoch")  # test is not looked at per epoch
    store = CheckpointStore(job.train.run_dir / "leader", job.fingerprint())
    run_id = store.run_id()
    assert run_id is not None
    selected = store.selected(run_id)
    assert selected is not None and selected["epoch"] == best_epoch
    newest = store.newest()["step"]
    assert selected["step"] < newest
    follower_store = CheckpointStore(job.train.run_dir / "follower", job.fingerprint())
    assert follower_store.selected(run_id)["step"] == selected["step"]  # type: ignore[index]
    final = [r for r in records if r["event"] == "final_test"]
    assert len(final) == 1 and final[0]["epoch"] == best_epoch
    assert outcome.final_test is not None and outcome.final_test.score == final[0]["auc"]
    # eval and infer load the selected checkpoint on both sides: the same AUC as the final test score
    evaluated = run_local(job, lambda run: eval_session(run, job.train.run_dir, "test"))["leader"]
    assert evaluated is not None and evaluated.score == pytest.approx(final[0]["auc"], abs=1e-12)
    last_weights = store.load(run_id, newest)["state"]["bottom"]["deep_embedding.weight"]
    selected_weights = store.load_selected()["state"]["bottom"]["deep_embedding.weight"]  # type: ignore[index]
    assert not torch.equal(last_weights, selected_weights)


def test_validation_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    first = overfitting_job(tmp_path / "a", epochs=2)
    second = overfitting_job(tmp_path / "b", epochs=2)
    run_local(first, train_session)
    run_local(second, train_session)
    pick = [[(r["event"], r.get("valid_auc"), r.get("auc")) for r in metrics(job) if r["event"] != "start"
             and "time" in r] for job in (first, second)]
    assert pick[0] == pick[1]


def test_a_selection_message_is_checked() -> None:
    good = {"best_step": torch.tensor([12]), "stop": torch.tensor([0])}
    check_selection(good)
    for bad in ({"best_step": torch.tensor([12])},
                {**good, "stop": torch.tensor([2])},
                {**good, "best_step": torch.tensor([0])},
                {**good, "best_step": torch.tensor([1.5])},
                {**good, "stop": torch.tensor([0, 1])}):
        with pytest.raises(ProtocolError):
            check_selection(bad)


def test_baselines_select_on_validation_too(tmp_path: Path) -> None:
    """central and leader-only train on the same carved rows, select the same way, score test once."""
    from vfl_cli.reporter import SilentReporter
    from vfl_cli.train.baseline import evaluate_baseline_checkpoint, train_baseline

    job = overfitting_job(tmp_path, early_stopping={"patience": 1})
    outcome = train_baseline(job, "leader-only", SilentReporter(), restart=True)
    assert outcome.final_test is not None and len(outcome.epochs) < job.train.epochs
    aucs = [result.score for _, _, result in outcome.epochs if result is not None]
    store = CheckpointStore(job.train.run_dir / "leader-only", job.fingerprint())
    run_id = store.run_id()
    assert run_id is not None and store.selected(run_id)["epoch"] == int(np.argmax(aucs))  # type: ignore[index]
    evaluated = evaluate_baseline_checkpoint(job, "leader-only", job.train.run_dir, "test")
    assert evaluated.score == pytest.approx(outcome.final_test.score, abs=1e-12)


def test_a_baseline_writes_the_records_vfl_report_reads(tmp_path: Path) -> None:
    from vfl_cli.report import baseline_score
    from vfl_cli.reporter import SilentReporter
    from vfl_cli.train.baseline import train_baseline

    job = overfitting_job(tmp_path, epochs=2)
    outcome = train_baseline(job, "central", SilentReporter(), restart=True)
    records = [json.loads(line) for line in (job.train.run_dir / "central" / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records if r["event"] in ("start", "epoch", "final_test")] == [
        "start", "epoch", "epoch", "final_test"]
    assert outcome.final_test is not None
    assert baseline_score(job.train.run_dir, "central", "auc") == f"{outcome.final_test.score:.6f}"


def test_a_run_that_stopped_early_stays_stopped_when_run_again(tmp_path: Path) -> None:
    """Rerunning `vfl train` without --restart after an early stop trains no further epoch (split and baseline)."""
    from vfl_cli.reporter import SilentReporter
    from vfl_cli.train.baseline import train_baseline

    job = overfitting_job(tmp_path, early_stopping={"patience": 1})
    first = run_local(job, train_session)["leader"]
    again = run_local(job, train_session)["leader"]
    assert len(first.epochs) < job.train.epochs and again.resumed and again.epochs == []
    assert again.final_test is not None and again.final_test.score == first.final_test.score  # type: ignore[union-attr]

    stopped = train_baseline(job, "central", SilentReporter(), restart=True)
    resumed = train_baseline(job, "central", SilentReporter())
    assert len(stopped.epochs) < job.train.epochs and resumed.resumed and resumed.epochs == []
    assert resumed.final_test is not None and resumed.final_test.score == stopped.final_test.score  # type: ignore[union-attr]
