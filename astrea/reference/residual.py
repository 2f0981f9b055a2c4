"""Reference of the stochastic residual, with a bit-exact copy of Triton's ``tl.rand``.

The kernel draws one uniform per mask unit (a ``[..., D]`` row, or a sample) with
``tl.rand(seed, offset + unit)``: Philox4x32-10 with key ``(seed_lo, seed_hi)`` and counter
``(lo32(offset + unit), hi32(offset + unit), 0, 0)``; the first output word, read as an
int32, folded to non-negative (``~x`` for negative ``x``) and scaled by ``4.6566127342e-10``
in fp32, is the uniform ``u``. A unit is kept when ``u < p``. :func:`philox_uniform`
repeats these steps on int64 tensors (32-bit words held in int64, products split in
16-bit halves so nothing overflows), so this module and the kernel give the same mask
bit for bit on any device.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUNDS = 10
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
# Largest fp32 scale with INT32_MAX * scale < 1 (triton.language.random.uint_to_uniform_float).
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(constant: int, word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``constant * word`` (both < 2**32) without leaving int64."""
    low_half = word * (constant & 0xFFFF)  # < 2**48
    high_half = word * (constant >> 16)  # < 2**48
    hi = (high_half + (low_half >> 16)) >> 16
    lo = (((high_half & 0xFFFF) << 16) + low_half) & _MASK32
    return hi, lo


def philox_uniform(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, counters)`` for non-negative int64 ``counters``: fp32 uniforms in [0, 1)."""
    c0 = counters.to(torch.int64) & _MASK32
    c1 = counters.to(torch.int64) >> 32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    folded = torch.where(signed < 0, -signed - 1, signed)  # ~x for two's complement
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=counters.device)


def mask_units(shape: torch.Size | tuple[int, ...], granularity: str) -> tuple[int, int]:
    """(number of mask units, ``[..., D]`` rows per unit) of a ``[B, ..., D]`` tensor."""
    rows = 1
    for size in shape[:-1]:
        rows *= size
    if granularity == "token":
        return rows, 1
    samples = shape[0]
    return samples, rows // samples if samples else 1


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, *, seed: int, offset: int = 0,
              granularity: str = "token", device: torch.device | str = "cpu") -> torch.Tensor:
    """The kernel's Bernoulli(p) keep mask for a tensor of ``shape``, broadcast to ``[..., 1]``.

    Unit ``i`` (row ``i`` of the flattened ``[-1, D]`` view for ``"token"``, sample ``i``
    for ``"sample"``) is kept when ``philox_uniform(seed, offset + i) < p`` (p in fp32).
    """
    units, rows_per_unit = mask_units(shape, granularity)
    counters = offset + torch.arange(units, device=device, dtype=torch.int64)
    keep = philox_uniform(seed, counters) < torch.tensor(p, dtype=torch.float32, device=device)
    return keep.repeat_interleave(rows_per_unit).reshape(*shape[:-1], 1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 (the kernels' math); float64 stays float64 (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def keep_scale(p: float, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``1/p`` as the kernel receives it: computed in double, rounded to ``dtype``."""
    return torch.tensor(1.0 / p, dtype=dtype, device=device)


def stochastic_residual(y: torch.Tensor, r: torch.Tensor, p: float, *, seed: int, offset: int = 0,
                        granularity: str = "token", training: bool = True) -> torch.Tensor:
    """``y + m * r / p`` (m ~ Bernoulli(p) from :func:`keep_mask`) in training, ``y + r`` in eval.

    Math in :func:`compute_dtype`, rounded to ``y.dtype``.
    """
    math = compute_dtype(y.dtype)
    y_wide, r_wide = y.to(math), r.to(math)
    if not training or p == 1.0:
        return (y_wide + r_wide).to(y.dtype)
    keep = keep_mask(y.shape, p, seed=seed, offset=offset, granularity=granularity, device=y.device)
    branch = torch.where(keep, r_wide * keep_scale(p, math, y.device), torch.zeros((), dtype=math, device=y.device))
    return (y_wide + branch).to(y.dtype)


def stochastic_residual_backward(grad: torch.Tensor, p: float, *, seed: int, offset: int = 0,
                                 granularity: str = "token", training: bool = True) -> torch.Tensor:
    """d r of :func:`stochastic_residual` (``grad * m / p``; d y is ``grad`` itself), in
    :func:`compute_dtype` of ``grad``."""
    math = compute_dtype(grad.dtype)
    grad_wide = grad.to(math)
    if not training or p == 1.0:
        return grad_wide
    keep = keep_mask(grad.shape, p, seed=seed, offset=offset, granularity=granularity, device=grad.device)
    zero = torch.zeros((), dtype=math, device=grad.device)
    return torch.where(keep, grad_wide * keep_scale(p, math, grad.device), zero)
