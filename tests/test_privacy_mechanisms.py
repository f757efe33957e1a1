"""Cut-layer defences: flip rates against binomial bounds, noise scale, clipping, "off" is bitwise, quantisation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from vfl_cli.privacy import (
    QuantizedTensor,
    dequantize,
    embedding_dp,
    flip_probability,
    one_bit_rr,
    pack_bits,
    packed_size,
    perturb_gradients,
    quantize,
    randomized_response,
    unpack_bits,
)

N = 100_000
EPSILONS = (0.5, 1.0, 2.0, 4.0)
Defence = Callable[[torch.Tensor, float, float, torch.Generator], torch.Tensor]  # the clip + noise pair


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def binomial_bound(p: float, n: int) -> float:
    """Four standard deviations of an observed rate: a fixed-seed test that fails only if the rate is wrong."""
    return 4 * math.sqrt(p * (1 - p) / n)


# ---- randomised response on labels ----


def test_flip_probability_values() -> None:
    assert flip_probability(0.0) == 0.5
    assert flip_probability(math.inf) == 0.0
    for eps in EPSILONS:
        assert flip_probability(eps) == pytest.approx(1 / (math.exp(eps) + 1), rel=1e-12)
    assert flip_probability(1000.0) == 0.0  # no overflow
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match="eps must be >= 0"):
            flip_probability(bad)


def uniforms(labels: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.rand(labels.shape[:1], generator=gen(seed))


@pytest.mark.parametrize("eps", EPSILONS)
def test_randomized_response_flips_at_the_stated_rate(eps: float) -> None:
    labels = (torch.rand(N, generator=gen(1)) < 0.3).float()
    noisy = randomized_response(labels, eps, uniforms(labels, 2))
    p = 1 / (math.exp(eps) + 1)  # the stated rate, not the code under test
    observed = (noisy != labels).double().mean().item()
    assert abs(observed - p) <= binomial_bound(p, N)
    # both classes flip at the same rate (the mechanism does not look at the label's value)
    for cls in (0.0, 1.0):
        mask = labels == cls
        rate = (noisy[mask] != labels[mask]).double().mean().item()
        assert abs(rate - p) <= binomial_bound(p, int(mask.sum()))


def test_randomized_response_keeps_labels_binary_dtype_and_shape() -> None:
    labels = (torch.rand(1000, generator=gen(3)) < 0.5).float()
    noisy = randomized_response(labels, 0.5, uniforms(labels, 4))
    assert noisy.dtype == labels.dtype and noisy.shape == labels.shape
    assert bool(((noisy == 0) | (noisy == 1)).all())


def test_randomized_response_at_large_eps_flips_nothing() -> None:
    labels = (torch.rand(N, generator=gen(5)) < 0.5).float()
    assert torch.equal(randomized_response(labels, 50.0, uniforms(labels, 6)), labels)


def test_randomized_response_is_reproducible_from_the_seed() -> None:
    labels = (torch.rand(5000, generator=gen(7)) < 0.5).float()
    first = randomized_response(labels, 1.0, uniforms(labels, 8))
    assert torch.equal(first, randomized_response(labels, 1.0, uniforms(labels, 8)))
    assert not torch.equal(first, randomized_response(labels, 1.0, uniforms(labels, 9)))


def test_randomized_response_refuses_non_binary_labels() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        randomized_response(torch.tensor([0.0, 0.5, 1.0]), 1.0, torch.zeros(3))
    with pytest.raises(ValueError, match="1-d"):
        randomized_response(torch.zeros(4, 1), 1.0, torch.zeros(4))


# ---- gradient perturbation and embedding DP (clip + Gaussian noise) ----


def clip_reference(x: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Independent per-row clipping, float64: x_i * min(1, C / ||x_i||)."""
    x64 = x.double()
    norms = x64.norm(dim=1, keepdim=True)
    return x64 * torch.clamp(clip_norm / norms, max=1.0)


