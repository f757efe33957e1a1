"""Which CPU GEMM runs a party's dense layers: torch's own `F.linear` ("mkl": MKL's sgemm in fp32) or oneDNN
("onednn": `torch.ops.mkldnn._linear_pointwise` for the forward and both matmuls of the backward), chosen per
machine from `parties.<key>.gemm` (auto | mkl | onednn).

    choose_gemm   the path: "mkl" / "onednn" as set; "auto" times both at the party's first layer's own shape
                  at start (~2 s in bf16, ~1.5 s in fp32 at the reference shape; cached per process) and keeps the
                  faster, or keeps "mkl" without timing when the layer is too small to matter (< MIN_TIMED_GFLOP)
    use_gemm      puts a built bottom's or top's `nn.Linear` layers on that path, in place: same parameters,
                  same `state_dict` keys, so checkpoints load whichever path wrote them
    gemm_gflops   a path's GFLOP/s at a shape, forward and backward (the benchmarks print it)

Both paths compute the same products; they differ in blocking and summation order only (float32 rounding,
rtol ~1e-6). Under bf16 autocast the oneDNN layer casts its input, weight and bias to bfloat16 as autocast does
for `F.linear`, so the two paths see the same operands.

Example:
    >>> choice = choose_gemm("auto", (16000, 1600, 1024), threads=1)  # [B, in] x [in, out]
    >>> use_gemm(bottom, choice.path)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

GemmPath = Literal["mkl", "onednn"]
GemmSetting = Literal["auto", "mkl", "onednn"]
Shape = tuple[int, int, int]  # (rows, in_features, out_features) of one linear layer's step
DEFAULT_PATH: GemmPath = "mkl"  # torch's F.linear, what an unset machine has always run
MIN_TIMED_GFLOP = 0.5  # below this per step (forward + backward) the choice cannot matter: keep the default
WARM_ROWS = 512  # "auto" warms each path up at this many rows (oneDNN builds its primitives) before timing
STEP_BUDGET_S = 0.25  # "auto" times as many of the layer's rows as one step of about this long allows
TIME_BOX_S = 1.5  # "auto" times another pair of steps (mkl, onednn) only while it fits in this; one pair always
MAX_PAIRS = 3
MARGIN = 1.05  # oneDNN must beat MKL by 5% to be chosen: closer than that is noise on a busy machine


def _pointwise(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T + bias on oneDNN: the entry point that takes dense (not `.to_mkldnn()`) tensors."""
    out: Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return out


class OneDnnLinearFunction(torch.autograd.Function):
    """y = x @ W.T + b; backward: dx = dy @ W, dW = dy.T @ x, db = sum(dy) over rows, the matmuls on oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _pointwise(x, weight, bias)  # (B, out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # (B, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _pointwise(grad, weight.t().contiguous(), None)  # (B, out) x (out, in) -> (B, in)
        if ctx.needs_input_grad[1]:
            grad_w = _pointwise(grad.t(), x.t(), None)  # (out, B) x (B, in) -> (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)  # (out,)
        return grad_x, grad_w, grad_b


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` on oneDNN, forward and backward, under bf16 autocast as `F.linear` is (bfloat16 operands and
    output); F.linear itself where oneDNN has nothing to do (not CPU, no input features, mixed dtypes, not 2-D)."""
    if torch.is_autocast_enabled("cpu") and x.is_cpu:
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)  # differentiable casts: their backward casts the grads back
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return onednn_linear(x, weight, bias)
    if (not x.is_cpu or x.dim() != 2 or weight.shape[1] == 0 or x.dtype != weight.dtype
            or x.dtype not in (torch.float32, torch.bfloat16) or (bias is not None and bias.dtype != x.dtype)):
        return F.linear(x, weight, bias)
    out: Tensor = OneDnnLinearFunction.apply(x, weight, bias)
    return out


class OneDnnLinear(nn.Linear):
    """`nn.Linear` whose forward and backward run on oneDNN; the same parameters and state_dict keys."""

    def forward(self, input: Tensor) -> Tensor:
        return onednn_linear(input, self.weight, self.bias)


def use_gemm(module: nn.Module, path: GemmPath) -> nn.Module:
    """Every `nn.Linear` in `module` on `path`, in place (the layer's class is swapped, its parameters stay the
    same objects, so optimisers built before or after and state_dicts are unaffected). Returns `module`."""
    cls = OneDnnLinear if path == "onednn" else nn.Linear
    for layer in module.modules():
        if type(layer) in (nn.Linear, OneDnnLinear):
            layer.__class__ = cls
    return module


# ----------------------------------------------------------------------------------------- measuring


def step_gflop(shape: Shape) -> float:
    """One layer's forward and backward at `shape`: three matmuls of 2 * rows * in * out flop each."""
    rows, d_in, d_out = shape
    return 3 * 2 * rows * d_in * d_out / 1e9


