"""Serving's parts without servers: the serving messages on the wire, what a follower answers for a customer it
does not hold under each `serve.unknown` policy, the onnxruntime backend against torch, the `serve:` section,
and `vfl serve`'s one-line refusals."""

from __future__ import annotations

from dataclasses import astuple
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from tests.conftest import run_vfl
from tests.serving import TOKEN_ENV, infer_scores, serving_spec, trained_job
from vfl_cli.errors import ProtocolError
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.party import PartyContext
from vfl_cli.serve.feature_store import FeatureStore
from vfl_cli.serve.follower import FollowerModels, answer_cut, unknown_rows
from vfl_cli.serve.model import ServedPart
from vfl_cli.transport.codec import CutAnswer, CutRequest, ModelMessage, decode, encode


@pytest.fixture(scope="module")
def two_party(tmp_path_factory: pytest.TempPathFactory) -> tuple[JobSpec, Path]:
    return trained_job(tmp_path_factory.mktemp("serve-parts"), ("leader", "follower1"), "binary", epochs=1)


def test_serving_messages_cross_the_wire_unchanged() -> None:
    request = CutRequest("run", 7, ("c00001", "", "ü-ß" * 20))
    assert decode(encode(request, "job"))[1] == request
    answer = CutAnswer("run", 7, (True, False), {"cut": torch.arange(8, dtype=torch.float32).reshape(2, 4)})
    got = decode(encode(answer, "job"))[1]
    assert isinstance(got, CutAnswer) and got.found == (True, False) and torch.equal(got.tensors["cut"],
                                                                                     answer.tensors["cut"])
    assert decode(encode(ModelMessage("run", 3), "job"))[1] == ModelMessage("run", 3)


@pytest.mark.parametrize("change, reason", [
    ({"lengths": b"\x05\x00"}, "lengths add up"),
    ({"ids": b"", "lengths": b""}, "1 to 4096 ids"),
    ({"ids": b"\xff\xfe", "lengths": b"\x02\x00"}, "not UTF-8"),
    ({"ids": b"x" * 300, "lengths": b"\x2c\x01"}, "longer than 256 bytes"),
])
def test_a_malformed_cut_request_is_refused(change: dict, reason: str) -> None:
    body = msgpack.unpackb(encode(CutRequest("run", 1, ("abc",)), "job"))
    with pytest.raises(ProtocolError, match=reason):
        decode(msgpack.packb(body | change, use_bin_type=True))


def test_an_answer_with_rows_for_other_ids_is_refused() -> None:
    answer = CutAnswer("run", 1, (True, True, True), {"cut": torch.zeros(2, 4)})
    with pytest.raises(ProtocolError, match="one row per id"):
        decode(encode(answer, "job"))


def test_a_customer_the_follower_lacks_is_said_or_scored_as_unknown(two_party: tuple[JobSpec, Path]) -> None:
    job, _ = two_party
    ctx = PartyContext.of(job, "follower1")
    models = FollowerModels(ctx, job.train.run_dir, "torch")
    store = FeatureStore.open(job.data.dir / "follower1")
    part = models.load()
    known = [cid.decode() for cid in store.data.customer_ids("test").tolist()[:3]]
    request = CutRequest(part.run_id, part.step, (*known, "nobody", "c99999"))
    missing = answer_cut(part, models.defences, store, request, "missing")
    assert missing.found == (True, True, True, False, False)
    assert not missing.tensors["cut"][3:].any() and missing.tensors["cut"][:3].abs().sum() > 0
    imputed = answer_cut(part, models.defences, store, request, "default_row")
    assert imputed.found == (True,) * 5  # the follower does not say
    ids, vals = unknown_rows(store)
    alone = part.cut(ids[None], vals[None])["cut"][0]
    assert np.allclose(imputed.tensors["cut"][3:].numpy(), alone, atol=1e-7)
    assert torch.equal(imputed.tensors["cut"][:3], missing.tensors["cut"][:3])


