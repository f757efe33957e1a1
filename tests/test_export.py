"""`vfl export --format onnx`: every party's graphs, run by onnxruntime and composed as serving would, give
`vfl infer`'s predictions (to 1e-5), for a three-party binary job and a two-party multiclass one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from data_prep.store import open_party
from tests.conftest import run_vfl, write_job
from tests.test_audit_multiclass import multiclass_spec
from tests.three_parties import three_party_job, write_three_party_data
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.train.session import infer_session, run_local, train_session


def onnx_predictions(job: JobSpec, out: Path, split: str = "test") -> np.ndarray:
    """Each party's bottom.onnx on its own rows of `split`, then the leader's top.onnx over all the cuts."""
    feeds = {}
    for key in job.keys:
        arrays = open_party(job.data.dir, key).split(split)
        bottom = onnxruntime.InferenceSession(str(out / key / "bottom.onnx"))
        manifest = json.loads((out / key / "manifest.json").read_text())
        cut = bottom.run(None, {"ids": np.asarray(arrays.ids, dtype=np.int64),
                                "vals": np.asarray(arrays.vals, dtype=np.float32)})
        feeds |= {f"{key}.{name}": tensor for name, tensor in zip(manifest["graphs"]["bottom"]["outputs"], cut,
                                                                   strict=True)}
    top = onnxruntime.InferenceSession(str(out / job.label_party / "top.onnx"))
    return top.run(None, feeds)[0]


def export_all(job: JobSpec, job_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch,
               capsys: pytest.CaptureFixture[str]) -> None:
    for key in job.keys:
        code, err = run_vfl(monkeypatch, capsys, "export", "--job", job_path, "--party", key, "--out", out)
        assert code == 0, err


def test_three_parties_exported_score_as_infer_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    spec = three_party_job(tmp_path, epochs=2)
    write_three_party_data(Path(spec["data"]["dir"]))
    job, job_path = parse_job(spec), write_job(tmp_path, spec)
    run_local(job, train_session)
    expected = run_local(job, lambda run: infer_session(run, job.train.run_dir, "test", None))["leader"]
    export_all(job, job_path, tmp_path / "onnx", monkeypatch, capsys)
    got = onnx_predictions(job, tmp_path / "onnx")
    assert got.shape == expected.predictions.shape
    assert np.abs(got - expected.predictions).max() <= 1e-5
    manifest = json.loads((tmp_path / "onnx" / "leader" / "manifest.json").read_text())
    assert manifest["graphs"]["top"]["inputs"] == ["leader.wide", "leader.deep", "follower1.wide", "follower1.deep",
                                                   "follower2.wide", "follower2.deep"]
    assert manifest["check"]["max_abs_difference"] <= 1e-5 and manifest["step"] > 0
    assert (tmp_path / "onnx" / "follower2" / "meta.json").exists() and not (tmp_path / "onnx" / "follower2" /
                                                                              "top.onnx").exists()


def test_a_multiclass_export_gives_each_class_probability(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    spec = multiclass_spec(tmp_path)
    spec["model"] = {"bottom": "mlp", "cut_dim": 4, "emb_dim": 4, "deep_layers": [16]}
    job, job_path = parse_job(spec), write_job(tmp_path, spec)
    run_local(job, train_session)
    expected = run_local(job, lambda run: infer_session(run, job.train.run_dir, "test", None))["leader"]
    export_all(job, job_path, tmp_path / "onnx", monkeypatch, capsys)
    got = onnx_predictions(job, tmp_path / "onnx")
    assert got.shape == expected.predictions.shape == (expected.rows, 3)
    assert np.abs(got - expected.predictions).max() <= 1e-5
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_export_without_a_checkpoint_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    spec = three_party_job(tmp_path)
    write_three_party_data(Path(spec["data"]["dir"]))
    code, err = run_vfl(monkeypatch, capsys, "export", "--job", write_job(tmp_path, spec), "--party", "follower1",
                        "--out", tmp_path / "onnx")
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
