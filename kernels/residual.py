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

import triton
import triton.language as tl

from astrea.kernels.aot import AOTSpec

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


def _aot_spec(dtype: str, has_base: bool, stochastic: bool, block_rows: int, block_d: int) -> AOTSpec:
    signature = {
        "out_ptr": f"*{dtype}", "base_ptr": f"*{dtype}", "branch_ptr": f"*{dtype}",
        "num_rows": "i32", "dim": "i32",
        "stride_out_row": "i64",
        "stride_base_row": "i64", "stride_base_col": "i64",
        "stride_branch_row": "i64", "stride_branch_col": "i64",
        "seed": "i64", "offset": "i64", "keep_p": "fp32", "inv_p": "fp32", "rows_per_unit": "i32",
        "HAS_BASE": "constexpr", "STOCHASTIC": "constexpr", "BLOCK_ROWS": "constexpr", "BLOCK_D": "constexpr",
    }
    kind = ("forward" if has_base else "backward") + ("" if stochastic else "_eval")
    return AOTSpec(
        label=f"residual.{kind}_{dtype}_{block_rows}x{block_d}",
        kernel=_stochastic_residual_kernel,
        signature=signature,
        # Contiguous operands, as the JIT specialises them.
        constexprs={"HAS_BASE": has_base, "STOCHASTIC": stochastic, "BLOCK_ROWS": block_rows, "BLOCK_D": block_d,
                    "stride_base_col": 1, "stride_branch_col": 1},
        num_warps=num_warps_for(block_rows * block_d),
        divisible_by_16=("dim", "stride_out_row", "stride_base_row", "stride_branch_row"),
    )


AOT_SPECS = [
    _aot_spec("bf16", True, True, 4, 1024),
    _aot_spec("fp32", True, True, 4, 1024),
    _aot_spec("bf16", True, False, 4, 1024),
    _aot_spec("bf16", False, True, 4, 1024),
    _aot_spec("fp16", True, True, 64, 64),
]
