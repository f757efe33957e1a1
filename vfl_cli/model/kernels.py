"""Which CPU GEMM runs a party's dense layers: torch's own `F.linear` ("mkl": MKL's sgemm in fp32) or oneDNN
("onednn": `torch.ops.mkldnn._linear_pointwise` for the forward and both matmuls of the backward), chosen per
machine from `parties.<key>.gemm` (auto | mkl | onednn).

    choose_gemm   the path: "mkl" / "onednn" as set; "auto" times both at the party's first layer's shape for a
                  moment (~0.3 s, cached per process) and keeps the faster, or keeps "mkl" without timing when the
                  layer is too small to matter (< MIN_TIMED_GFLOP per step)
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
TIMED_GFLOP = 2.0  # each timed matmul does about this much work: ~13 ms at 150 GFLOP/s (fewer rows, same widths)
TIME_BOX_S = 0.4  # "auto" stops timing after this much (both paths), whatever it has
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


def gemm_gflops(path: GemmPath, shape: Shape, dtype: torch.dtype = torch.float32, reps: int = 3,
                threads: int | None = None, time_box_s: float = float("inf")) -> GemmSpeed:
    """Times `reps` forward+backward passes of one linear layer at `shape` on `path` (after one untimed), on
    `threads` torch threads (else the current number), stopping early once `time_box_s` has passed."""
    rows, d_in, d_out = shape
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(rows, d_in, generator=generator).to(dtype).requires_grad_()
        weight = (torch.randn(d_out, d_in, generator=generator) * d_in ** -0.5).to(dtype).requires_grad_()
        bias = torch.zeros(d_out, dtype=dtype, requires_grad=True)
        grad = torch.randn(rows, d_out, generator=generator).to(dtype)
        linear = onednn_linear if path == "onednn" else F.linear
        forward_s = backward_s = step_s = float("inf")
        started = time.perf_counter()
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            y = linear(x, weight, bias)
            t1 = time.perf_counter()
            y.backward(grad)
            t2 = time.perf_counter()
            x.grad = weight.grad = bias.grad = None
            if rep:  # the first is a warm-up (oneDNN builds its primitives there)
                forward_s, backward_s, step_s = min(forward_s, t1 - t0), min(backward_s, t2 - t1), min(step_s, t2 - t0)
            if rep and t2 - started > time_box_s:
                break
    finally:
        torch.set_num_threads(before)
    flop = step_gflop(shape) / 3  # one matmul
    return GemmSpeed(flop / forward_s, 2 * flop / backward_s, 3 * flop / step_s)


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

    def describe(self) -> str:
        rows, d_in, d_out = self.shape
        at = f"[{rows}, {d_in}] x [{d_in}, {d_out}] {'bf16' if self.bf16 else 'fp32'}, {self.threads} thread(s)"
        if self.setting != "auto":
            return f"gemm: {self.path} (set in the job; first layer {at})"
        if self.mkl_gflops is None or self.onednn_gflops is None:
            return (f"gemm: {self.path} (auto: first layer {at} is {step_gflop(self.shape):.2f} GFLOP per step, "
                    f"under {MIN_TIMED_GFLOP}: not timed, the default kept)")
        return (f"gemm: {self.path} (auto, timed at {at}: mkl {self.mkl_gflops:.1f} GFLOP/s, "
                f"onednn {self.onednn_gflops:.1f} GFLOP/s)")


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
    rows, d_in, d_out = shape
    timed_rows = max(1, min(rows, round(TIMED_GFLOP * 1e9 / (2 * d_in * d_out))))  # the same layer, fewer rows
    dtype = torch.bfloat16 if bf16 else torch.float32
    budget = TIME_BOX_S / 2
    mkl = gemm_gflops("mkl", (timed_rows, d_in, d_out), dtype, threads=threads, time_box_s=budget).step
    onednn = gemm_gflops("onednn", (timed_rows, d_in, d_out), dtype, threads=threads, time_box_s=budget).step
    path: GemmPath = "onednn" if onednn > MARGIN * mkl else DEFAULT_PATH
    return GemmChoice(path, "auto", shape, threads, bf16, mkl, onednn)
