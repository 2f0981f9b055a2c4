"""The sparse weighted combine of MoE: un-permute the expert outputs and sum each token's
k slots, ``out[t] = sum_j w[t, j] * s[e(t, j)] * y[pos(t, j)]`` (fp32 accumulation).

Every kernel is token-major: a program owns a tile of tokens, so each output row is summed
by exactly one program in a fixed order and no float atomics are needed. Slots whose
expert is out of range (see :mod:`astrea.kernels.dispatch`) or whose coefficient
``w * s`` is zero contribute nothing in the forward and their expert-output rows are
never read there (a NaN/Inf row of a zero-weight slot adds exactly nothing).

The backward writes ``grad_y[pos(t, j)] = w * s * grad_out[t]`` (``pos`` is a permutation,
so every row is written once), reduces ``g[t, j] = <grad_out[t], y[pos(t, j)]>`` in the
same pass over the features, and gives ``grad_w = s * g``. ``grad_s[e]`` sums ``w * g``
over the rows of expert e: those values are written in expert order (row ``pos(t, j)``)
and ``_segment_sum_kernel`` adds each expert's contiguous segment in a fixed order.

``HAS_RESIDUAL`` fuses the stochastic residual into the forward: the combine is rounded to
the output dtype, widened again and fed to the stochastic residual kernel's own helper
(``_add_residual``), so the fused result is bit-identical to the two kernels in sequence.
The combine kernel runs without fma contraction (like the residual kernel) so that the
standalone and the fused combine execute the same multiplies and adds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from astrea.kernels.residual import AOT_DRAW, AOT_ROWS_PER_UNIT, _add_residual

COMBINE_BLOCK_T = 8
COMBINE_BLOCK_D = 256
BACKWARD_BLOCK_T = 8
BACKWARD_BLOCK_D = 128
SEGMENT_BLOCK = 1024


@triton.jit
def _slot_coefficient(weights_ptr, indices_ptr, scale_ptr, tokens, token_ok, j, top_k, num_experts,
                      stride_wt, stride_wj, HAS_SCALE: tl.constexpr):
    """w[t, j] * s[e(t, j)] in fp32 and whether the slot's expert is in range."""
    expert = tl.load(indices_ptr + tokens * top_k + j, mask=token_ok, other=-1)
    valid = token_ok & (expert >= 0) & (expert < num_experts)
    coefficient = tl.load(weights_ptr + tokens.to(tl.int64) * stride_wt + j * stride_wj,
                          mask=valid, other=0.0).to(tl.float32)
    if HAS_SCALE:
        coefficient *= tl.load(scale_ptr + expert, mask=valid, other=0.0).to(tl.float32)
    return coefficient, valid


