"""The job's `privacy:` section in the loop: off is bitwise off, each defence acts where it says, the audit's
figures are the attacks computed directly on what the follower recorded."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from tests.conftest import job_dict, run_vfl, write_job, write_planted_data
from vfl_cli.audit import LEADER_ONLY, audit_run, plot, sweep
from vfl_cli.errors import JobError
from vfl_cli.job import JobSpec, PrivacySpec, parse_job
from vfl_cli.privacy.cut_layer import CutLayerDefences
from vfl_cli.privacy.quantize import QuantizedTensor
from vfl_cli.protocol import BatchKey
from vfl_cli.train.session import run_local, train_session

KEY = BatchKey("train", 0, 3)


def pair(wide: torch.Tensor, deep: torch.Tensor) -> dict[str, torch.Tensor]:
    """A Wide&Deep party's cut, as the loop hands it to the defences."""
    return {"wide": wide, "deep": deep}


def defences(**privacy: object) -> CutLayerDefences:
    return CutLayerDefences(PrivacySpec.model_validate(privacy), seed=11)


def cut_rows(rows: int = 4096, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's returned gradients as the linear top makes them: w * (p - y) / B, and its labels."""
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(rows, generator=gen) < 0.25).float()
    p = torch.rand(rows, generator=gen) * 0.5
    grad = (p - labels)[:, None] / rows  # (B, 1)
    return grad * 0.7, grad * -1.3, labels


def test_all_off_returns_the_inputs_and_draws_nothing() -> None:
    wide, deep, labels = cut_rows()
    off = defences()
    torch_state = torch.get_rng_state()
    assert off.training_labels(labels, torch.arange(len(labels))) is labels
    sent = off.gradients_out(pair(wide, deep), labels, KEY)
    embeddings = off.embeddings_out(pair(wide, deep), BatchKey("eval", 1, 0))
    for out in (sent, embeddings):
        assert set(out) == {"wide", "deep"}
        assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in out.values())
        assert torch.equal(out["wide"], wide) and torch.equal(out["deep"], deep)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert CutLayerDefences.received(sent)["wide"] is sent["wide"]


