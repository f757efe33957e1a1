"""FTRL-Proximal, the optimiser of the wide (linear) part: owns the update rule and its per-coordinate state.

The rule is TensorFlow's `ApplyFtrl` / MindSpore's `FTRL` with lr_power = -0.5 (McMahan et al. 2013), per
coordinate, with accumulators n (starts at `initial_accumulator`) and z (starts at 0):

    n_new = n + g^2
    sigma = (sqrt(n_new) - sqrt(n)) / lr
    z     = z + g - sigma * w
    n     = n_new
    w     = 0                                               if |z| <= l1
            -(z - sign(z) * l1) / (sqrt(n) / lr + 2 * l2)   otherwise

That is TensorFlow's convention `quadratic = 1 / lr * n^0.5 + 2 * l2` (the l2 term is doubled, and it is
not divided by lr).

Which coordinates move: only those whose gradient in this step is non-zero. TensorFlow and MindSpore apply
FTRL sparsely, to the rows an embedding lookup touched, so untouched rows keep their initial weights. A dense
rule applied to an untouched coordinate would leave n and z unchanged but recompute w from them, and with
z = 0 that sets a never-updated weight to 0; masking by `g != 0` avoids that and equals the sparse update
on every row whose gradient is non-zero. (A touched coordinate whose gradient happens to be exactly 0 is
left alone too, where TensorFlow would recompute it; after its first real update that gives the same w.)

Sparse gradients (`nn.Embedding(..., sparse=True)`) are supported: the rule runs on the touched rows only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class Ftrl(torch.optim.Optimizer):
    """FTRL-Proximal with lr_power = -0.5 (TensorFlow convention, see the module docstring).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> opt = Ftrl([w], lr=0.05, l1=1e-8, l2=1e-8, initial_accumulator=1.0)
        >>> w.grad = torch.tensor([1.0, 0.0, -2.0])
        >>> opt.step()  # w[1] has no gradient and keeps its value
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 5e-2,
        l1: float = 0.0,
        l2: float = 0.0,
        initial_accumulator: float = 1.0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"FTRL lr must be positive, got {lr}")
        if l1 < 0 or l2 < 0:
            raise ValueError(f"FTRL l1 and l2 must be >= 0, got l1={l1}, l2={l2}")
        if initial_accumulator < 0:
            raise ValueError(f"FTRL initial_accumulator must be >= 0, got {initial_accumulator}")
        defaults = {"lr": lr, "l1": l1, "l2": l2, "initial_accumulator": initial_accumulator}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["n"] = torch.full_like(
                        p, group["initial_accumulator"], memory_format=torch.preserve_format
                    )
                    state["z"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if p.grad.is_sparse:
                    _sparse_update(p, p.grad, state["n"], state["z"], group)
                else:
                    w, n, z = _ftrl_update(p, p.grad, state["n"], state["z"], group)
                    p.copy_(w)
                    state["n"].copy_(n)
                    state["z"].copy_(z)
        return loss


def _ftrl_update(
    w: Tensor, g: Tensor, n: Tensor, z: Tensor, group: dict[str, Any]
) -> tuple[Tensor, Tensor, Tensor]:
    """One FTRL step on aligned tensors; returns the new (w, n, z). Coordinates with g == 0 are unchanged."""
    lr, l1, l2 = group["lr"], group["l1"], group["l2"]
    g2 = g * g
    n_new = n + g2
    sqrt_n, sqrt_n_new = n.sqrt(), n_new.sqrt()
    # sqrt(n_new) - sqrt(n) written as g^2 / (sqrt(n_new) + sqrt(n)): the same number without the float32
    # cancellation when g is small against n. The guard only matters when n = g = 0, where sigma is 0.
    sigma = g2 / (sqrt_n_new + sqrt_n).clamp_min(torch.finfo(w.dtype).tiny) / lr
    z_new = z + g - sigma * w
    quadratic = sqrt_n_new / lr + 2 * l2
    w_solved = torch.where(z_new.abs() > l1, (torch.sign(z_new) * l1 - z_new) / quadratic, 0.0)
    # g == 0 leaves n and z as they were by the formulas; w must be kept explicitly (module docstring).
    w_new = torch.where(g != 0, w_solved, w)
    return w_new, n_new, z_new


def _sparse_update(p: Tensor, grad: Tensor, n: Tensor, z: Tensor, group: dict[str, Any]) -> None:
    """Apply the rule to the rows a sparse gradient touches; duplicate indices are summed first."""
    grad = grad.coalesce()
    rows = grad.indices()[0]
    w, n_rows, z_rows = _ftrl_update(p[rows], grad.values(), n[rows], z[rows], group)
    p.index_copy_(0, rows, w)
    n.index_copy_(0, rows, n_rows)
    z.index_copy_(0, rows, z_rows)
