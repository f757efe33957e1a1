"""Marvell gradient noise: shapes, determinism, "off" is bitwise and draws nothing, matched spreads, budget, the
along-e split's optimality, leak."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from vfl_cli.privacy import marvell_noise, perturb_gradients
from vfl_cli.privacy.marvell import along_split, along_sum_kl, marvell_solution

POWERS = (1.0, 4.0, 16.0, 64.0)
W = torch.tensor([0.7, -1.3], dtype=torch.float64)  # the top's weights on (wide, deep)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def line_batch(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The cut layer's real shape: rows w * (p_i - y_i) / B, 25% positives, p ~ U(0.05, 0.5)."""
    g = gen(seed)
    y = (torch.rand(b, generator=g, dtype=torch.float64) < 0.25).to(torch.float64)
    p = 0.05 + 0.45 * torch.rand(b, generator=g, dtype=torch.float64)
    return (p - y).unsqueeze(1) * W / b, y  # (B, 2), (B,)


def blob_batch(b: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two isotropic classes of different spread (positives tight, negatives wide)."""
    g = gen(seed)
    y = (torch.rand(b, generator=g, dtype=torch.float64) < 0.3).to(torch.float64)
    z = torch.randn(b, k, generator=g, dtype=torch.float64)
    mean = torch.where(y.bool().unsqueeze(1), 1.0, 0.0) * torch.arange(1, k + 1, dtype=torch.float64)
    spread = torch.where(y.bool(), 0.2, 0.6).unsqueeze(1)
    return mean + spread * z, y


def leak_auc(grad: torch.Tensor, labels: torch.Tensor) -> float:
    """The follower's projection attack: positives' rows point against w (p - 1 < 0), so score = -<row, w>."""
    return float(roc_auc_score(labels.numpy(), -(grad @ W).numpy()))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_device(k: int, dtype: torch.dtype) -> None:
    grad, y = blob_batch(64, k)
    grad = grad.to(dtype)
    out = marvell_noise(grad, y.to(torch.float32), 4.0, gen())
    assert out.shape == grad.shape and out.dtype == dtype and out.device == grad.device
    assert not torch.equal(out, grad)  # noise was added...
    assert torch.isfinite(out).all()


def test_deterministic_with_seeded_generator() -> None:
    grad, y = line_batch(512)
    first = marvell_noise(grad, y, 4.0, gen(7))
    assert torch.equal(first, marvell_noise(grad, y, 4.0, gen(7)))
    assert not torch.equal(first, marvell_noise(grad, y, 4.0, gen(8)))


def _off_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    grad, y = line_batch(256)
    return {
        "power 0": (grad, y, 0.0),
        "only positives": (grad, torch.ones_like(y), 4.0),
        "only negatives": (grad, torch.zeros_like(y), 4.0),
        "empty batch": (grad[:0], y[:0], 4.0),
        "equal class means": (torch.ones(8, 2), torch.tensor([0.0, 1.0] * 4), 4.0),
    }


@pytest.mark.parametrize("case", list(_off_cases()))
def test_off_returns_bitwise_copy_and_draws_nothing(case: str) -> None:
    grad, y, power = _off_cases()[case]
    generator = gen(3)
    state = generator.get_state()
    out = marvell_noise(grad, y, power, generator)
    assert torch.equal(out, grad) and out.dtype == grad.dtype
    assert out.data_ptr() != grad.data_ptr() or grad.numel() == 0  # a copy, not the caller's tensor
    assert torch.equal(generator.get_state(), state)
    assert marvell_solution(grad, y, power) is None


@pytest.mark.parametrize(
    ("grad", "labels", "power", "match"),
    [
        (torch.zeros(4), torch.zeros(4), 1.0, "2-d"),
        (torch.zeros(4, 0), torch.zeros(4), 1.0, "k >= 1"),
        (torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4), 1.0, "floating"),
        (torch.zeros(4, 2), torch.zeros(3), 1.0, "labels"),
        (torch.zeros(4, 2), torch.tensor([0.0, 1.0, 2.0, 1.0]), 1.0, "0 or 1"),
        (torch.zeros(4, 2), torch.zeros(4), -1.0, "power"),
        (torch.zeros(4, 2), torch.zeros(4), math.nan, "power"),
        (torch.zeros(4, 2), torch.zeros(4), math.inf, "power"),
        (torch.tensor([[math.nan, 0.0]] * 4), torch.zeros(4), 1.0, "finite"),
    ],
)
def test_bad_inputs_raise(grad: torch.Tensor, labels: torch.Tensor, power: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        marvell_noise(grad, labels, power, gen())


def _covariance(rows: torch.Tensor) -> torch.Tensor:
    centred = rows - rows.mean(dim=0)
    return centred.T @ centred / len(rows)


@pytest.mark.parametrize("make", ["blob", "line"])
def test_both_classes_end_with_the_same_spread_and_the_budget_is_spent(make: str) -> None:
    """Each class's noisy rows have covariance S0 + S1 + its along-e share, and the expected noise power is P.

    A sample variance of n values has relative std ~sqrt(2 / n); 6 of those bound each check (a fixed seed, so it
    fails only if the construction is wrong).
    """
    k, b, power = 3, 40_000, 2.0
    grad, y = blob_batch(b, k) if make == "blob" else line_batch(b)
    sol = marvell_solution(grad, y, power)
    assert sol is not None
    out = marvell_noise(grad, y, power, gen(11))
    e, s0, s1 = sol.direction, *sol.covariance
    for cls in (0, 1):
        rows = y == cls
        n = int(rows.sum())
        expected = s0 + s1 + sol.along[cls] * torch.outer(e, e)
        measured = _covariance(out[rows])
        scale = float(torch.trace(expected))
        assert float((measured - expected).abs().max()) <= 6 * math.sqrt(2 / n) * scale
    p = sol.pos_fraction
    assert p * sol.along[1] + (1 - p) * sol.along[0] + sol.matching_cost == pytest.approx(sol.budget, rel=1e-9)
    assert float((out - grad).square().sum(dim=1).mean()) == pytest.approx(sol.budget, rel=0.05)


def test_rows_on_a_line_stay_on_it() -> None:
    """The cut layer's classes have no spread across e: the noise adds none either (the old solver added some to
    one class only, which gave the labels away to an attack on the minor axis)."""
    grad, y = line_batch(4096)
    out = marvell_noise(grad, y, 16.0, gen(2))
    across = out - (out @ W / W.norm()).unsqueeze(1) * W / W.norm()  # (B, 2), the part off the line
    assert float(across.norm(dim=1).max()) < 1e-12 * float(out.norm(dim=1).max())


SPLIT_CASES = [  # (u, v, p, P) in units of |g1 - g0|^2 = 1
    (0.01, 0.01, 0.25, 1.0),
    (0.05, 0.4, 0.25, 4.0),
    (0.4, 0.05, 0.1, 0.5),
    (0.0, 0.0, 0.5, 2.0),
    (0.2, 0.0, 0.7, 16.0),
]


@pytest.mark.parametrize(("u", "v", "p", "power"), SPLIT_CASES)
def test_along_split_beats_every_other_feasible_split(u: float, v: float, p: float, power: float) -> None:
    a0, a1 = along_split(power, u, v, 1.0, p)
    assert min(a0, a1) >= 0 and p * a1 + (1 - p) * a0 == pytest.approx(power, rel=1e-9)
    best = float(along_sum_kl(u, v, 1.0, a0, a1))
    assert math.isfinite(best)
    share = np.linspace(0, 1, 20_001)  # of the budget spent on the negatives
    others = along_sum_kl(u, v, 1.0, share * power / (1 - p), (1 - share) * power / p)
    assert best <= float(np.nanmin(others)) + 1e-9 * abs(best)


def test_leak_auc_falls_as_power_grows() -> None:
    """On the cut layer's real geometry the projection attack is perfect without noise and weakens with power.

    The same seed at every power (common random numbers: the noise only scales) makes the comparison exact rather
    than statistical; B = 20000 keeps each AUC's sampling error near 0.005, well under the gaps between powers.
    """
    grad, y = line_batch(20_000)
    assert leak_auc(grad, y) == 1.0
    aucs = [leak_auc(marvell_noise(grad, y, power, gen(5)), y) for power in POWERS]
    assert all(earlier > later for earlier, later in zip(aucs, aucs[1:], strict=False))
    assert aucs[0] < 0.9 and aucs[-1] < 0.6 and aucs[-1] > 0.45
    sum_kls = []
    for power in POWERS:
        sol = marvell_solution(grad, y, power)
        assert sol is not None
        sum_kls.append(sol.sum_kl)
    assert all(earlier > later for earlier, later in zip(sum_kls, sum_kls[1:], strict=False))


def test_marvell_hides_more_than_isotropic_noise_of_the_same_power() -> None:
    """The paper's point: at equal expected noise power per row, shaping the noise leaks less than isotropic noise."""
    grad, y = line_batch(20_000)
    for power in (1.0, 4.0):
        sol = marvell_solution(grad, y, power)
        assert sol is not None
        bound = float(grad.norm(dim=1).max())  # no row is clipped: the isotropic noise is the only change
        ratio = math.sqrt(sol.budget / 2) / bound  # per-coordinate variance P / k, k = 2
        iso = perturb_gradients(grad, bound, ratio, gen(5))
        assert leak_auc(marvell_noise(grad, y, power, gen(5)), y) < leak_auc(iso, y) - 0.02
