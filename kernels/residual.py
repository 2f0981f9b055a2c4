"""Stochastic residual kernel: ``out = y + m * r / p`` with the Bernoulli(p) mask drawn in
the kernel and never stored.

One uniform per mask unit (a ``[..., D]`` row for token granularity, a sample for sample
granularity) from ``tl.rand(seed, offset + unit)``; the unit index is global, so a row's
mask does not depend on the block sizes, the grid or how many rows follow it.
:mod:`astrea.reference.residual` reproduces the draw bit for bit. The same kernel with
no base (``HAS_BASE=False``) computes the backward ``d r = m * grad / p`` by regenerating
the mask. The helpers are shared with the fused combine kernels in
:mod:`astrea.kernels.dense_combine` and :mod:`astrea.kernels.combine` so that the fused ops
are bit-identical to the two ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program: enough work per program on the GPU, few programs under the interpreter.
TILE_ELEMENTS = 4096
MAX_BLOCK_D = 1024


@triton.jit
def _add_residual(base, branch, unit, seed, offset, keep_p, inv_p, STOCHASTIC: tl.constexpr):
    """fp32 ``[rows, cols]`` tiles: ``base + m * branch * inv_p`` where row ``i`` is kept when
    ``tl.rand(seed, offset + unit[i]) < keep_p``; ``base + branch`` when not STOCHASTIC."""
    if STOCHASTIC:
        keep = tl.rand(seed, offset + unit.to(tl.int64)) < keep_p
        return base + tl.where(keep[:, None], branch * inv_p, 0.0)
    return base + branch


@triton.jit
def _stochastic_residual_kernel(
    out_ptr, base_ptr, branch_ptr,
    num_rows, dim,
    stride_out_row,
    stride_base_row, stride_base_col,
    stride_branch_row, stride_branch_col,
    seed, offset, keep_p, inv_p, rows_per_unit,
    HAS_BASE: tl.constexpr, STOCHASTIC: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[i, :] = base[i, :] + m[unit(i)] * branch[i, :] / p`` over a ``[num_rows, dim]`` view."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_bounds = (rows < num_rows)[:, None] & (cols < dim)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    cols64 = cols.to(tl.int64)[None, :]

    branch = tl.load(branch_ptr + rows64 * stride_branch_row + cols64 * stride_branch_col, mask=in_bounds)
    if HAS_BASE:
        base = tl.load(base_ptr + rows64 * stride_base_row + cols64 * stride_base_col, mask=in_bounds)
        base = base.to(tl.float32)
    else:
        base = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    out = _add_residual(base, branch.to(tl.float32), rows // rows_per_unit, seed, offset, keep_p, inv_p, STOCHASTIC)
    tl.store(out_ptr + rows64 * stride_out_row + cols64, out.to(out_ptr.dtype.element_ty), mask=in_bounds)


def tile_shape(rows: int, dim: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_D) of a ``[rows, dim]`` problem: a ``TILE_ELEMENTS`` tile."""
    block_d = min(triton.next_power_of_2(dim), MAX_BLOCK_D)
    block_rows = max(1, min(triton.next_power_of_2(rows), TILE_ELEMENTS // block_d))
    return block_rows, block_d


def num_warps_for(block_elements: int) -> int:
    return 8 if block_elements >= 4096 else 4


def launch_stochastic_residual(out, base, branch, *, seed: int, offset: int, keep_p: float, inv_p: float,
                               rows_per_unit: int, stochastic: bool,
                               block_rows: int | None = None, block_d: int | None = None) -> None:
    """Runs the kernel on 2-D ``[rows, D]`` views (``base`` may be None: ``out = m * branch / p``)."""
    num_rows, dim = branch.shape
    default_rows, default_d = tile_shape(num_rows, dim)
    block_rows = block_rows or default_rows
    block_d = block_d or default_d
    grid = (triton.cdiv(num_rows, block_rows), triton.cdiv(dim, block_d))
    base_strides = base.stride() if base is not None else (0, 0)
    _stochastic_residual_kernel[grid](
        out, base if base is not None else branch, branch,
        num_rows, dim,
        out.stride(0),
        *base_strides,
        *branch.stride(),
        seed, offset, keep_p, inv_p, rows_per_unit,
        HAS_BASE=base is not None, STOCHASTIC=stochastic,
        BLOCK_ROWS=block_rows, BLOCK_D=block_d,
        num_warps=num_warps_for(block_rows * block_d),
        # No fma contraction: the GPU result then equals the reference's separate mul and add.
        enable_fp_fusion=False,
    )


# Draw of the example launches, here and in the fused combines: a seed and an offset past
# int32, so the Philox counters compile as 64-bit (as for any seed >= 2**31), and mask
# units of 512 rows (samples), so rows_per_unit stays a runtime i32 (token units pass 1,
# a constexpr that folds the division away).
AOT_DRAW = {"seed": 2**40 + 3, "offset": 2**33 + 5, "keep_p": 0.9, "inv_p": 1 / 0.9}
AOT_ROWS_PER_UNIT = 512
_AOT_ROWS = 8 * AOT_ROWS_PER_UNIT


def _example_residual(dtype: torch.dtype, dim: int, has_base: bool, stochastic: bool):
    branch = torch.empty(_AOT_ROWS, dim, dtype=dtype)
    launch_stochastic_residual(torch.empty_like(branch), torch.empty_like(branch) if has_base else None, branch,
                               rows_per_unit=AOT_ROWS_PER_UNIT, stochastic=stochastic, **AOT_DRAW)


# D = 4096 gives 4 x 1024 tiles, D = 64 gives 64 x 64 (tile_shape).
AOT_CASES = {
    "residual.forward_bf16_4x1024": lambda: _example_residual(torch.bfloat16, 4096, True, True),
    "residual.forward_fp32_4x1024": lambda: _example_residual(torch.float32, 4096, True, True),
    "residual.forward_eval_bf16_4x1024": lambda: _example_residual(torch.bfloat16, 4096, True, False),
    "residual.backward_bf16_4x1024": lambda: _example_residual(torch.bfloat16, 4096, False, True),
    "residual.forward_fp16_64x64": lambda: _example_residual(torch.float16, 64, True, True),
}