def test_the_onnxruntime_backend_computes_what_torch_does(two_party: tuple[JobSpec, Path]) -> None:
    job, _ = two_party
    rows = {key: FeatureStore.open(job.data.dir / key).lookup(
        [c.decode() for c in FeatureStore.open(job.data.dir / "leader").data.customer_ids("test").tolist()[:64]])
        for key in job.keys}
    scores = {}
    for backend in ("torch", "onnxruntime"):
        parts = {key: ServedPart.load(job, key, job.train.run_dir, backend=backend) for key in job.keys}
        cuts = [parts[key].cut(rows[key].ids, rows[key].vals) for key in job.keys]
        scores[backend] = parts["leader"].predict(cuts)
    assert np.abs(scores["torch"] - scores["onnxruntime"]).max() <= 1e-5
    assert (job.train.run_dir / "leader" / "serving").is_dir()


def test_the_serve_section_is_local_and_checked(tmp_path: Path) -> None:
    spec = serving_spec(tmp_path, ("leader", "follower1"), "binary")
    without = dict(spec)
    without.pop("serve")
    assert parse_job(spec).fingerprint() == parse_job(without).fingerprint()  # trained jobs keep their checkpoints
    for serve, message in [({"follower_listen": {"leader": "127.0.0.1:1"}}, "not a follower"),
                           ({"token_env": "A", "token_file": "b"}, "not both"),
                           ({"max_batch": 5000}, "less than or equal to 4096"),
                           ({"unknown": "guess"}, "missing")]:
        with pytest.raises(Exception, match=message):
            parse_job(spec | {"serve": serve})


def test_vfl_serve_refuses_in_one_line(two_party: tuple[JobSpec, Path], monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    job, job_path = two_party
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    code, err = run_vfl(monkeypatch, capsys, "serve", "--job", job_path, "--party", "leader")
    assert code == 2 and f"serve.token_env: the environment variable {TOKEN_ENV} is not set" in err
    monkeypatch.setenv(TOKEN_ENV, "short")
    code, err = run_vfl(monkeypatch, capsys, "serve", "--job", job_path, "--party", "leader")
    assert code == 2 and "give at least 16" in err and "short" not in err  # the token is never printed
    code, err = run_vfl(monkeypatch, capsys, "serve", "--job", job_path, "--role", "local")
    assert code == 2 and "one process per party" in err
    code, err = run_vfl(monkeypatch, capsys, "serve", "--job", job_path, "--party", "follower1", "--step", "3")
    assert code == 2 and "--step" in err
    code, err = run_vfl(monkeypatch, capsys, "serve", "--job", job_path, "--party", "follower1", "--store",
                        tmp_path / "nowhere")
    assert code == 3 and "Traceback" not in err


def test_infer_of_a_carved_train_split_names_its_own_customers(tmp_path: Path) -> None:
    """With a validation carve, `vfl infer --split train` scores the train part only; each row is named by its
    own customer id (it once zipped the whole stored split's ids against fewer predictions, and crashed)."""
    job, _ = trained_job(tmp_path, ("leader", "follower1"), "binary", epochs=1, valid_fraction=0.25)
    scores = infer_scores(job, tmp_path, "train")
    stored = [c.decode() for c in FeatureStore.open(job.data.dir / "leader").data.customer_ids("train").tolist()]
    assert 0.6 * len(stored) < len(scores) < 0.9 * len(stored) and set(scores) < set(stored)
    ids = sorted(scores)[:20]
    parts = {key: ServedPart.load(job, key, job.train.run_dir) for key in job.keys}
    cuts = [parts[key].cut(*astuple(FeatureStore.open(job.data.dir / key).lookup(ids))[:2]) for key in job.keys]
    assert np.abs(parts["leader"].predict(cuts) - [scores[cid][0] for cid in ids]).max() <= 1e-6