@dataclass(frozen=True)
class GemmSpeed:
    """A path's GFLOP/s at a shape, best of the timed reps."""

    forward: float
    backward: float  # grad input and grad weight together
    step: float  # forward and backward together


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _operands(shape: Shape, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, weight, bias (all requiring grad) and the output's gradient for one layer at `shape`, fixed seed."""
    rows, d_in, d_out = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.empty(rows, d_in).uniform_(-1, 1, generator=generator).to(dtype).requires_grad_()
    weight = torch.empty(d_out, d_in).uniform_(-d_in ** -0.5, d_in ** -0.5, generator=generator)
    bias = torch.zeros(d_out, dtype=dtype, requires_grad=True)
    grad = torch.empty(rows, d_out).uniform_(-1, 1, generator=generator).to(dtype)
    return x, weight.to(dtype).requires_grad_(), bias, grad


def _step_seconds(path: GemmPath, operands: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[float, float]:
    """One forward and one backward of the layer on `path`: their seconds."""
    x, weight, bias, grad = operands
    linear = onednn_linear if path == "onednn" else F.linear
    t0 = time.perf_counter()
    y = linear(x, weight, bias)
    t1 = time.perf_counter()
    y.backward(grad)
    t2 = time.perf_counter()
    x.grad = weight.grad = bias.grad = None
    return t1 - t0, t2 - t1


def gemm_gflops(path: GemmPath, shape: Shape, dtype: torch.dtype = torch.float32, reps: int = 3,
                threads: int | None = None) -> GemmSpeed:
    """Times `reps` forward+backward passes of one linear layer at `shape` on `path` (after one untimed), on
    `threads` torch threads (else the current number); the best of each."""
    with _torch_threads(threads):
        operands = _operands(shape, dtype)
        _step_seconds(path, operands)  # warm-up: oneDNN builds its primitives here
        forward_s, backward_s = (min(times) for times in zip(*(_step_seconds(path, operands) for _ in range(reps)),
                                                              strict=True))
    flop = step_gflop(shape) / 3  # one matmul
    return GemmSpeed(flop / forward_s, 2 * flop / backward_s, 3 * flop / (forward_s + backward_s))


@dataclass(frozen=True)
class GemmChoice:
    """The path a party runs and why; the GFLOP/s are a forward+backward step's, None where not measured."""

    path: GemmPath
    setting: GemmSetting
    shape: Shape
    threads: int
    bf16: bool
    mkl_gflops: float | None = None
    onednn_gflops: float | None = None
    timed_rows: int | None = None  # how many of the layer's rows "auto" timed

    def describe(self) -> str:
        rows, d_in, d_out = self.shape
        at = f"[{rows}, {d_in}] x [{d_in}, {d_out}] {'bf16' if self.bf16 else 'fp32'}, {self.threads} thread(s)"
        if self.setting != "auto":
            return f"gemm: {self.path} (set in the job; first layer {at})"
        if self.mkl_gflops is None or self.onednn_gflops is None:
            return (f"gemm: {self.path} (auto: first layer {at} is {step_gflop(self.shape):.2f} GFLOP per step, "
                    f"under {MIN_TIMED_GFLOP}: not timed, the default kept)")
        return (f"gemm: {self.path} (auto, first layer {at}, timed on {self.timed_rows} of its rows: mkl "
                f"{self.mkl_gflops:.1f} GFLOP/s, onednn {self.onednn_gflops:.1f} GFLOP/s)")


def choose_gemm(setting: GemmSetting, shape: Shape, threads: int, bf16: bool = False) -> GemmChoice:
    """The GEMM path for a party whose first dense layer is `shape` (rows = batch size), on `threads` threads,
    in bf16 or fp32. "auto" times both paths once per process per (shape, threads, precision); logs the choice."""
    if setting != "auto":
        choice = GemmChoice(setting, setting, shape, threads, bf16)
    elif step_gflop(shape) < MIN_TIMED_GFLOP:
        choice = GemmChoice(DEFAULT_PATH, setting, shape, threads, bf16)
    else:
        choice = _timed_choice(shape, threads, bf16)
    log.info("%s", choice.describe())
    return choice


@cache
def _timed_choice(shape: Shape, threads: int, bf16: bool) -> GemmChoice:
    """Both paths timed on as many of the layer's rows as one step of about STEP_BUDGET_S allows (the reference
    layer's 16,000 rows whole in bf16): with too few rows the operands sit in cache and the winner can change
    (bf16 on AMX: even at 610 rows, oneDNN 1.15x faster at 16,000; docs/kernels.md). Each path is warmed up at
    WARM_ROWS, which also gives the rows/s the budget is cut by; then mkl and onednn run alternately on the same
    operands, best of up to MAX_PAIRS pairs while the next pair fits in TIME_BOX_S."""
    rows, d_in, d_out = shape
    dtype = torch.bfloat16 if bf16 else torch.float32
    best: dict[GemmPath, float] = {"mkl": float("inf"), "onednn": float("inf")}
    with _torch_threads(threads):
        warm = _operands((min(rows, WARM_ROWS), d_in, d_out), dtype)
        for warmed in best:
            _step_seconds(warmed, warm)
        warm_s = min(sum(_step_seconds(path, warm)) for path in best)
        timed_rows = max(1, min(rows, round(STEP_BUDGET_S / warm_s * min(rows, WARM_ROWS))))
        operands = _operands((timed_rows, d_in, d_out), dtype)
        started = time.perf_counter()
        for _ in range(MAX_PAIRS):
            pair_started = time.perf_counter()
            for timed in best:
                best[timed] = min(best[timed], sum(_step_seconds(timed, operands)))
            pair_s = time.perf_counter() - pair_started
            if time.perf_counter() - started + pair_s > TIME_BOX_S:
                break
    gflop = step_gflop((timed_rows, d_in, d_out))
    mkl, onednn = gflop / best["mkl"], gflop / best["onednn"]
    path: GemmPath = "onednn" if onednn > MARGIN * mkl else DEFAULT_PATH
    return GemmChoice(path, "auto", shape, threads, bf16, mkl, onednn, timed_rows)
