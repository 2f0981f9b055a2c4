"""Dense weighted combine of E expert outputs, optionally fused with the stochastic residual.

``out[b] = sum_e c[b, e] * y_e[b]`` with ``c = w * s`` (routing weight times per-expert
scale) precomputed in fp32 ``[B, E]``, fp32 accumulation in expert order. The experts
come as a tuple of E pointers, each with its own ``(b, t, d)`` strides, so a list of
separately allocated expert outputs is read where it lies (no stacking copy) and a
stacked ``[E, B, T, D]`` tensor is passed as its E views. An expert whose coefficient is
zero for a sample is skipped by a branch on the scalar coefficient: its rows are not read.

``FUSE_RESIDUAL`` adds the stochastic residual in the same pass: the combine is rounded
to the output dtype, widened again and fed to the same helper as the standalone residual
kernel, so the fused result is bit-identical to the two ops in sequence.

The backward kernel reads ``grad`` once and, per expert, writes ``d y_e = c * grad`` and a
per-tile partial of ``sum grad * y_e`` into ``[B, E, tiles]``; the launcher sums the
partials in a fixed order (deterministic, no atomics). Fused, it also writes
``d residual = m * grad / p`` with the regenerated mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from astrea.kernels.residual import AOT_DRAW, _add_residual, num_warps_for, tile_shape


@triton.jit
def _tile(pid, T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """(sample, token offsets, column offsets, in-bounds mask, tile index within the sample)."""
    tiles_t = tl.cdiv(T, BLOCK_T)
    tiles_d = tl.cdiv(D, BLOCK_D)
    tiles_per_sample = tiles_t * tiles_d
    sample = pid // tiles_per_sample
    tile = pid % tiles_per_sample
    tokens = (tile // tiles_d) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = (tile % tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_bounds = (tokens < T)[:, None] & (cols < D)[None, :]
    return sample, tokens, cols, in_bounds, tile


@triton.jit
def _offsets(sample, tokens, cols, strides):
    """int64 element offsets of a ``[BLOCK_T, BLOCK_D]`` tile for ``strides = (b, t, d)``."""
    return (sample.to(tl.int64) * strides[0] + tokens.to(tl.int64)[:, None] * strides[1]
            + cols.to(tl.int64)[None, :] * strides[2])


@triton.jit
def _mask_units(sample, tokens, T, SAMPLE_UNITS: tl.constexpr):
    """Mask unit of each token row: the sample, or the row of the flattened ``[B*T, D]`` view."""
    if SAMPLE_UNITS:
        return sample.to(tl.int64) + tokens * 0
    return sample.to(tl.int64) * T + tokens


@triton.jit
def _dense_combine_kernel(
    out_ptr, experts, expert_strides, coef_ptr,
    residual_ptr, residual_strides,
    T, D,
    seed, offset, keep_p, inv_p,
    NUM_EXPERTS: tl.constexpr, FUSE_RESIDUAL: tl.constexpr, STOCHASTIC: tl.constexpr,
    SAMPLE_UNITS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    sample, tokens, cols, in_bounds, _ = _tile(tl.program_id(0), T, D, BLOCK_T, BLOCK_D)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for e in tl.static_range(NUM_EXPERTS):
        coef = tl.load(coef_ptr + sample * NUM_EXPERTS + e)
        if coef != 0.0:
            x = tl.load(experts[e] + _offsets(sample, tokens, cols, expert_strides[e]), mask=in_bounds)
            acc += coef * x.to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    if FUSE_RESIDUAL:
        residual = tl.load(residual_ptr + _offsets(sample, tokens, cols, residual_strides), mask=in_bounds)
        units = _mask_units(sample, tokens, T, SAMPLE_UNITS)
        out = _add_residual(out.to(tl.float32), residual.to(tl.float32), units, seed, offset, keep_p, inv_p,
                            STOCHASTIC).to(out_ptr.dtype.element_ty)
    out_offsets = sample.to(tl.int64) * T * D + tokens.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out_ptr + out_offsets, out, mask=in_bounds)


@triton.jit
def _dense_combine_backward_kernel(
    grad_ptr, experts, expert_strides, coef_ptr,
    grad_experts, partial_ptr, grad_residual_ptr,
    T, D, tiles_per_sample,
    seed, offset, keep_p, inv_p,
    NUM_EXPERTS: tl.constexpr, EXPERT_GRAD: tl.constexpr, COEF_GRAD: tl.constexpr,
    RESIDUAL_GRAD: tl.constexpr, STOCHASTIC: tl.constexpr, SAMPLE_UNITS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    sample, tokens, cols, in_bounds, tile = _tile(tl.program_id(0), T, D, BLOCK_T, BLOCK_D)
    dense_offsets = sample.to(tl.int64) * T * D + tokens.to(tl.int64)[:, None] * D + cols[None, :]
    grad = tl.load(grad_ptr + dense_offsets, mask=in_bounds).to(tl.float32)
    if RESIDUAL_GRAD:
        units = _mask_units(sample, tokens, T, SAMPLE_UNITS)
        grad_residual = _add_residual(tl.zeros([BLOCK_T, BLOCK_D], tl.float32), grad, units, seed, offset, keep_p,
                                      inv_p, STOCHASTIC)
        tl.store(grad_residual_ptr + dense_offsets, grad_residual.to(grad_residual_ptr.dtype.element_ty),
                 mask=in_bounds)
    for e in tl.static_range(NUM_EXPERTS):
        if EXPERT_GRAD:
            coef = tl.load(coef_ptr + sample * NUM_EXPERTS + e)
            tl.store(grad_experts[e] + dense_offsets, (coef * grad).to(grad_experts[e].dtype.element_ty),
                     mask=in_bounds)
        if COEF_GRAD:
            x = tl.load(experts[e] + _offsets(sample, tokens, cols, expert_strides[e]), mask=in_bounds)
            partial = tl.sum(tl.sum(grad * x.to(tl.float32), axis=1), axis=0)
            tl.store(partial_ptr + (sample * NUM_EXPERTS + e) * tiles_per_sample + tile, partial)


def _grid_and_tile(B: int, T: int, D: int, block_t: int | None, block_d: int | None):
    default_t, default_d = tile_shape(T, D)
    block_t = block_t or default_t
    block_d = block_d or default_d
    tiles_per_sample = triton.cdiv(T, block_t) * triton.cdiv(D, block_d)
    return (B * tiles_per_sample,), tiles_per_sample, block_t, block_d


def launch_dense_combine(out, experts, coef, *, residual=None, seed: int = 0, offset: int = 0,
                         keep_p: float = 1.0, inv_p: float = 1.0, stochastic: bool = False,
                         sample_units: bool = False, block_t: int | None = None, block_d: int | None = None) -> None:
    """``out`` [B, T, D] contiguous; ``experts`` E tensors viewed [B, T, D] (any strides);
    ``coef`` [B, E] fp32 contiguous; ``residual`` [B, T, D] (any strides) or None."""
    B, T, D = out.shape
    grid, _, block_t, block_d = _grid_and_tile(B, T, D, block_t, block_d)
    _dense_combine_kernel[grid](
        out, tuple(experts), tuple(x.stride() for x in experts), coef,
        residual if residual is not None else out, residual.stride() if residual is not None else (0, 0, 0),
        T, D,
        seed, offset, keep_p, inv_p,
        NUM_EXPERTS=len(experts), FUSE_RESIDUAL=residual is not None, STOCHASTIC=stochastic,
        SAMPLE_UNITS=sample_units, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=num_warps_for(block_t * block_d),
        enable_fp_fusion=False,  # the reference's separate multiply and add, bit for bit
    )


def launch_dense_combine_backward(grad, experts, coef, *, grad_experts, partials, grad_residual=None,
                                  seed: int = 0, offset: int = 0, keep_p: float = 1.0, inv_p: float = 1.0,
                                  stochastic: bool = False, sample_units: bool = False,
                                  block_t: int | None = None, block_d: int | None = None) -> None:
    """``grad`` [B, T, D] contiguous. ``grad_experts``: E contiguous [B, T, D] outputs or None;
    ``partials``: a ``[B, E, tiles]`` fp32 output (see :func:`num_partials`) or None."""
    B, T, D = grad.shape
    grid, tiles_per_sample, block_t, block_d = _grid_and_tile(B, T, D, block_t, block_d)
    _dense_combine_backward_kernel[grid](
        grad, tuple(experts), tuple(x.stride() for x in experts), coef,
        tuple(grad_experts) if grad_experts is not None else tuple(experts),
        partials if partials is not None else coef,
        grad_residual if grad_residual is not None else grad,
        T, D, tiles_per_sample,
        seed, offset, keep_p, inv_p,
        NUM_EXPERTS=len(experts), EXPERT_GRAD=grad_experts is not None, COEF_GRAD=partials is not None,
        RESIDUAL_GRAD=grad_residual is not None, STOCHASTIC=stochastic, SAMPLE_UNITS=sample_units,
        BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=num_warps_for(block_t * block_d),
        enable_fp_fusion=False,
    )


def num_partials(T: int, D: int, block_t: int | None = None, block_d: int | None = None) -> int:
    """Tiles per sample: the last dimension of the backward's partial-sum buffer."""
    return _grid_and_tile(1, T, D, block_t, block_d)[1]


