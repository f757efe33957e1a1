"""The multiclass label-inference attack of `vfl audit`: k-means on each batch's gradients scored by the best
cluster-to-class mapping reads the class where the gradients carry it, and no more than noise where they don't."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from vfl_cli.privacy.multiclass_leak import check_classes, inference_accuracy, kmeans, matched, standardised


def softmax_gradients(labels: np.ndarray, width: int, seed: int, confidence: float = 1.0) -> np.ndarray:
    """Rows as a softmax top returns them to a cut of `width`: (p - onehot(y)) W / B, p from noisy logits."""
    rng = np.random.default_rng(seed)
    k = int(labels.max()) + 1
    logits = confidence * rng.normal(size=(len(labels), k))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    residual = p - np.eye(k)[labels]
    return residual @ rng.normal(size=(k, width)) / 64


def batches(rows: int, size: int) -> np.ndarray:
    return np.arange(rows) // size


def test_gradients_of_a_softmax_top_give_the_class_away() -> None:
    """Four classes, a cut of eight columns, batches of 64: the clusters are the classes (measured 0.988-1.0 over
    three seeds; through the wide & deep bottom's two columns the classes' groups can overlap: 0.76-0.92)."""
    labels = np.random.default_rng(1).integers(0, 4, size=64 * 30)
    leak = inference_accuracy(softmax_gradients(labels, 8, seed=2), labels, batches(len(labels), 64), 4)
    assert leak.accuracy > 0.95 and leak.rows == len(labels)
    assert leak.majority == pytest.approx(np.bincount(labels).max() / len(labels))
    assert leak.floor < 0.45 and leak.above_majority > 0.6


def test_clusters_that_follow_the_class_score_near_one_with_unbalanced_classes() -> None:
    rng = np.random.default_rng(3)
    labels = rng.choice(3, size=256 * 10, p=[0.6, 0.3, 0.1])
    centres = np.array([[0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    rows = centres[labels] + rng.normal(size=(len(labels), 3))
    leak = inference_accuracy(rows, labels, batches(len(labels), 256), 3)
    assert leak.accuracy > 0.98 and 0.57 < leak.majority < 0.63


@pytest.mark.parametrize("size", [64, 512])
def test_random_rows_score_near_the_majority_share_and_at_the_shuffled_floor(size: int) -> None:
    """Balanced classes, rows that say nothing: the best of k! mappings of noise lifts the accuracy above 1/k,
    more on small batches (measured 0.43 at 64 rows, 0.36 at 512), and the shuffled floor sees the same lift."""
    rng = np.random.default_rng(4)
    labels = np.tile(np.arange(3), size * 20 // 3 + 1)[: size * 20]
    rng.shuffle(labels)
    leak = inference_accuracy(rng.normal(size=(len(labels), 2)), labels, batches(len(labels), size), 3)
    assert abs(leak.majority - 1 / 3) < 0.01
    assert 0 <= leak.accuracy - leak.majority < (0.12 if size == 64 else 0.05)
    assert abs(leak.accuracy - leak.floor) < (0.05 if size == 64 else 0.02)


def test_batches_no_larger_than_the_classes_are_left_out() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    rows = np.random.default_rng(5).normal(size=(7, 2))
    tiny = inference_accuracy(rows, labels, np.array([0, 0, 0, 1, 1, 1, 2]), 3)
    assert np.isnan(tiny.accuracy) and np.isnan(tiny.majority) and tiny.rows == 0
    one = inference_accuracy(rows, labels, np.array([0, 0, 0, 0, 1, 1, 1]), 3)  # only the first batch counts
    assert one.rows == 4 and one.majority == 0.5 and one.accuracy >= 0.5


def test_kmeans_finds_separated_groups_whatever_their_order() -> None:
    rng = np.random.default_rng(6)
    truth = rng.integers(0, 5, size=300)
    rows = standardised(rng.normal(scale=20, size=(5, 4))[truth] + rng.normal(size=(300, 4)))
    clusters = kmeans(rows, 5, seed=0)
    assert matched(clusters, truth, 5) == 300
    assert np.array_equal(clusters, kmeans(rows, 5, seed=0))  # seeded


def test_standardised_columns_and_a_constant_column() -> None:
    rows = np.array([[1.0, 7.0], [3.0, 7.0], [5.0, 7.0]])
    out = standardised(rows)
    assert np.allclose(out[:, 0].mean(), 0) and np.allclose(out[:, 0].std(), 1) and not np.any(out[:, 1])


def test_the_assignment_without_scipy_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    cases = [(rng.integers(0, k, size=200), rng.integers(0, k, size=200), k) for k in (2, 3, 5, 7)]
    with_scipy = [matched(*case) for case in cases]
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # `from scipy.optimize import ...` now fails
    assert [matched(*case) for case in cases] == with_scipy
    with pytest.raises(ValueError, match="needs scipy"):
        matched(np.arange(9), np.arange(9), 9)
    with pytest.raises(ValueError, match="9 classes"):
        check_classes(9)
    check_classes(8)