@pytest.mark.parametrize("defence", [perturb_gradients, embedding_dp])
@pytest.mark.parametrize("ratio", [0.25, 1.0, 3.0])
def test_noise_std_is_ratio_times_clip_norm(defence: Defence, ratio: float) -> None:
    grad = torch.randn(N // 2, 2, generator=gen(10)) * 0.01  # (B, k): half the rows above the bound
    clip_norm = 0.01
    noise = (defence(grad, clip_norm, ratio, gen(11)).double() - clip_reference(grad, clip_norm)).reshape(-1)
    expected = ratio * clip_norm
    # The sample std of n normals has relative standard deviation ~ 1 / sqrt(2n); allow four of them.
    n = noise.numel()
    assert noise.std().item() == pytest.approx(expected, rel=4 / math.sqrt(2 * n))
    assert abs(noise.mean().item()) <= 4 * expected / math.sqrt(n)


def test_doubling_the_noise_ratio_doubles_the_noise() -> None:
    grad = torch.randn(20_000, 1, generator=gen(12))
    clipped = perturb_gradients(grad, 0.5, 0.0, gen())
    once = perturb_gradients(grad, 0.5, 0.7, gen(13)) - clipped
    twice = perturb_gradients(grad, 0.5, 1.4, gen(13)) - clipped
    # Same seed, same standard normals: the noise itself doubles, not just its std.
    torch.testing.assert_close(twice, 2 * once, rtol=1e-5, atol=1e-6)
    # And with independent seeds the std ratio is 2 within the sampling tolerance.
    other = perturb_gradients(grad, 0.5, 1.4, gen(14)) - clipped
    assert other.std().item() / once.std().item() == pytest.approx(2.0, rel=8 / math.sqrt(2 * grad.numel()))


@pytest.mark.parametrize("defence", [perturb_gradients, embedding_dp])
def test_clipping_bounds_each_rows_norm(defence: Defence) -> None:
    x = torch.randn(5000, 3, generator=gen(15)) * torch.rand(5000, 1, generator=gen(16)) * 4  # norms 0..~15
    x[0] = 0.0  # a zero row must not divide by zero
    clip_norm = 1.5
    out = defence(x, clip_norm, 0.0, gen())
    norms, out_norms = x.norm(dim=1), out.norm(dim=1)
    assert bool((out_norms <= clip_norm * (1 + 1e-6)).all())
    inside = norms <= clip_norm
    assert torch.equal(out[inside], x[inside])  # rows within the bound pass bitwise
    assert out_norms[~inside] == pytest.approx(torch.full_like(out_norms[~inside], clip_norm), rel=1e-6)
    cosine = torch.nn.functional.cosine_similarity(out[~inside], x[~inside], dim=1)
    assert bool((cosine > 1 - 1e-6).all())  # clipping keeps the direction
    torch.testing.assert_close(out.double(), clip_reference(x, clip_norm), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("defence", [perturb_gradients, embedding_dp])
def test_off_returns_the_input_bitwise_and_draws_nothing(defence: Defence) -> None:
    x = torch.randn(257, 1, generator=gen(17)) * 1e-3
    x[3] = -0.0
    generator = gen(18)
    state = generator.get_state()
    out = defence(x, math.inf, 0.0, generator)
    assert torch.equal(out, x)
    assert torch.equal(out.view(torch.int32), x.view(torch.int32))  # bit patterns, including -0.0
    assert out.data_ptr() != x.data_ptr()  # a copy: the caller may modify either
    assert torch.equal(generator.get_state(), state)  # the run's random stream is untouched


def test_gaussian_defences_refuse_bad_parameters() -> None:
    x = torch.zeros(4, 1)
    with pytest.raises(ValueError, match="finite clip_norm"):
        perturb_gradients(x, math.inf, 0.5, gen())
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        embedding_dp(x, 0.0, 0.5, gen())
    with pytest.raises(ValueError, match="noise multiplier"):
        perturb_gradients(x, 1.0, -1.0, gen())
    with pytest.raises(ValueError, match=r"\[B, k\]"):
        perturb_gradients(torch.zeros(4), 1.0, 0.5, gen())


# ---- one-bit randomised response on embeddings ----


@pytest.mark.parametrize("eps", EPSILONS)
def test_one_bit_rr_flips_signs_at_the_stated_rate(eps: float) -> None:
    emb = torch.randn(N // 2, 2, generator=gen(20))
    out = one_bit_rr(emb, eps, gen(21), scale=0.5)
    assert out.shape == emb.shape and out.dtype == emb.dtype
    assert bool(((out == 0.5) | (out == -0.5)).all())
    p = 1 / (math.exp(eps) + 1)  # the stated rate, not the code under test
    observed = ((out > 0) != (emb >= 0)).double().mean().item()
    assert abs(observed - p) <= binomial_bound(p, N)


def test_one_bit_rr_at_large_eps_is_the_sign() -> None:
    emb = torch.randn(1000, 1, generator=gen(22)).double()
    emb[0] = 0.0  # the threshold: 0 counts as positive
    out = one_bit_rr(emb, 50.0, gen(23))
    assert torch.equal(out, torch.where(emb >= 0, 1.0, -1.0).double())
    assert not out.requires_grad


# ---- quantisation ----


@pytest.mark.parametrize("bits", range(1, 9))
def test_quantize_error_is_at_most_half_a_step(bits: int) -> None:
    x = torch.randn(10_001, generator=gen(30)) * 3 + 1  # odd count: the last byte is partly padding
    q = quantize(x, bits)
    back = dequantize(q)
    half_step = (q.max - q.min) / (2**bits - 1) / 2
    assert q.min == x.min().item() and q.max == x.max().item()
    error = (back.double() - x.double()).abs().max().item()
    assert error <= half_step * (1 + 1e-6) + 1e-6 * max(abs(q.min), abs(q.max))
    assert back.dtype == torch.float32


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 1000, 1003])
def test_packed_size_is_exact(bits: int, n: int) -> None:
    q = quantize(torch.linspace(-1, 1, n), bits)
    assert len(q.data) == math.ceil(n * bits / 8) == packed_size(n, bits)


def test_six_bits_take_three_quarters_of_a_byte_per_value() -> None:
    for n in (4, 400, 4096):
        assert len(quantize(torch.randn(n, 1, generator=gen(31)), 6).data) == 0.75 * n


def test_packing_layout_is_little_endian() -> None:
    # 2-bit codes 0, 1, 2, 3 -> bits (LSB first) 00 10 01 11 -> byte 0b11100100
    assert pack_bits(np.array([0, 1, 2, 3]), 2) == bytes([0b11100100])
    assert quantize(torch.tensor([0.0, 1.0, 2.0, 3.0]), 2).data == bytes([0b11100100])
    # 3-bit codes 5 (bits 0-2), 7 (bits 3-5), then 6 = 110 across the byte boundary (bits 6-8)
    assert pack_bits(np.array([5, 7, 6]), 3) == bytes([0b10_111_101, 0b1])
    codes = np.random.default_rng(32).integers(0, 2**5, 999)
    assert np.array_equal(unpack_bits(pack_bits(codes, 5), 999, 5), codes)


@pytest.mark.parametrize("value", [0.0, -2.5, 3.0e-8, 1.0e6])
@pytest.mark.parametrize("bits", [1, 6, 8])
def test_constant_tensors_round_trip_exactly(value: float, bits: int) -> None:
    x = torch.full((3, 5), value)
    back = dequantize(quantize(x, bits))
    assert torch.equal(back, x)


@pytest.mark.parametrize("shape", [(), (0,), (17,), (64, 1), (3, 5, 7)])
def test_shape_is_preserved(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=gen(33))
    q = quantize(x, 4)
    assert q.shape == shape
    assert dequantize(q).shape == shape


def test_extremes_come_back_exactly() -> None:
    x = torch.randn(1000, generator=gen(34))
    back = dequantize(quantize(x, 3))
    assert back.min().item() == x.min().item() and back.max().item() == x.max().item()


@pytest.mark.parametrize("bits", [0, 9, -1, True, 2.0])
def test_bad_bits_are_refused(bits: Any) -> None:
    with pytest.raises(ValueError, match="bits must be an integer in 1..8"):
        quantize(torch.zeros(4), bits)
    with pytest.raises(ValueError, match="bits must be an integer in 1..8"):
        unpack_bits(b"\x00", 1, bits)


def test_non_finite_values_are_refused() -> None:
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="NaN or infinite"):
            quantize(torch.tensor([0.0, bad]), 4)


