"""roc_auc and log_loss against scikit-learn, on numpy and torch inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from vfl_cli.metrics import log_loss, roc_auc


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_equals_sklearn_with_many_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 2000
    scores = rng.integers(0, 12, n) / 11.0  # 12 distinct values: ties everywhere
    labels = (rng.random(n) < 0.2 + 0.5 * scores).astype(np.float32)
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_takes_torch_tensors_and_continuous_scores() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(500, generator=gen)
    labels = (torch.rand(500, generator=gen) < torch.sigmoid(2 * scores)).float()
    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert roc_auc(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_extremes() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_roc_auc_with_one_class_says_why() -> None:
    with pytest.raises(ValueError, match="undefined when every label is positive"):
        roc_auc(np.ones(4), np.arange(4.0))
    with pytest.raises(ValueError, match="differ in length"):
        roc_auc([0, 1], [0.5])


@pytest.mark.parametrize("seed", range(3))
def test_log_loss_equals_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0.01, 0.99, 1000)
    labels = (rng.random(1000) < probs).astype(np.float64)
    assert log_loss(labels, probs) == pytest.approx(sk_log_loss(labels, probs), abs=1e-12)
    assert log_loss(torch.from_numpy(labels), torch.from_numpy(probs)) == pytest.approx(
        log_loss(labels, probs)
    )


def test_log_loss_is_clipped_not_infinite() -> None:
    assert log_loss([1.0, 0.0], [0.0, 1.0], eps=1e-7) == pytest.approx(-np.log(1e-7), rel=1e-6)