# Example launches: 8 samples of 512 tokens; D = 4096 gives 4 x 1024 tiles, D = 64 gives
# 64 x 64 (tile_shape).
_AOT_SAMPLES, _AOT_TOKENS = 8, 512


def _example_operands(dtype: torch.dtype, num_experts: int, dim: int):
    """A contiguous [B, T, D] tensor, E separately allocated expert outputs and the [B, E] coefficients."""
    dense = torch.empty(_AOT_SAMPLES, _AOT_TOKENS, dim, dtype=dtype)
    return dense, [torch.empty_like(dense) for _ in range(num_experts)], torch.empty(_AOT_SAMPLES, num_experts)


def _example_forward(dtype: torch.dtype, num_experts: int, dim: int, fused: bool):
    out, experts, coef = _example_operands(dtype, num_experts, dim)
    residual = {"residual": torch.empty_like(out), "stochastic": True, **AOT_DRAW} if fused else {}
    launch_dense_combine(out, experts, coef, **residual)


def _example_backward(dtype: torch.dtype, num_experts: int, dim: int, fused: bool):
    grad, experts, coef = _example_operands(dtype, num_experts, dim)
    residual = {"grad_residual": torch.empty_like(grad), "stochastic": True, **AOT_DRAW} if fused else {}
    launch_dense_combine_backward(grad, experts, coef, grad_experts=[torch.empty_like(y) for y in experts],
                                  partials=torch.empty(_AOT_SAMPLES, num_experts, num_partials(_AOT_TOKENS, dim)),
                                  **residual)


AOT_CASES = {
    "dense_combine.forward_bf16_e4_4x1024": lambda: _example_forward(torch.bfloat16, 4, 4096, False),
    "dense_combine.forward_fused_bf16_e4_4x1024": lambda: _example_forward(torch.bfloat16, 4, 4096, True),
    "dense_combine.forward_fused_fp32_e8_4x1024": lambda: _example_forward(torch.float32, 8, 4096, True),
    "dense_combine.backward_bf16_e4_4x1024": lambda: _example_backward(torch.bfloat16, 4, 4096, False),
    "dense_combine.backward_fused_bf16_e4_4x1024": lambda: _example_backward(torch.bfloat16, 4, 4096, True),
    "dense_combine.backward_fused_fp16_e3_64x64": lambda: _example_backward(torch.float16, 3, 64, True),
}
