"""The job spec: the shipped jobs load, the reference job is the reference, bad specs name key and file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, job_dict
from vfl_cli.errors import JobError
from vfl_cli.job import load_job, parse_job


@pytest.mark.parametrize("name", ["criteo", "smoke", "demo"])
def test_shipped_jobs_load(name: str) -> None:
    job = load_job(REPO / "jobs" / f"{name}.yaml")
    assert len(job.leader.fields) == 20 and len(job.follower.fields) == 19


def test_criteo_job_is_the_reference_configuration() -> None:
    job = load_job(REPO / "jobs" / "criteo.yaml")
    assert job.leader.fields == tuple([f"I{i}" for i in range(1, 8)] + [f"C{i}" for i in range(1, 14)])
    assert job.follower.fields == tuple([f"I{i}" for i in range(8, 14)] + [f"C{i}" for i in range(14, 27)])
    assert (job.model.emb_dim, job.model.deep_layers) == (80, (1024, 512, 256, 128))
    assert (job.train.batch_size, job.train.epochs, job.train.l2_coef) == (16000, 15, 8e-5)
    ftrl, adam = job.train.wide_optimizer, job.train.deep_optimizer
    assert (ftrl.lr, ftrl.l1, ftrl.l2, ftrl.initial_accumulator) == (5e-2, 1e-8, 1e-8, 1.0)
    assert (adam.lr, adam.eps) == (3.5e-4, 1e-8)
    assert job.data.threshold == 100 and job.tls.enabled


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["model"].update(emb_dim=0), "model.emb_dim: must be a positive number"),
        (lambda d: d["model"].update(colour="red"), "model.colour: unknown key"),
        (lambda d: d["parties"]["leader"].update(fields=["I1", "X9"]), "unknown field(s) X9"),
        (lambda d: d["parties"]["follower"].update(fields=["I1"]), "I1 held by both follower and leader"),
        (lambda d: d["parties"].pop("follower"), "needs at least one follower"),
        (lambda d: d["parties"]["leader"].update(listen="nowhere"), "must be host:port"),
        (lambda d: d.pop("name"), "name: required key is missing"),
    ],
)
def test_bad_spec_names_key_and_file(tmp_path: Path, mutate, message: str) -> None:
    spec = job_dict(tmp_path)
    mutate(spec)
    path = write(tmp_path, yaml.safe_dump(spec))
    with pytest.raises(JobError) as caught:
        load_job(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_malformed_yaml_gives_the_line(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"bad.yaml: line 2 malformed YAML"):
        load_job(write(tmp_path, "name: x\nparties: {a: [1, 2}\nseed: 1\n"))


def test_missing_job_file(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")


def test_fingerprint_ignores_local_settings_only(tmp_path: Path) -> None:
    spec = job_dict(tmp_path)
    base = parse_job(spec).fingerprint()
    spec["parties"]["leader"].update(threads=2, listen="127.0.0.1:1")
    spec["train"]["run_dir"] = "elsewhere"
    assert parse_job(spec).fingerprint() == base
    spec["train"]["batch_size"] = 65
    assert parse_job(spec).fingerprint() != base


def test_id_and_label_columns_must_differ_from_the_fields(tmp_path: Path) -> None:
    spec = job_dict(tmp_path)
    spec["parties"]["leader"]["id_column"] = "C1"  # a field the leader holds
    with pytest.raises(JobError, match="parties.leader: id_column, label_column and the columns must all be different"):
        parse_job(spec, "job.yaml")
