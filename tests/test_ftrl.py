"""FTRL-Proximal against its closed form, a per-coordinate reference, and the sparse/untouched-row rules."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from vfl_cli.model.ftrl import Ftrl


def _step(opt: Ftrl, param: torch.nn.Parameter, grad: list[float] | torch.Tensor) -> None:
    param.grad = torch.as_tensor(grad, dtype=param.dtype)
    opt.step()


def test_three_steps_match_hand_computed_values() -> None:
    # accumulators 9 -> 25 -> 169 keep the square roots whole (3, 5, 13): every value below is exact.
    w = torch.nn.Parameter(torch.tensor([0.5, 0.9, 0.3], dtype=torch.float64))
    opt = Ftrl([w], lr=0.5, l1=1.0, l2=0.25, initial_accumulator=9.0)

    _step(opt, w, [4.0, 4.0, 0.0])
    # c0: sigma = (5-3)/0.5 = 4, z = 4 - 4*0.5 = 2, w = -(2-1)/(5/0.5 + 2*0.25) = -2/21
    # c1: z = 4 - 4*0.9 = 0.4 <= l1 -> 0;  c2: no gradient, keeps 0.3
    torch.testing.assert_close(w.detach(), torch.tensor([-2 / 21, 0.0, 0.3], dtype=torch.float64))

    _step(opt, w, [12.0, 0.0, 4.0])
    # c0: sigma = (13-5)/0.5 = 16, z = 2 + 12 + 16*2/21 = 326/21, w = -(326/21 - 1)/(26 + 0.5) = -610/1113
    # c2: first update, z = 4 - 4*0.3 = 2.8, w = -(2.8-1)/10.5 = -6/35
    torch.testing.assert_close(w.detach(), torch.tensor([-610 / 1113, 0.0, -6 / 35], dtype=torch.float64))

    _step(opt, w, [0.0, -12.0, 0.0])
    # c1: sigma = 16, z = 0.4 - 12 - 16*0 = -11.6, w = -(-11.6 + 1)/26.5 = 0.4
    torch.testing.assert_close(w.detach(), torch.tensor([-610 / 1113, 0.4, -6 / 35], dtype=torch.float64))
    state = opt.state[w]
    torch.testing.assert_close(state["n"], torch.tensor([169.0, 169.0, 25.0], dtype=torch.float64))
    torch.testing.assert_close(state["z"], torch.tensor([326 / 21, -11.6, 2.8], dtype=torch.float64))


def _reference_step(
    w: float, n: float, z: float, g: float, lr: float, l1: float, l2: float
) -> tuple[float, float, float]:
    """TensorFlow's ApplyFtrl for one coordinate, lr_power = -0.5, written as the docs state it."""
    if g == 0.0:
        return w, n, z
    n_new = n + g * g
    z = z + g - (math.sqrt(n_new) - math.sqrt(n)) / lr * w
    quadratic = 1.0 / lr * math.sqrt(n_new) + 2.0 * l2
    w = (math.copysign(l1, z) - z) / quadratic if abs(z) > l1 else 0.0
    return w, n_new, z


def test_matches_per_coordinate_reference_on_random_gradients() -> None:
    gen = torch.Generator().manual_seed(3)
    lr, l1, l2, acc = 0.05, 0.02, 0.01, 1.0
    w0 = torch.randn(6, 4, generator=gen, dtype=torch.float64) * 0.1
    param = torch.nn.Parameter(w0.clone())
    opt = Ftrl([param], lr=lr, l1=l1, l2=l2, initial_accumulator=acc)
    ref: list[list[tuple[float, float, float]]] = [
        [(w0[i, j].item(), acc, 0.0) for j in range(4)] for i in range(6)
    ]
    for _ in range(5):
        grad = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        grad[torch.rand(6, 4, generator=gen) < 0.3] = 0.0  # some coordinates sit steps out
        _step(opt, param, grad)
        ref = [
            [_reference_step(*ref[i][j], grad[i, j].item(), lr, l1, l2) for j in range(4)] for i in range(6)
        ]
        expected = torch.tensor([[c[0] for c in row] for row in ref], dtype=torch.float64)
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-12)


def test_untouched_embedding_rows_keep_their_initial_weights() -> None:
    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 3)
    initial = table.weight.detach().clone()
    opt = Ftrl(table.parameters(), lr=0.05, l1=1e-8, l2=1e-8, initial_accumulator=1.0)
    table(torch.tensor([1, 2, 2])).sum().backward()
    opt.step()
    untouched = [0, *range(3, 10)]
    torch.testing.assert_close(table.weight.detach()[untouched], initial[untouched], rtol=0, atol=0)
    assert not torch.equal(table.weight.detach()[[1, 2]], initial[[1, 2]])


def test_sparse_gradients_give_the_dense_result() -> None:
    torch.manual_seed(0)
    dense = torch.nn.Embedding(12, 2)
    sparse = torch.nn.Embedding(12, 2, sparse=True)
    sparse.load_state_dict(dense.state_dict())
    opts = [Ftrl(m.parameters(), lr=0.1, l1=0.01, l2=0.01) for m in (dense, sparse)]
    for ids in ([1, 5, 5, 7], [0, 1, 11], [5]):
        for model, opt in zip((dense, sparse), opts, strict=True):
            opt.zero_grad()
            (model(torch.tensor(ids)) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(sparse.weight.detach(), dense.weight.detach(), rtol=0, atol=1e-7)


def test_state_dict_round_trip_continues_identically() -> None:
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(5, generator=gen) for _ in range(3)]
    a = torch.nn.Parameter(torch.randn(5, generator=gen))
    opt_a = Ftrl([a], lr=0.1, l1=0.05, l2=0.01, initial_accumulator=0.5)
    for g in grads[:2]:
        _step(opt_a, a, g)
    saved = copy.deepcopy(opt_a.state_dict())

    b = torch.nn.Parameter(a.detach().clone())
    opt_b = Ftrl([b], lr=0.1, l1=0.05, l2=0.01, initial_accumulator=0.5)
    opt_b.load_state_dict(saved)
    _step(opt_a, a, grads[2])
    _step(opt_b, b, grads[2])
    torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0)
    torch.testing.assert_close(opt_b.state[b]["z"], opt_a.state[a]["z"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [{"lr": 0.0}, {"lr": 0.1, "l1": -1.0}, {"lr": 0.1, "l2": -1.0}, {"lr": 0.1, "initial_accumulator": -1}],
)
def test_rejects_invalid_hyperparameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="FTRL"):
        Ftrl([torch.nn.Parameter(torch.zeros(1))], **kwargs)