def test_truncated_or_padded_data_is_refused_on_unpack() -> None:
    q = quantize(torch.randn(10, generator=gen(35)), 6)  # 60 bits -> 8 bytes, 4 bits of padding
    assert len(q.data) == 8
    with pytest.raises(ValueError, match="packed data is 7 bytes, but 10 values of 6 bits take exactly 8 bytes"):
        unpack_bits(q.data[:-1], 10, 6)
    with pytest.raises(ValueError, match="take exactly 8 bytes"):
        unpack_bits(q.data + b"\x00", 10, 6)
    with pytest.raises(ValueError, match="non-zero padding"):
        unpack_bits(q.data[:-1] + bytes([q.data[-1] | 0x80]), 10, 6)
    # A decoder building the record from untrusted fields gets the same refusal before any unpacking.
    with pytest.raises(ValueError, match="take exactly"):
        QuantizedTensor(q.data[:-1], q.shape, q.bits, q.min, q.max)
    with pytest.raises(ValueError, match="take exactly"):
        QuantizedTensor(q.data, (10**12,), q.bits, q.min, q.max)  # a huge shape fails on length, allocates nothing
    with pytest.raises(ValueError, match="min <= max"):
        QuantizedTensor(q.data, q.shape, q.bits, 1.0, 0.0)
    with pytest.raises(ValueError, match="shape"):
        QuantizedTensor(q.data, (-10,), q.bits, q.min, q.max)