@triton.jit
def _combine_kernel(y_ptr, weights_ptr, indices_ptr, inverse_positions_ptr, scale_ptr, out_ptr,
                    num_tokens, dim, top_k, num_experts, stride_yr, stride_yd, stride_wt, stride_wj,
                    residual_ptr, stride_rr, stride_rd, seed, offset, keep_p, inv_p, rows_per_unit,
                    HAS_WEIGHTS: tl.constexpr, HAS_SCALE: tl.constexpr,
                    HAS_RESIDUAL: tl.constexpr, STOCHASTIC: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[t] = sum_j c[t, j] * y[pos(t, j)]``; with HAS_RESIDUAL, then ``out + m * residual / p``
    where token t belongs to mask unit ``t // rows_per_unit``."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < num_tokens
    col_ok = cols < dim
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(top_k):
        position = tl.load(inverse_positions_ptr + tokens * top_k + j, mask=token_ok, other=0)
        rows = y_ptr + position.to(tl.int64)[:, None] * stride_yr + cols[None, :] * stride_yd
        if HAS_WEIGHTS:
            coefficient, valid = _slot_coefficient(weights_ptr, indices_ptr, scale_ptr, tokens, token_ok, j,
                                                   top_k, num_experts, stride_wt, stride_wj, HAS_SCALE)
            # A zero coefficient skips its slot (as the dense combine does): the row is not
            # read, so a NaN or Inf in it adds nothing.
            used = valid & (coefficient != 0.0)
            y = tl.load(rows, mask=used[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.where(used[:, None], coefficient[:, None] * y, 0.0)
        else:
            acc += tl.load(rows, mask=token_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    tile_ok = token_ok[:, None] & col_ok[None, :]
    out = acc.to(out_ptr.dtype.element_ty)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + tokens.to(tl.int64)[:, None] * stride_rr + cols[None, :] * stride_rd,
                           mask=tile_ok)
        out = _add_residual(out.to(tl.float32), residual.to(tl.float32), tokens // rows_per_unit, seed, offset,
                            keep_p, inv_p, STOCHASTIC).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * dim + cols[None, :], out, mask=tile_ok)


@triton.jit
def _combine_backward_kernel(grad_out_ptr, y_ptr, weights_ptr, indices_ptr, inverse_positions_ptr, scale_ptr,
                             grad_y_ptr, grad_weights_ptr, scale_terms_ptr,
                             num_tokens, dim, top_k, num_experts, stride_gt, stride_gd, stride_yr, stride_yd,
                             stride_wt, stride_wj, HAS_SCALE: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < num_tokens
    slots = tl.arange(0, BLOCK_K)
    dots = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    # Features outer, slots inner: grad_out is read once whatever k is.
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        tile_ok = token_ok[:, None] & (cols[None, :] < dim)
        grad = tl.load(grad_out_ptr + tokens.to(tl.int64)[:, None] * stride_gt + cols[None, :] * stride_gd,
                       mask=tile_ok, other=0.0).to(tl.float32)
        for j in range(top_k):
            position = tl.load(inverse_positions_ptr + tokens * top_k + j, mask=token_ok, other=0).to(tl.int64)
            coefficient, valid = _slot_coefficient(weights_ptr, indices_ptr, scale_ptr, tokens, token_ok, j,
                                                   top_k, num_experts, stride_wt, stride_wj, HAS_SCALE)
            y = tl.load(y_ptr + position[:, None] * stride_yr + cols[None, :] * stride_yd,
                        mask=tile_ok & valid[:, None], other=0.0).to(tl.float32)
            dots += tl.where(slots[None, :] == j, tl.sum(grad * y, axis=1)[:, None], 0.0)
            tl.store(grad_y_ptr + position[:, None] * dim + cols[None, :],
                     (coefficient[:, None] * grad).to(grad_y_ptr.dtype.element_ty), mask=tile_ok)
    slot_mask = token_ok[:, None] & (slots[None, :] < top_k)
    flat = tokens[:, None] * top_k + slots[None, :]
    expert = tl.load(indices_ptr + flat, mask=slot_mask, other=-1)
    valid = slot_mask & (expert >= 0) & (expert < num_experts)
    weight = tl.load(weights_ptr + tokens.to(tl.int64)[:, None] * stride_wt + slots[None, :] * stride_wj,
                     mask=valid, other=0.0).to(tl.float32)
    grad_weights = tl.where(valid, dots, 0.0)
    if HAS_SCALE:
        grad_weights *= tl.load(scale_ptr + expert, mask=valid, other=0.0).to(tl.float32)
        position = tl.load(inverse_positions_ptr + flat, mask=slot_mask, other=0)
        tl.store(scale_terms_ptr + position, weight * dots, mask=valid)
    tl.store(grad_weights_ptr + flat, grad_weights.to(grad_weights_ptr.dtype.element_ty), mask=slot_mask)


@triton.jit
def _segment_sum_kernel(values_ptr, offsets_ptr, out_ptr, BLOCK: tl.constexpr):
    """out[e] = sum of values[offsets[e]:offsets[e + 1]], always in the same order."""
    expert = tl.program_id(0)
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        acc += tl.load(values_ptr + rows, mask=rows < end, other=0.0)
    tl.store(out_ptr + expert, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


def combine_forward(y: torch.Tensor, inverse_positions: torch.Tensor, weights: torch.Tensor | None = None,
                    indices: torch.Tensor | None = None, expert_scale: torch.Tensor | None = None,
                    num_experts: int = 0, *, residual: torch.Tensor | None = None, seed: int = 0, offset: int = 0,
                    keep_p: float = 1.0, inv_p: float = 1.0, rows_per_unit: int = 1,
                    stochastic: bool = False) -> torch.Tensor:
    """``out[t] = sum_j c[t, j] * y[inverse_positions[t, j]]`` with ``c = weights * expert_scale[indices]``,
    or ``c = 1`` without weights (the backward of the permute).

    With a ``[N, D]`` ``residual`` (any strides; weights required), the stochastic residual
    follows in the same pass: ``out + m * residual * inv_p`` with token t in mask unit
    ``t // rows_per_unit`` drawn from ``(seed, offset + unit)``, or ``out + residual`` when
    not ``stochastic``."""
    inverse_positions = inverse_positions.contiguous()
    num_tokens, top_k = inverse_positions.shape
    dim = y.shape[1]
    out = torch.empty(num_tokens, dim, dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    has_weights = weights is not None
    if has_weights:
        indices = indices.contiguous()
    has_residual = residual is not None
    grid = (triton.cdiv(num_tokens, COMBINE_BLOCK_T), triton.cdiv(dim, COMBINE_BLOCK_D))
    _combine_kernel[grid](
        y, weights if has_weights else y, indices if has_weights else inverse_positions, inverse_positions,
        expert_scale if expert_scale is not None else y, out,
        num_tokens, dim, top_k, num_experts, y.stride(0), y.stride(1),
        weights.stride(0) if has_weights else 0, weights.stride(1) if has_weights else 0,
        residual if has_residual else out, *(residual.stride() if has_residual else (0, 0)),
        seed, offset, keep_p, inv_p, rows_per_unit,
        HAS_WEIGHTS=has_weights, HAS_SCALE=expert_scale is not None,
        HAS_RESIDUAL=has_residual, STOCHASTIC=stochastic,
        BLOCK_T=COMBINE_BLOCK_T, BLOCK_D=COMBINE_BLOCK_D,
        enable_fp_fusion=False)
    return out


def combine_backward(grad_out: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                     inverse_positions: torch.Tensor, expert_offsets: torch.Tensor,
                     expert_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`combine_forward` for ``y``, ``weights`` and ``expert_scale`` (None without it)."""
    indices = indices.contiguous()
    inverse_positions = inverse_positions.contiguous()
    num_tokens, top_k = indices.shape
    num_experts = expert_offsets.shape[0] - 1
    dim = y.shape[1]
    has_scale = expert_scale is not None
    grad_y = torch.empty(num_tokens * top_k, dim, dtype=y.dtype, device=y.device)
    grad_weights = torch.empty(num_tokens, top_k, dtype=weights.dtype, device=weights.device)
    # Rows past expert_offsets[E] (out-of-range experts) are never summed: no need to clear them.
    scale_terms = torch.empty(num_tokens * top_k if has_scale else 0, dtype=torch.float32, device=y.device)
    if num_tokens * top_k > 0:
        grid = (triton.cdiv(num_tokens, BACKWARD_BLOCK_T),)
        _combine_backward_kernel[grid](
            grad_out, y, weights, indices, inverse_positions, expert_scale if has_scale else weights,
            grad_y, grad_weights, scale_terms,
            num_tokens, dim, top_k, num_experts, grad_out.stride(0), grad_out.stride(1), y.stride(0), y.stride(1),
            weights.stride(0), weights.stride(1), HAS_SCALE=has_scale,
            BLOCK_T=BACKWARD_BLOCK_T, BLOCK_D=BACKWARD_BLOCK_D, BLOCK_K=triton.next_power_of_2(top_k))
    if not has_scale:
        return grad_y, grad_weights, None
    grad_scale = torch.empty(num_experts, dtype=expert_scale.dtype, device=expert_scale.device)
    _segment_sum_kernel[(num_experts,)](scale_terms, expert_offsets, grad_scale, BLOCK=SEGMENT_BLOCK)
    return grad_y, grad_weights, grad_scale


# Example launches: 4096 tokens routed top-8 over 64 experts, 2048 features.
_AOT_TOKENS, _AOT_TOP_K, _AOT_EXPERTS, _AOT_DIM = 4096, 8, 64, 2048


def _example_routing():
    """weights (fp32), indices, inverse_positions ([N, k]) and expert_scale ([E], fp32)."""
    slots = (_AOT_TOKENS, _AOT_TOP_K)
    return (torch.empty(slots), torch.empty(slots, dtype=torch.int32), torch.empty(slots, dtype=torch.int32),
            torch.empty(_AOT_EXPERTS))


def _example_forward(dtype: torch.dtype, weighted: bool, fused: bool):
    expert_out = torch.empty(_AOT_TOKENS * _AOT_TOP_K, _AOT_DIM, dtype=dtype)
    weights, indices, inverse_positions, expert_scale = _example_routing()
    if not weighted:  # the permute's backward
        combine_forward(expert_out, inverse_positions)
        return
    residual = {"residual": torch.empty(_AOT_TOKENS, _AOT_DIM, dtype=dtype), "rows_per_unit": AOT_ROWS_PER_UNIT,
                "stochastic": True, **AOT_DRAW} if fused else {}
    combine_forward(expert_out, inverse_positions, weights, indices, expert_scale, _AOT_EXPERTS, **residual)


def _example_backward(dtype: torch.dtype):
    weights, indices, inverse_positions, expert_scale = _example_routing()
    combine_backward(torch.empty(_AOT_TOKENS, _AOT_DIM, dtype=dtype),
                     torch.empty(_AOT_TOKENS * _AOT_TOP_K, _AOT_DIM, dtype=dtype), weights, indices,
                     inverse_positions, torch.empty(_AOT_EXPERTS + 1, dtype=torch.int64), expert_scale)


def _dtype_cases(name: str, dtype: torch.dtype):
    return {
        f"combine.forward_{name}": lambda: _example_forward(dtype, weighted=True, fused=False),
        f"combine.forward_{name}_unweighted": lambda: _example_forward(dtype, weighted=False, fused=False),
        f"combine.forward_{name}_residual": lambda: _example_forward(dtype, weighted=True, fused=True),
        f"combine.backward_{name}": lambda: _example_backward(dtype),
    }


AOT_CASES = {**_dtype_cases("fp32", torch.float32), **_dtype_cases("bf16", torch.bfloat16)}
