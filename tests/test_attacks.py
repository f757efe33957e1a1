"""The label attacks of `vfl audit`: each sees what it claims to, the finding against the old Marvell is reproduced,
the fixed Marvell holds at its measured figure, and the supervised models agree with scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis
from sklearn.metrics import roc_auc_score

from tests.isotropic_marvell import isotropic_marvell_noise
from vfl_cli.privacy import marvell_noise, perturb_gradients
from vfl_cli.privacy.attacks import leak_auc, unsupervised_scores
from vfl_cli.privacy.known_labels import batch_frame, known_rows, qda
from vfl_cli.privacy.leakage import EpochLeak, Received, epoch_leaks

ROWS, BATCH = 8192, 2048
UNSUPERVISED_SIGN_ATTACKS = ("direction per batch", "PC1 per batch", "2-means per batch", "GMM per batch")


def run_of(epochs: int, defence: str | None = None, power: float = 16.0, seed: int = 0) -> list[Received]:
    """A follower's gradients over `epochs` of the same rows: w * (p - y) / B per row (the cut layer's geometry,
    a top weight w that drifts between steps, 25% positives, predicted higher and more spread than the negatives),
    each batch through `defence` with fresh noise."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(ROWS) < 0.25).astype(np.float64)
    out = []
    for epoch in range(epochs):
        order = rng.permutation(ROWS)
        grads = []
        for step in range(ROWS // BATCH):
            rows = order[step * BATCH:(step + 1) * BATCH]
            w = torch.tensor([0.7 + 0.01 * (epoch * 4 + step), -1.3])
            y = torch.from_numpy(labels[rows]).float()
            u = rng.random(BATCH)
            p = torch.from_numpy(np.where(labels[rows] == 1, 0.15 + 0.6 * u, 0.05 + 0.3 * u)).float()
            grad = (p - y).unsqueeze(1) * w / BATCH  # (B, 2)
            generator = torch.Generator().manual_seed(seed * 1000 + epoch * 10 + step)
            if defence == "marvell":
                grad = marvell_noise(grad, y, power, generator)
            elif defence == "isotropic-model marvell":
                grad = isotropic_marvell_noise(grad, y, power, generator)
            elif defence == "gradient noise":
                grad = perturb_gradients(grad, float(grad.norm(dim=1).max()), power, generator)
            grads.append(grad.numpy())
        out.append(Received(np.concatenate(grads), labels[order], np.repeat(np.arange(ROWS // BATCH), BATCH), order))
    return out


def test_without_defence_the_sign_attacks_read_every_label() -> None:
    (leak,) = epoch_leaks(run_of(1))
    for attack in UNSUPERVISED_SIGN_ATTACKS:
        assert leak.leaks[attack] > 0.99, attack
    assert leak.leaks["norm per batch"] > 0.9  # positives are rarer and predicted lower: larger |p - y|
    assert leak.strongest[1] > 0.99


def test_the_finding_against_the_isotropic_model_marvell_is_reproduced() -> None:
    """The old defence poured noise across e into one class: no label needed to see it (|PC2|), nor with 5%."""
    (leak,) = epoch_leaks(run_of(1, "isotropic-model marvell"))
    assert leak.leaks["direction per batch"] < 0.62  # what the old audit measured, and why it looked safe
    assert leak.leaks["|PC2| per batch"] >= 0.9
    assert leak.leaks["QDA, 5% known"] >= 0.9


def test_the_fixed_marvell_holds_against_every_attack_at_its_measured_figure() -> None:
    """Power 16 on these rows: every attack of one epoch at most 0.59 (measured 0.569, direction: the mean gap along
    e; the floor for 512 positives of 2,048 is ~0.512), and the average of three epochs at most 0.64 (measured
    0.618: fresh noise each epoch averages out, which only more power or fewer epochs hides)."""
    leaks = epoch_leaks(run_of(3, "marvell"))
    name, first = leaks[0].strongest
    assert first <= 0.59, name
    name, averaged = leaks[2].strongest
    assert averaged <= 0.64, name
    assert leaks[0].leaks["|PC2| per batch"] < 0.53 and leaks[0].leaks["QDA, 5% known"] < 0.58


def test_matched_spreads_hide_classes_that_differ_in_spread_not_only_in_mean() -> None:
    """Where the classes' gradients differ in spread in every direction (a non-linear top), hiding the mean gap is not
    enough: the spread marks the class. With each row given a deviation of the other class, no attack sees it
    (power 64: measured 0.540 at most; with the matching removed by hand, GMM and QDA read 0.87)."""
    rng = np.random.default_rng(4)
    labels = (rng.random(ROWS) < 0.3).astype(np.float64)
    spread = np.where(labels == 1, 0.2, 1.0)[:, None]
    rows = rng.standard_normal((ROWS, 2)) * spread + labels[:, None] * np.array([0.3, 0.1])  # (N, 2)
    batch = np.repeat(np.arange(ROWS // BATCH), BATCH)
    noisy = np.concatenate([marvell_noise(torch.from_numpy(rows[batch == b]), torch.from_numpy(labels[batch == b]),
                                          64.0, torch.Generator().manual_seed(int(b))).numpy()
                            for b in range(ROWS // BATCH)])
    (leak,) = epoch_leaks([Received(noisy, labels, batch, np.arange(ROWS))])
    name, strongest = leak.strongest
    assert strongest < 0.56, name


def test_averaging_over_epochs_beats_one_epoch_against_fresh_noise() -> None:
    leaks = epoch_leaks(run_of(3, "gradient noise", power=2.0))
    one, three = leaks[0].leaks["direction pooled"], leaks[2].leaks["direction pooled, epochs 0-2"]
    assert three > one + 0.03


def test_pooled_scores_keep_one_orientation_across_batches() -> None:
    """Per batch the principal axis has an arbitrary sign; pooled, each batch is turned like the previous one, so one
    AUC over the epoch is as high as the per-batch ones (no batch cancels another)."""
    (got,) = run_of(1)
    scores, _ = unsupervised_scores(got.gradients, got.batch)
    assert leak_auc(scores["direction"], got.labels) > 0.99


def test_qda_agrees_with_scikit_learn() -> None:
    (got,) = run_of(1, "isotropic-model marvell")
    coords, _ = batch_frame(got.gradients, got.batch)
    known = known_rows(got.rows, 0.05, seed=0)
    ours = qda(coords[known], got.labels[known], coords)[~known]
    mean, spread = coords[known].mean(axis=0), coords[known].std(axis=0)  # ours standardises on the known rows
    x = (coords - mean) / spread
    oracle = QuadraticDiscriminantAnalysis(reg_param=1e-6, tol=1e-12).fit(x[known], got.labels[known])
    theirs = oracle.decision_function(x[~known])
    assert roc_auc_score(got.labels[~known], ours) == pytest.approx(roc_auc_score(got.labels[~known], theirs), abs=2e-3)


def test_known_rows_are_the_same_customers_every_epoch() -> None:
    first, second = run_of(2)
    a, b = known_rows(first.rows, 0.05, seed=3), known_rows(second.rows, 0.05, seed=3)
    assert sorted(first.rows[a]) == sorted(second.rows[b]) and a.sum() == round(0.05 * ROWS)


def test_leak_auc_counts_either_end_and_the_strongest_skips_missing_attacks() -> None:
    labels = np.array([0, 0, 1, 1.0])
    assert leak_auc(np.array([1, 2, 3, 4.0]), labels) == leak_auc(np.array([4, 3, 2, 1.0]), labels) == 1.0
    assert np.isnan(leak_auc(np.array([1, 2.0]), np.array([1, 1.0])))
    assert EpochLeak(0, {"a": float("nan"), "b": 0.7, "c": 0.6}).strongest == ("b", 0.7)
    assert EpochLeak(0, {}).strongest[0] == "-"
