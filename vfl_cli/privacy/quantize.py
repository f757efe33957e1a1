"""Min-max quantisation of a wire tensor to 1..8 bits per value, bit-packed, with min and max sent beside.

Either party may quantise what it sends (embeddings or gradients). It is compression first: 6 bits cost 0.75 byte
per value instead of float32's 4. As a defence it is weak and only incidental: it hides the low-order bits of
each value from the receiving party (a coarse grid also blurs the gradient norm the follower could read), but at
2+ bits the sign of a [B, 1] gradient still comes through. It costs accuracy through the rounding error, at most
half a step, (max - min) / (2^bits - 1) / 2 per value.

Packed layout (what the transport will put on the wire): value i's code occupies bits [i*bits, (i+1)*bits) of the
byte string, least significant bit first, bytes filled from their least significant bit (numpy's
bitorder="little"); the last byte's unused high bits are zero. Length is exactly ceil(n * bits / 8) bytes.
`QuantizedTensor` validates itself on construction, so a decoder that builds one from untrusted fields gets a
ValueError naming the problem instead of a wrong tensor: among others, min and max within float32's finite range,
so that every value it dequantises to is finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

MIN_BITS = 1
MAX_BITS = 8
FLOAT32_MAX = float(np.finfo(np.float32).max)  # min and max beyond it would dequantise to infinity


def _check_bits(bits: int) -> None:
    # bool is an int; True would silently mean 1 bit.
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def packed_size(n: int, bits: int) -> int:
    """Bytes holding n values of `bits` bits each: ceil(n * bits / 8)."""
    _check_bits(bits)
    return (n * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack integer codes [n] in 0..2^bits-1 into ceil(n * bits / 8) bytes, little-endian bit order."""
    _check_bits(bits)
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must lie in 0..{(1 << bits) - 1} for {bits} bits")
    shifts = np.arange(bits, dtype=np.uint8)
    bit_matrix = (codes.astype(np.uint8)[:, None] >> shifts) & 1  # (n, bits), least significant bit first
    return np.packbits(bit_matrix.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, n: int, bits: int) -> np.ndarray:
    """Inverse of `pack_bits`: n codes as uint8 [n]. Raises ValueError when data is not exactly what n and bits pack to.

    Checks the length (ceil(n * bits / 8) bytes) and that the unused bits of the last byte are zero, so every value
    has one encoding; this is the check the transport relies on for untrusted input.
    """
    _check_packed(data, n, bits)
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    raw = np.frombuffer(data, dtype=np.uint8)
    bit_matrix = np.unpackbits(raw, count=n * bits, bitorder="little").reshape(n, bits)  # (n, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (bit_matrix.astype(np.uint16) @ weights).astype(np.uint8)


def _check_packed(data: bytes, n: int, bits: int) -> None:
    _check_bits(bits)
    if n < 0:
        raise ValueError(f"value count must be >= 0, got {n}")
    expected = packed_size(n, bits)
    if len(data) != expected:
        raise ValueError(
            f"packed data is {len(data)} bytes, but {n} values of {bits} bits take exactly {expected} bytes"
        )
    used = (n * bits) % 8
    if used and data[-1] >> used:
        raise ValueError(f"packed data's last byte has non-zero padding bits above bit {used}")


@dataclass(frozen=True)
class QuantizedTensor:
    """A float tensor as bit-packed codes: value = min + code * (max - min) / (2^bits - 1).

    data: ceil(numel * bits / 8) bytes (layout in the module docstring); shape: the original shape; min and max:
    the original tensor's extremes, exact float32 values (so float32 carries them losslessly).
    """

    data: bytes
    shape: tuple[int, ...]
    bits: int
    min: float
    max: float

    def __post_init__(self) -> None:
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in self.shape):
            raise ValueError(f"shape must be non-negative integers, got {self.shape!r}")
        if not (math.isfinite(self.min) and math.isfinite(self.max)) or self.min > self.max:
            raise ValueError(f"min and max must be finite with min <= max, got min={self.min} max={self.max}")
        if max(-self.min, self.max) > FLOAT32_MAX:
            raise ValueError(f"min and max must lie within float32's range, got min={self.min} max={self.max}")
        # The range check implies this; it is kept so that no change to the formula can let infinities through.
        # Dequantising is monotonic in the code (each rounding step is), so the ends bound every value.
        with np.errstate(over="ignore"):  # an overflow is what this looks for: no warning about it
            ends = _values(np.array([0, (1 << self.bits) - 1]), self.bits, self.min, self.max)
        if not np.isfinite(ends).all():
            raise ValueError(f"min={self.min} and max={self.max} dequantise to {ends.tolist()}, not finite")
        _check_packed(self.data, math.prod(self.shape), self.bits)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def quantize(t: Tensor, bits: int, generator: torch.Generator | None = None) -> QuantizedTensor:
    """Quantise t (any shape, finite values) to `bits` bits per value on the grid spanning [t.min(), t.max()].

    Without a generator each value goes to the nearest of 2^bits evenly spaced levels, so the round-trip error is
    at most half a step. With one, it goes to the level below or above at random, up with probability equal to its
    distance from the level below in steps (stochastic rounding): the error is under one step but zero on
    average, which is what a gradient needs. Nearest rounding of gradients is biased (at 2 bits it sends every
    small gradient of a batch the same way, and training diverges); the loop rounds gradients stochastically.
    A constant tensor (max == min) becomes all-zero codes and round-trips exactly.

    Example: t [B, 1] float32, bits 6 -> QuantizedTensor with ceil(B * 6 / 8) bytes of data.
    """
    _check_bits(bits)
    # float64 for the arithmetic: codes and the error bound should not depend on float32 rounding of (x - min).
    x = t.detach().to("cpu", torch.float32).numpy().astype(np.float64).reshape(-1)  # (n,)
    if x.size and not np.isfinite(x).all():
        raise ValueError("cannot quantise a tensor with NaN or infinite values")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    levels = (1 << bits) - 1
    if hi > lo:
        scaled = (x - lo) / (hi - lo) * levels  # (n,) in [0, levels]
        if generator is None:
            rounded = np.rint(scaled)
        else:
            uniform = torch.rand(x.size, generator=generator, dtype=torch.float64).numpy()  # (n,)
            rounded = np.floor(scaled + uniform)
        codes = np.clip(rounded, 0, levels).astype(np.uint8)
    else:
        codes = np.zeros(x.size, dtype=np.uint8)
    return QuantizedTensor(pack_bits(codes, bits), tuple(t.shape), bits, lo, hi)


def dequantize(q: QuantizedTensor) -> Tensor:
    """Float32 tensor of q.shape from q's codes: min + code * (max - min) / (2^bits - 1)."""
    codes = unpack_bits(q.data, q.numel, q.bits)  # (n,)
    return torch.from_numpy(_values(codes, q.bits, q.min, q.max)).reshape(q.shape)


def _values(codes: np.ndarray, bits: int, lo: float, hi: float) -> np.ndarray:
    """float32 [n] of codes [n]: lo + code * (hi - lo) / (2^bits - 1)."""
    levels = (1 << bits) - 1
    # code / levels first, so code = levels gives min + (max - min): both ends come back to float64 rounding.
    values = lo + codes.astype(np.float64) / levels * (hi - lo)
    return values.astype(np.float32)
