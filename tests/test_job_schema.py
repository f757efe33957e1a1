"""Jobs for any table: columns by name and kind per party, the label's task, a label-only leader, the Criteo
preset's `fields:`, and the settings refused for a task."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfl_cli.errors import JobError
from vfl_cli.job import load_job, parse_job


def spec(**leader: object) -> dict:
    return {
        "name": "bank",
        "parties": {
            "leader": {"name": "bank", "columns": {"x0": "numeric", "region": "categorical"}, "label_column": "y",
                       "task": "binary", **leader},
            "follower": {"name": "shop", "columns": {"x0": "numeric", "x1": "numeric"}, "listen": "127.0.0.1:8702"},
        },
        "model": {"bottom": "mlp", "cut_dim": 8},
    }


def test_columns_by_name_and_kind_with_the_same_names_at_both_parties() -> None:
    job = parse_job(spec())
    assert job.leader.fields == ("x0", "region") and job.follower.fields == ("x0", "x1")  # x0 twice: two columns
    schema = job.table_schema("leader")
    assert schema.numeric == ("x0",) and schema.categorical == ("region",)
    assert schema.label is not None and (schema.label.column, schema.task) == ("y", "binary")
    assert schema.scaling == "standard"  # outside the Criteo preset
    assert job.table_schema("follower").label is None
    assert job.cut_widths("follower") == {"cut": 8}


def test_a_label_only_leader_holds_no_columns_and_sends_no_cut() -> None:
    job = parse_job(spec(columns={}))
    assert job.leader.fields == () and job.cut_widths("leader") == {}


def test_the_follower_needs_a_column() -> None:
    data = spec()
    data["parties"]["follower"]["columns"] = {}
    with pytest.raises(JobError, match="parties.follower: needs at least one column"):
        parse_job(data)


@pytest.mark.parametrize(("change", "message"), [
    ({"columns": {"x0": "text"}}, "parties.leader.columns.x0: Input should be 'numeric' or 'categorical'"),
    ({"task": "ranking"}, "parties.leader.task: Input should be 'binary', 'multiclass' or 'regression'"),
    ({"fields": ["I1"]}, "give either `fields` (the Criteo preset) or `columns`, not both"),
    ({"label_column": "x0"}, "id_column, label_column and the columns must all be different columns"),
])
def test_bad_schemas_are_one_line(change: dict, message: str) -> None:
    with pytest.raises(JobError) as caught:
        parse_job(spec(**change))
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("task", "privacy", "message"), [
    ("multiclass", {"marvell": {"power": 4}}, "privacy.marvell: binary labels only; this job's task is multiclass"),
    ("regression", {"marvell": {"power": 4}}, "privacy.marvell: binary labels only"),
    ("regression", {"label_dp": {"eps": 1}}, "privacy.label_dp: randomised response needs class labels"),
])
def test_defences_a_task_cannot_use_are_refused_at_load(task: str, privacy: dict, message: str) -> None:
    with pytest.raises(JobError, match=message.replace("(", r"\(")):
        parse_job({**spec(task=task), "privacy": privacy})


def test_multiclass_keeps_label_dp_and_every_task_keeps_the_other_defences() -> None:
    defences = {"gradient_noise": {"noise_ratio": 0.5}, "embedding_dp": {"clip_norm": 1, "sigma": 0.1}}
    assert parse_job({**spec(task="multiclass"), "privacy": {"label_dp": {"eps": 1}}}).privacy.label_dp is not None
    for task in ("binary", "multiclass", "regression"):
        assert parse_job({**spec(task=task), "privacy": defences}).privacy.enabled == ["gradient_noise", "embedding_dp"]


def test_the_criteo_preset_keeps_its_kinds_scaling_model_and_fingerprints() -> None:
    job = load_job(Path("jobs/demo.yaml"))
    assert job.leader.preset == "criteo" and job.table_schema("leader").scaling == "max"
    assert job.leader.columns["I1"] == "numeric" and job.leader.columns["C1"] == "categorical"
    assert job.cut_widths("follower") == {"wide": 1, "deep": 1}
    # the fingerprints the jobs had before schemas existed (checkpoints of existing runs stay valid)
    assert job.fingerprint() == "32c2fa549b0f4732"
    assert load_job(Path("jobs/smoke.yaml")).fingerprint() == "6250d6779d8bfab3"


def test_kinds_task_and_model_are_part_of_the_fingerprint() -> None:
    base = parse_job(spec()).fingerprint()
    assert parse_job(spec(columns={"x0": "categorical", "region": "categorical"})).fingerprint() != base
    assert parse_job(spec(task="multiclass")).fingerprint() != base
    assert parse_job({**spec(), "model": {"bottom": "mlp", "cut_dim": 4}}).fingerprint() != base


def test_data_preparation_imports_nothing_of_vfl_cli() -> None:
    """The dependency runs one way: vfl_cli -> data_prep (every data_prep module imported, no vfl_cli loaded)."""
    import subprocess
    import sys

    code = ("import pkgutil, importlib, sys, data_prep\n"
            "for m in pkgutil.iter_modules(data_prep.__path__): importlib.import_module('data_prep.' + m.name)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] == 'vfl_cli'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