def test_label_dp_flips_each_customer_once_for_the_whole_run() -> None:
    """Every epoch, batch and resume sees the same flipped label for a customer: one release, eps-DP in all (a draw
    per epoch would compose, and a follower averaging its epochs would see through the flips)."""
    labels = (torch.rand(20000, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    ids = torch.randperm(20000, generator=torch.Generator().manual_seed(2)) * 7 + 3  # customer ids, any order
    dp = defences(label_dp={"eps": 1.0})
    first = dp.training_labels(labels, ids)
    assert torch.equal(first, dp.training_labels(labels, ids))  # the same customers: the same labels
    order = torch.randperm(20000, generator=torch.Generator().manual_seed(3))  # another epoch's batch order
    assert torch.equal(dp.training_labels(labels[order], ids[order]), first[order])
    other_seed = CutLayerDefences(PrivacySpec.model_validate({"label_dp": {"eps": 1.0}}), seed=12)
    assert not torch.equal(other_seed.training_labels(labels, ids), first)
    # Flip probability 1 / (e + 1) = 0.2689; 20,000 draws: 5 sigma is 0.016; both classes alike.
    flips = first != labels
    assert abs(flips.float().mean().item() - 1 / (np.e + 1)) < 0.016
    for cls in (0.0, 1.0):
        assert abs(flips[labels == cls].float().mean().item() - 1 / (np.e + 1)) < 0.03


@pytest.mark.parametrize("ratio", [0.5, 2.0, 8.0])
def test_gradient_noise_std_is_the_ratio_times_the_batch_largest_row(ratio: float) -> None:
    wide, deep, labels = cut_rows()
    sent = defences(gradient_noise={"noise_ratio": ratio}).gradients_out(pair(wide, deep), labels, KEY)
    noise = torch.cat([sent["wide"] - wide, sent["deep"] - deep], dim=1)  # clip bound = largest row: no clipping
    largest = torch.linalg.vector_norm(torch.cat([wide, deep], dim=1), dim=1).max().item()
    # 8,192 normal draws: the sample std is within 3% of the true one with overwhelming probability.
    assert noise.std().item() == pytest.approx(ratio * largest, rel=0.03)


def test_gradient_noise_with_a_fixed_clip_bound_clips_rows() -> None:
    wide, deep, labels = cut_rows()
    sent = defences(gradient_noise={"noise_ratio": 0.0, "clip_norm": 1e-5}).gradients_out(pair(wide, deep), labels, KEY)
    norms = torch.linalg.vector_norm(torch.cat([sent["wide"], sent["deep"]], dim=1), dim=1)
    assert norms.max().item() <= 1e-5 * (1 + 1e-6)


def test_marvell_noise_only_where_the_job_asks() -> None:
    wide, deep, labels = cut_rows()
    sent = defences(marvell={"power": 4.0}).gradients_out(pair(wide, deep), labels, KEY)
    assert not torch.equal(sent["wide"], wide)
    with pytest.raises(ValueError, match="one of gradient_noise and marvell"):
        PrivacySpec.model_validate({"marvell": {"power": 1}, "gradient_noise": {"noise_ratio": 1}})


def test_embedding_defences_act_on_every_phase_and_only_on_embeddings() -> None:
    wide, deep, labels = cut_rows()
    wide, deep = wide * 1e4, deep * 1e4  # embedding-sized values
    dp = defences(embedding_dp={"clip_norm": 1.0, "sigma": 0.5})
    for phase in ("train", "eval", "infer"):
        sent = dp.embeddings_out(pair(wide, deep), BatchKey(phase, 0, 0))  # type: ignore[arg-type]
        assert not torch.equal(sent["wide"], wide)
    assert torch.equal(dp.gradients_out(pair(wide, deep), labels, KEY)["wide"], wide)
    rr = defences(embedding_rr={"eps": 2.0}).embeddings_out(pair(wide, deep), KEY)
    assert set(torch.unique(torch.cat([rr["wide"], rr["deep"]])).tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("bits", [1, 2, 6, 8])
def test_quantised_sends_round_trip_within_their_rounding_bound(bits: int) -> None:
    wide, deep, labels = cut_rows(rows=1001)
    q = defences(quantize={"gradients": bits, "embeddings": bits})
    # Embeddings: nearest rounding, at most half a step. Gradients: stochastic rounding, under one step.
    cut = pair(wide, deep)
    for sent, bound in ((q.embeddings_out(cut, KEY), 0.5), (q.gradients_out(cut, labels, KEY), 1.0)):
        assert all(isinstance(t, QuantizedTensor) and t.bits == bits for t in sent.values())
        assert len(sent["wide"].data) == -(-1001 * bits // 8)  # type: ignore[union-attr]
        back = CutLayerDefences.received(sent)
        for name, original in (("wide", wide), ("deep", deep)):
            step = (original.max() - original.min()).item() / (2**bits - 1)
            assert (back[name] - original).abs().max().item() <= step * bound * (1 + 1e-5) + 1e-12


def test_stochastic_rounding_of_gradients_is_unbiased() -> None:
    """Nearest rounding to 2 bits moves every small gradient the same way (training diverged); stochastic
    rounding averages out: over 400 batches the mean of the dequantised gradients is the true one."""
    wide, deep, labels = cut_rows(rows=256)
    q = defences(quantize={"gradients": 2})
    step = (wide.max() - wide.min()).item() / 3
    cut = pair(wide, deep)
    mean = torch.stack([CutLayerDefences.received(q.gradients_out(cut, labels, BatchKey("train", 0, s)))["wide"]
                        for s in range(400)]).mean(dim=0)
    nearest = CutLayerDefences.received(defences(quantize={"embeddings": 2}).embeddings_out(cut, KEY))["wide"]
    # Each row's mean of 400 draws is within 5 sigma (sigma <= step / 2 / 20) of its true value.
    assert (mean - wide).abs().max().item() < 5 * step / 40
    assert (nearest - wide).abs().mean().item() > 3 * (mean - wide).abs().mean().item()


def planted(tmp_path: Path, **privacy: object) -> JobSpec:
    spec = job_dict(tmp_path, epochs=2)
    spec["privacy"] = privacy
    write_planted_data(Path(spec["data"]["dir"]))
    return parse_job(spec)


def test_six_bit_quantised_training_learns_as_well_as_float32(tmp_path: Path) -> None:
    plain = run_local(planted(tmp_path / "plain"), train_session)["leader"].epochs[-1][2]
    job = planted(tmp_path / "q", quantize={"embeddings": 6, "gradients": 6})
    quantised = run_local(job, train_session)["leader"].epochs[-1][2]
    assert plain is not None and quantised is not None
    assert quantised.score != plain.score  # the quantisation really happened
    assert quantised.score > plain.score - 0.02


def direct_leaks(npz: Path) -> tuple[float, float]:
    """The two attacks written out again from the recorded gradients, with scikit-learn as the AUC oracle."""
    data = np.load(npz)
    direction, norm = [], []
    for step in np.unique(data["batch"]):
        rows = data["batch"] == step
        g, y = data["gradients"][rows].astype(np.float64), data["labels"][rows]
        if y.min() == y.max():
            continue
        axis = np.linalg.svd(g, full_matrices=False)[2][0]
        for scores, out in ((g @ axis, direction), (np.sqrt((g**2).sum(axis=1)), norm)):
            auc = roc_auc_score(y, scores)
            out.append(max(auc, 1 - auc))
    return float(np.mean(direction)), float(np.mean(norm))


def test_audit_figures_equal_the_attacks_on_the_recorded_gradients(tmp_path: Path) -> None:
    job = planted(tmp_path)
    result = audit_run(job, tmp_path / "audit")
    assert [e.epoch for e in result.epochs] == [0, 1]
    for e in result.epochs:
        direction, norm = direct_leaks(tmp_path / "audit" / f"epoch-{e.epoch}.npz")
        assert e.leaks["direction per batch"] == pytest.approx(direction, abs=1e-9)
        assert e.leaks["norm per batch"] == pytest.approx(norm, abs=1e-9)
        assert e.strongest[1] > 0.99  # no defence: the sign of the gradient is the label
    assert "QDA, 5% known" in result.epochs[0].leaks and "GMM pooled, epochs 0-1" in result.epochs[1].leaks
    recorded = np.load(tmp_path / "audit" / "epoch-1.npz")
    assert recorded["gradients"].shape == (960, 2) and sorted(np.unique(recorded["labels"])) == [0.0, 1.0]
    assert sorted(recorded["rows"]) == list(range(960))  # every training row once per epoch
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert report["epochs"][1]["scored_auc"] == result.epochs[1].scored
    assert report["test_auc"] == result.test_score and report["strongest"]["leak_auc"] == result.strongest[1]
    assert not (job.train.run_dir).exists()  # the job's own checkpoints are never touched


def test_heavy_gradient_noise_lowers_the_strongest_leak(tmp_path: Path) -> None:
    noisy = audit_run(planted(tmp_path, gradient_noise={"noise_ratio": 16.0}), tmp_path / "audit")
    assert noisy.strongest[1] < 0.75  # every attack, every epoch, and the average over both epochs


def test_marvell_in_the_loop_holds_every_attack_on_the_planted_job(tmp_path: Path) -> None:
    """The defence as the job's privacy section applies it in the real loop: undefended, the sign attacks and QDA
    read every label; at power 32, no attack of the audit (any epoch, any average) reaches 0.62 (measured 0.593,
    4,000 planted rows, batches of 480, 3 epochs: the floor per batch is ~0.52)."""
    results = {}
    for name, privacy in (("none", {}), ("marvell", {"marvell": {"power": 32.0}})):
        spec = job_dict(tmp_path / name, epochs=3, batch_size=480)
        spec["privacy"] = privacy
        write_planted_data(Path(spec["data"]["dir"]), rows=4000)
        results[name] = audit_run(parse_job(spec), tmp_path / name / "audit")
    assert all(e.leaks["QDA, 5% known"] > 0.99 for e in results["none"].epochs)
    attack, leak, epoch = results["marvell"].strongest
    assert leak < 0.62, (attack, epoch)


def test_audit_cli_prints_the_table_and_bad_privacy_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = job_dict(tmp_path, epochs=1)
    write_planted_data(Path(spec["data"]["dir"]))
    code, err = run_vfl(monkeypatch, capsys, "audit", "--job", write_job(tmp_path, spec), "--out", tmp_path / "a")
    assert code == 0, err
    assert len(json.loads((tmp_path / "a" / "audit.json").read_text())["epochs"]) == 1
    spec["privacy"] = {"label_dp": {"eps": -1}}
    code, err = run_vfl(monkeypatch, capsys, "audit", "--job", write_job(tmp_path, spec))
    assert code != 0 and "label_dp" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(JobError):
        parse_job(spec)


def test_sweep_writes_a_csv_row_per_setting_and_epoch_and_a_png(tmp_path: Path) -> None:
    job = planted(tmp_path)
    settings = (("none", {}), ("gradient_noise x16", {"gradient_noise": {"noise_ratio": 16.0}}))
    rows = sweep(job, tmp_path / "sweep", settings=settings)
    assert [r.setting for r in rows] == ["none", "gradient_noise x16", LEADER_ONLY]
    with (tmp_path / "sweep" / "sweep.csv").open() as handle:
        table = list(csv.DictReader(handle))
    expected = [(row.setting, str(epoch)) for row in rows for epoch in (0, 1)]
    assert [(r["setting"], r["epoch"]) for r in table] == expected
    assert float(table[0]["strongest_leak_auc"]) > 0.99 and table[-1]["strongest_leak_auc"] == "nan"
    assert float(table[0]["direction per batch"]) > 0.99 and table[-1]["strongest_attack"] == "-"
    plot(rows, tmp_path / "sweep" / "sweep.png", "test")
    png = (tmp_path / "sweep" / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and 10_000 < len(png) < 2_000_000


def test_audit_of_a_job_with_validation_runs_it_as_the_user_does_and_joins_the_right_labels(tmp_path: Path) -> None:
    spec = job_dict(tmp_path, epochs=2, early_stopping={"patience": 1})
    spec["data"]["valid_fraction"] = 0.25
    write_planted_data(Path(spec["data"]["dir"]))
    job = parse_job(spec)
    result = audit_run(job, tmp_path / "audit")
    assert [e.epoch for e in result.epochs] == [0, 1]
    assert all(e.leaks["direction per batch"] > 0.99 for e in result.epochs)  # each gradient joined to its row
    stored_train_rows = len(np.load(job.data.dir / "leader" / "train" / "labels.npy"))
    carved = len(np.load(tmp_path / "audit" / "epoch-0.npz")["labels"])
    assert carved == stored_train_rows - round(0.25 * stored_train_rows)  # the validation carve is kept
    final = json.loads((tmp_path / "audit" / "run" / "leader" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["event"] == "final_test" and final["auc"] == result.test_score  # the selected epoch's test AUC
