"""Tasks: each task's metrics against scikit-learn, selection by the primary metric, the losses and predictions,
and k-ary randomised response."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as sk

from vfl_cli import metrics
from vfl_cli.privacy.mechanisms import flip_probability, randomized_response
from vfl_cli.task import Task, describe

RNG = np.random.default_rng(0)


def test_binary_metrics_match_scikit_learn() -> None:
    labels = (RNG.random(500) < 0.3).astype(np.float64)
    scores = np.clip(labels * 0.3 + RNG.random(500) * 0.7, 0, 1)
    scores[:50] = 0.5  # ties
    fpr, tpr, _ = sk.roc_curve(labels, scores)
    assert metrics.ks_statistic(labels, scores) == pytest.approx(float(np.max(tpr - fpr)), abs=1e-12)
    found = Task("binary").score(labels, scores)
    assert list(found) == ["auc", "log_loss", "ks"]
    assert found["auc"] == pytest.approx(sk.roc_auc_score(labels, scores), abs=1e-12)
    assert found["log_loss"] == pytest.approx(sk.log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7)), abs=1e-9)


def test_multiclass_metrics_match_scikit_learn() -> None:
    labels = RNG.integers(0, 4, 400)
    logits = RNG.normal(size=(400, 4))
    logits[np.arange(400), labels] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    found = Task("multiclass", ("a", "b", "c", "d")).score(labels.astype(np.float32), probs)
    assert found["accuracy"] == pytest.approx(sk.accuracy_score(labels, probs.argmax(1)))
    assert found["macro_f1"] == pytest.approx(sk.f1_score(labels, probs.argmax(1), average="macro"))
    assert found["log_loss"] == pytest.approx(sk.log_loss(labels, probs, labels=[0, 1, 2, 3]), abs=1e-9)


def test_regression_metrics_match_scikit_learn() -> None:
    targets = RNG.normal(10, 3, 300)
    predictions = targets + RNG.normal(0, 1, 300)
    found = Task("regression").score(targets, predictions)
    assert found["rmse"] == pytest.approx(math.sqrt(sk.mean_squared_error(targets, predictions)))
    assert found["mae"] == pytest.approx(sk.mean_absolute_error(targets, predictions))
    assert found["r2"] == pytest.approx(sk.r2_score(targets, predictions))


def test_undefined_metrics_are_nan_not_errors() -> None:
    found = Task("binary").score(np.ones(5), np.full(5, 0.5))  # one class: AUC and KS undefined
    assert math.isnan(found["auc"]) and math.isnan(found["ks"]) and not math.isnan(found["log_loss"])
    assert all(math.isnan(v) for v in Task("regression").score(None, np.zeros(0)).values())


def test_the_primary_metric_selects_and_knows_its_direction() -> None:
    assert Task("binary").better(0.8, 0.7) and not Task("binary").better(0.7, 0.8)
    assert Task("regression").better(3.0, 4.0) and not Task("regression").better(4.0, 3.0)  # RMSE: lower wins
    assert Task("multiclass", ("a", "b")).better(0.5, None)
    assert not Task("binary").better(float("nan"), 0.5) and Task("binary").better(0.5, float("nan"))


def test_regression_trains_on_the_standardised_label_and_predicts_in_its_units() -> None:
    train = np.array([10.0, 12.0, 14.0, 16.0])
    task = Task.of("regression", (), train)
    assert (task.label_mean, task.label_std) == pytest.approx((13.0, float(train.std())))
    logits = torch.tensor([[0.0], [1.0]])
    torch.testing.assert_close(task.predict(logits), torch.tensor([13.0, 13.0 + float(train.std())]))
    exact = torch.tensor([[(10.0 - 13.0) / train.std()]], dtype=torch.float32)
    assert task.loss(exact, torch.tensor([10.0])).item() == pytest.approx(0.0, abs=1e-10)


def test_multiclass_loss_and_predictions_are_softmax_cross_entropy() -> None:
    task = Task.of("multiclass", ("x", "y", "z"))
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0.0, 2.0])
    expected = -torch.log_softmax(logits, 1)[[0, 1], [0, 2]].mean()
    torch.testing.assert_close(task.loss(logits, labels), expected)
    assert task.predict(logits).shape == (2, 3) and task.columns() == ["p_x", "p_y", "p_z"]
    with pytest.raises(ValueError, match="at least 2 classes"):
        Task.of("multiclass", ("only",))


def test_describe_names_each_metric() -> None:
    assert describe({"accuracy": 0.8, "macro_f1": 0.75}) == "accuracy 0.800000  macro-F1 0.750000"


def test_k_ary_randomised_response_keeps_with_the_right_probability() -> None:
    eps, k, n = 1.0, 4, 200_000
    labels = torch.from_numpy(RNG.integers(0, k, n).astype(np.float32))
    out = randomized_response(labels, eps, torch.from_numpy(RNG.random(n)), classes=k)
    keep = float((out == labels).float().mean())
    assert keep == pytest.approx(math.exp(eps) / (math.exp(eps) + k - 1), abs=0.005)
    changed = out[out != labels] - labels[out != labels]
    shifts = torch.remainder(changed, k)
    for shift in (1, 2, 3):  # each other class equally likely
        assert float((shifts == shift).float().mean()) == pytest.approx(1 / 3, abs=0.01)
    assert set(out.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_two_classes_is_the_binary_flip_exactly() -> None:
    labels = torch.from_numpy((RNG.random(1000) < 0.5).astype(np.float32))
    uniforms = torch.from_numpy(RNG.random(1000))
    expected = torch.where(uniforms < flip_probability(0.5), 1 - labels, labels)
    assert torch.equal(randomized_response(labels, 0.5, uniforms, classes=2), expected)


def test_ties_on_the_primary_metric_go_to_the_lower_loss() -> None:
    """A small validation split's AUC saturates at 1.0 within a few epochs: the log loss decides between them
    (without it, the first perfect epoch was kept: breast's test AUC 0.980 against 0.994 with it, 5 seeds)."""
    binary = Task("binary")
    assert binary.tiebreak.name == "log_loss" and Task("regression").tiebreak.name == "mae"
    assert binary.better(1.0, 1.0, tie=0.10, than_tie=0.20) and not binary.better(1.0, 1.0, 0.30, 0.20)
    assert not binary.better(1.0, 1.0, 0.20, 0.20)  # a tie of both: the earlier epoch stays
    assert not binary.better(1.0, 1.0, 0.10, None)  # a record from before the tiebreak: no change
    assert Task("regression").better(3.0, 3.0, tie=1.0, than_tie=1.5)
