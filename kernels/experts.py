"""Grouped expert FFNs on stacked weights: grouped GEMMs over the expert-ordered rows of a
dispatch, with the gather, the biases, the gated activation, the routing weight and the sum over
each token's k slots fused in (see :mod:`astrea.ops.experts` for the op and its layout).

Forward (``M = N * k`` rows in dispatch order, row ``r`` holding token ``t(r)`` for expert ``e``):

* ``_gate_up_kernel``: ``pre[r] = gate_up[e] @ x[t(r)] + gate_up_bias[e]``, the token rows read
  through the dispatch's token ids inside the A-tile loads (no permuted copy of x), the bias added
  to the fp32 accumulator. It writes ``pre`` (kept for the backward, in gate_up's row layout) and,
  from the rounded ``pre``, ``hidden[r] = act(gate) * up`` (clamped_swiglu's gate, or ``act(pre)``):
  gate and up columns of a tile are multiplied in one program, their rows of gate_up found by
  index (``i`` and ``I + i`` concatenated, ``2i`` and ``2i + 1`` interleaved).
* ``_rows_to_slots_kernel``: ``c[r] * (down[e] @ hidden[r] + down_bias[e])`` written to the row of
  its routing slot ``(t, j)`` in a ``[N * k, H]`` buffer; ``_slot_sum_kernel`` sums each token's k
  slot rows in slot order. No float atomics anywhere: bitwise reproducible.

Backward, recomputing the activation from ``pre``:

* ``_down_backward_kernel``: ``dh[r] = down[e]^T @ g[t(r)]`` (grad rows read through the token
  ids), and in its epilogue ``hidden`` again, ``d pre`` (``c * dh`` through the activation) and
  per-column-tile partials of ``d c[r] = <dh[r], hidden[r]>`` summed afterwards in tile order.
* ``_rows_to_slots_kernel`` again: ``d pre[r] @ gate_up[e]`` to the slot rows, summed per token
  by ``_slot_sum_kernel`` into ``d x``.
* ``_expert_weight_grad_kernel``: ``d gate_up[e] = sum_r d pre[r]^T x[t(r)]`` and
  ``d down[e] = sum_r (c[r] g[t(r)])^T hidden[r]``; each program owns one output tile of one
  expert and walks that expert's rows in order (an expert without rows gets zeros). The
  gradients are written in the strides of the weights (a transposed view's are transposed).
* ``_expert_row_sum_kernel`` (with biases): ``d gate_up_bias[e] = sum_r d pre[r]`` and
  ``d down_bias[e] = sum_r c[r] g[t(r)]``, one program per (column block, expert) walking that
  expert's rows in order; for the down bias it also writes per-column-block partials of the
  ``<g[t(r)], down_bias[e]>`` term of ``d c[r]``.

Row tiles never straddle experts: expert e has ``cdiv(count_e, BLOCK_M)`` of them, numbered
after those of the experts before it. The tile table is computed on the device from the
offsets (no host sync); the grid is its host bound ``cdiv(M, BLOCK_M) + E`` times the column
tiles (those of one row tile next to each other), and programs past the last tile exit. Rows
after ``expert_offsets[E]`` (slots of out-of-range experts) are never computed and their slots
add nothing.

Accumulation is fp32 (float64 for float64 inputs under the interpreter). fp32 operands are
multiplied in full fp32 (``input_precision="ieee"``, torch's default for fp32 matmuls); under
the interpreter 16-bit operands are widened before ``tl.dot``, whose 16-bit product there is
wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SILU: tl.constexpr = tl.constexpr(0)
GELU: tl.constexpr = tl.constexpr(1)
GELU_TANH: tl.constexpr = tl.constexpr(2)
RELU: tl.constexpr = tl.constexpr(3)
RELU2: tl.constexpr = tl.constexpr(4)
CLAMPED_SWIGLU: tl.constexpr = tl.constexpr(5)
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "relu2": 4, "clamped_swiglu": 5}

SQRT_HALF: tl.constexpr = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)
SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)
GELU_TANH_CUBIC: tl.constexpr = tl.constexpr(0.044715)

SLOT_SUM_BLOCK_T = 8
SLOT_SUM_BLOCK_D = 256


@triton.jit
def _gelu_tanh_inner(z):
    """``u = sqrt(2 / pi) * (z + 0.044715 z^3)``, of ``gelu_tanh(z) = 0.5 z (1 + tanh u)``."""
    return (z * z * z * GELU_TANH_CUBIC + z) * SQRT_2_OVER_PI


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    """act(z) elementwise; gelu_tanh as ``z * sigmoid(2u)`` (= ``0.5 z (1 + tanh u)``)."""
    if ACTIVATION == SILU:
        out = z * tl.sigmoid(z)
    elif ACTIVATION == GELU:
        out = 0.5 * z * (1.0 + tl.math.erf(z * SQRT_HALF))
    elif ACTIVATION == GELU_TANH:
        out = z * tl.sigmoid(_gelu_tanh_inner(z) * 2.0)
    elif ACTIVATION == RELU2:
        positive = tl.where(z < 0.0, 0.0, z)
        out = positive * positive
    else:
        out = tl.where(z < 0.0, 0.0, z)
    return out


@triton.jit
def _activate_grad(z, ACTIVATION: tl.constexpr):
    """d act / d z elementwise (relu: 1 where z > 0, as torch's threshold_backward; relu2: 2 relu(z))."""
    if ACTIVATION == SILU:
        s = tl.sigmoid(z)
        out = s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == GELU:
        out = 0.5 * (1.0 + tl.math.erf(z * SQRT_HALF)) + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACTIVATION == GELU_TANH:
        s = tl.sigmoid(_gelu_tanh_inner(z) * 2.0)
        out = s + z * 2.0 * s * (1.0 - s) * (z * z * (3.0 * GELU_TANH_CUBIC) + 1.0) * SQRT_2_OVER_PI
    elif ACTIVATION == RELU2:
        out = tl.where(z > 0.0, 2.0 * z, 0.0)
    else:
        out = tl.where(z > 0.0, 1.0, 0.0)
    return out


@triton.jit
def _gated(gate, up, alpha, limit, ACTIVATION: tl.constexpr):
    """(hidden, d hidden / d gate, d hidden / d up) of a gated FFN elementwise: ``act(gate) * up``,
    or gpt-oss's ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate,
    limit)``, whose derivatives are zero where a clamp holds and pass at its bounds (torch.clamp's)."""
    if ACTIVATION == CLAMPED_SWIGLU:
        clamped_gate = tl.minimum(gate, limit)
        clamped_up = tl.minimum(tl.maximum(up, -limit), limit)
        s = tl.sigmoid(clamped_gate * alpha)
        glu = clamped_gate * s
        hidden = (clamped_up + 1.0) * glu
        d_gate = tl.where(gate <= limit, (clamped_up + 1.0) * (s * (1.0 + clamped_gate * alpha * (1.0 - s))), 0.0)
        d_up = tl.where((up >= -limit) & (up <= limit), glu, 0.0)
    else:
        activated = _activate(gate, ACTIVATION)
        hidden = activated * up
        d_gate = up * _activate_grad(gate, ACTIVATION)
        d_up = activated
    return hidden, d_gate, d_up


@triton.jit
def _expert_matmul(a_ptr, a_rows, stride_ak, row_ok, b_ptr, second_b_offset, stride_bk, stride_bn, cols, col_ok,
                   depth, PAIR: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc[m, n] = sum_k a[a_rows[m] + k * stride_ak] * b[k * stride_bk + cols[n] * stride_bn]``
    over ``k < depth`` (``a_rows``: element offsets of the A rows). With PAIR, the same A tiles
    also multiply B shifted by ``second_b_offset`` (the up rows of a gated gate_up)."""
    first = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    second = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, depth, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < depth
        a = tl.load(a_ptr + a_rows[:, None] + ks[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b_offsets = ks[:, None] * stride_bk + cols[None, :] * stride_bn
        b_ok = k_ok[:, None] & col_ok[None, :]
        b = tl.load(b_ptr + b_offsets, mask=b_ok, other=0.0)
        if UPCAST:
            a = a.to(ACC)
            b = b.to(ACC)
        first = tl.dot(a, b, first, input_precision="ieee", out_dtype=ACC)
        if PAIR:
            b = tl.load(b_ptr + second_b_offset + b_offsets, mask=b_ok, other=0.0)
            if UPCAST:
                b = b.to(ACC)
            second = tl.dot(a, b, second, input_precision="ieee", out_dtype=ACC)
    return first, second


@triton.jit
def _row_tile(tile_expert_ptr, tile_start_ptr, offsets_ptr, token_ids_ptr, num_experts, width,
              GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(expert, rows, row_ok, their tokens (GATHER; else the rows), column tile, its columns, col_ok,
    live) of this program; ``live`` is False past the last row tile, where no row is ok. Column tiles vary
    fastest: the programs running together share their A rows and their expert's weights in L2."""
    column_tiles = tl.cdiv(width, BLOCK_N)
    tile = tl.program_id(0) // column_tiles
    expert = tl.load(tile_expert_ptr + tile)
    live = expert < num_experts
    safe_expert = tl.where(live, expert, 0)
    end = tl.load(offsets_ptr + safe_expert + 1)
    rows = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    row_ok = rows < end  # none past the last tile: those start at offsets[E] or later
    if GATHER:
        tokens = tl.load(token_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        tokens = rows.to(tl.int64)
    column_tile = tl.program_id(0) % column_tiles
    cols = column_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    return safe_expert.to(tl.int64), rows, row_ok, tokens, column_tile, cols, cols < width, live


@triton.jit
def _gate_up_columns(cols, intermediate, GATED: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The columns of pre (and rows of gate_up, entries of its bias) of the gate and the up halves
    of hidden's columns ``cols``, and how many rows the up row lies after its gate row (up: unused
    without GATED)."""
    if INTERLEAVED:
        up_shift = 1
        gate_cols = cols * 2
    else:
        up_shift = intermediate
        gate_cols = cols
    return gate_cols, gate_cols + up_shift, up_shift


@triton.jit
def _gate_up_kernel(x_ptr, token_ids_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, gate_up_ptr, bias_ptr,
                    pre_ptr, hidden_ptr, num_experts, hidden_size, intermediate, alpha, limit,
                    stride_xt, stride_xh, stride_ge, stride_gn, stride_gh, stride_be, stride_bn,
                    ACTIVATION: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
                    STORE_PRE: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``pre[r] = gate_up[e] @ x[t(r)] + bias[e]`` for the gate (and up) columns of this tile, the
    token rows read through the token ids; writes pre (STORE_PRE) and the activated rows."""
    expert, rows, row_ok, tokens, _, cols, col_ok, live = _row_tile(
        tile_expert_ptr, tile_start_ptr, offsets_ptr, token_ids_ptr, num_experts, intermediate, True, BLOCK_M,
        BLOCK_N)
    if not live:
        return
    gate_cols, up_cols, up_shift = _gate_up_columns(cols, intermediate, GATED, INTERLEAVED)
    # B[k, n] = gate_up[e, gate_cols[n], k], then (PAIR) the up rows, 1 (interleaved) or I further on.
    gate, up = _expert_matmul(x_ptr, tokens * stride_xt, stride_xh, row_ok, gate_up_ptr + expert * stride_ge,
                              up_shift * stride_gn, stride_gh, stride_gn, gate_cols, col_ok,
                              hidden_size, GATED, UPCAST, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        bias_row = bias_ptr + expert * stride_be
        gate += tl.load(bias_row + gate_cols * stride_bn, mask=col_ok, other=0.0).to(ACC)[None, :]
        if GATED:
            up += tl.load(bias_row + up_cols * stride_bn, mask=col_ok, other=0.0).to(ACC)[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    out_rows = rows.to(tl.int64)[:, None]
    dtype = pre_ptr.dtype.element_ty
    pre_width = 2 * intermediate if GATED else intermediate
    gate = gate.to(dtype)
    if STORE_PRE:
        tl.store(pre_ptr + out_rows * pre_width + gate_cols[None, :], gate, mask=tile_ok)
    # hidden from the rounded pre, exactly as the backward recomputes it
    if GATED:
        up = up.to(dtype)
        if STORE_PRE:
            tl.store(pre_ptr + out_rows * pre_width + up_cols[None, :], up, mask=tile_ok)
        hidden, _, _ = _gated(gate.to(ACC), up.to(ACC), alpha, limit, ACTIVATION)
    else:
        hidden = _activate(gate.to(ACC), ACTIVATION)
    tl.store(hidden_ptr + out_rows * intermediate + cols[None, :], hidden.to(dtype), mask=tile_ok)


@triton.jit
def _rows_to_slots_kernel(a_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, slot_of_row_ptr, coef_ptr, w_ptr,
                          bias_ptr, out_ptr, num_experts, depth, width, stride_ar, stride_we, stride_wk, stride_wn,
                          stride_be, stride_bn, HAS_COEF: tl.constexpr, HAS_BIAS: tl.constexpr,
                          UPCAST: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[slot(r)] = c[r] * (a[r] @ B_e + bias[e])`` (or without c and bias) with ``B_e[k, n] =
    w[e, k * stride_wk + n * stride_wn]``: the forward's down projection and the backward's d x rows."""
    expert, rows, row_ok, a_rows, _, cols, col_ok, live = _row_tile(
        tile_expert_ptr, tile_start_ptr, offsets_ptr, offsets_ptr, num_experts, width, False, BLOCK_M, BLOCK_N)
    if not live:
        return
    acc, _ = _expert_matmul(a_ptr, a_rows * stride_ar, 1, row_ok, w_ptr + expert * stride_we, 0,
                            stride_wk, stride_wn, cols, col_ok, depth, False, UPCAST, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_be + cols * stride_bn, mask=col_ok, other=0.0).to(ACC)[None, :]
    if HAS_COEF:
        acc *= tl.load(coef_ptr + rows, mask=row_ok, other=0.0)[:, None]
    slots = tl.load(slot_of_row_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    tl.store(out_ptr + slots[:, None] * width + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _slot_sum_kernel(slot_rows_ptr, inverse_positions_ptr, offsets_ptr, out_ptr, num_tokens, top_k, dim,
                     num_experts, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[t] = sum_j slot_rows[t * k + j]`` in slot order, skipping slots whose row lies past
    ``offsets[E]`` (out-of-range experts: their slot rows were never written)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < num_tokens
    col_ok = cols < dim
    routed_rows = tl.load(offsets_ptr + num_experts)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC)
    for j in range(top_k):
        slots = tokens * top_k + j
        used = token_ok & (tl.load(inverse_positions_ptr + slots, mask=token_ok, other=0) < routed_rows)
        acc += tl.load(slot_rows_ptr + slots.to(tl.int64)[:, None] * dim + cols[None, :],
                       mask=used[:, None] & col_ok[None, :], other=0.0).to(ACC)
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * dim + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=token_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_backward_kernel(grad_out_ptr, token_ids_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, coef_ptr,
                          pre_ptr, down_ptr, grad_pre_ptr, hidden_ptr, coef_partials_ptr,
                          num_experts, num_rows, hidden_size, intermediate, alpha, limit,
                          stride_gt, stride_gh, stride_de, stride_dh, stride_di,
                          ACTIVATION: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr,
                          UPCAST: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dh[r] = down[e]^T @ g[t(r)]``; epilogue: hidden recomputed from pre, ``d pre`` from
    ``c[r] * dh[r]`` and this column tile's part of ``d c[r] = <dh[r], hidden[r]>``."""
    expert, rows, row_ok, tokens, column_tile, cols, col_ok, live = _row_tile(
        tile_expert_ptr, tile_start_ptr, offsets_ptr, token_ids_ptr, num_experts, intermediate, True, BLOCK_M,
        BLOCK_N)
    if not live:
        return
    # B[k, n] = down[e, k, n]: k over H, n over I
    grad_hidden, _ = _expert_matmul(grad_out_ptr, tokens * stride_gt, stride_gh, row_ok, down_ptr + expert * stride_de,
                                    0, stride_dh, stride_di, cols, col_ok, hidden_size, False, UPCAST, ACC,
                                    BLOCK_M, BLOCK_N, BLOCK_K)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    out_rows = rows.to(tl.int64)[:, None]
    pre_width = 2 * intermediate if GATED else intermediate
    dtype = hidden_ptr.dtype.element_ty
    gate_cols, up_cols, _ = _gate_up_columns(cols, intermediate, GATED, INTERLEAVED)
    gate = tl.load(pre_ptr + out_rows * pre_width + gate_cols[None, :], mask=tile_ok, other=0.0).to(ACC)
    scaled = grad_hidden * tl.load(coef_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if GATED:
        up = tl.load(pre_ptr + out_rows * pre_width + up_cols[None, :], mask=tile_ok, other=0.0).to(ACC)
        hidden, d_gate, d_up = _gated(gate, up, alpha, limit, ACTIVATION)
        hidden = hidden.to(dtype)
        tl.store(grad_pre_ptr + out_rows * pre_width + gate_cols[None, :], (scaled * d_gate).to(dtype), mask=tile_ok)
        tl.store(grad_pre_ptr + out_rows * pre_width + up_cols[None, :], (scaled * d_up).to(dtype), mask=tile_ok)
    else:
        hidden = _activate(gate, ACTIVATION).to(dtype)
        tl.store(grad_pre_ptr + out_rows * pre_width + cols[None, :],
                 (scaled * _activate_grad(gate, ACTIVATION)).to(dtype), mask=tile_ok)
    tl.store(hidden_ptr + out_rows * intermediate + cols[None, :], hidden, mask=tile_ok)
    tl.store(coef_partials_ptr + column_tile * num_rows + rows, tl.sum(grad_hidden * hidden.to(ACC), axis=1),
             mask=row_ok)


@triton.jit
def _expert_weight_grad_kernel(p_ptr, q_ptr, token_ids_ptr, coef_ptr, offsets_ptr, out_ptr, out_rows, out_cols,
                               stride_pr, stride_pc, stride_qr, stride_qc, stride_oe, stride_om, stride_on,
                               GATHER_P: tl.constexpr, HAS_COEF: tl.constexpr, UPCAST: tl.constexpr,
                               ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
    """``out[e] = sum_r (c[r] p[r])^T q[r]`` over the rows r of expert e, in row order, one
    output tile per program; the rows of p (GATHER_P) or else of q are read through the token ids."""
    expert = tl.program_id(2)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < out_rows
    n_ok = n < out_cols
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        ok = rows < end
        tokens = tl.load(token_ids_ptr + rows, mask=ok, other=0).to(tl.int64)
        if GATHER_P:
            p_rows = tokens
            q_rows = rows.to(tl.int64)
        else:
            p_rows = rows.to(tl.int64)
            q_rows = tokens
        p = tl.load(p_ptr + p_rows[:, None] * stride_pr + m[None, :] * stride_pc, mask=ok[:, None] & m_ok[None, :],
                    other=0.0)
        if HAS_COEF:  # c * p rounded to p's dtype, as an operand of the product
            p = (p.to(ACC) * tl.load(coef_ptr + rows, mask=ok, other=0.0)[:, None]).to(p_ptr.dtype.element_ty)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qr + n[None, :] * stride_qc, mask=ok[:, None] & n_ok[None, :],
                    other=0.0)
        if UPCAST:
            p = p.to(ACC)
            q = q.to(ACC)
        acc = tl.dot(tl.trans(p), q, acc, input_precision="ieee", out_dtype=ACC)
    tl.store(out_ptr + expert.to(tl.int64) * stride_oe + m[:, None] * stride_om + n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _expert_row_sum_kernel(rows_ptr, token_ids_ptr, coef_ptr, offsets_ptr, out_ptr, bias_ptr, row_dot_ptr, num_rows,
                           width, stride_rr, stride_rc, stride_oe, stride_oc, stride_be, stride_bc,
                           GATHER: tl.constexpr, HAS_COEF: tl.constexpr, ROW_DOT: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out[e] = sum_r c[r] * rows[r]`` over the dispatch rows r of expert e in row order (a bias
    gradient), for this program's column block; the rows are token rows read through the token ids
    (GATHER) or dispatch rows. ROW_DOT also writes ``<rows[r], bias[e]>`` over the block to
    ``row_dot[column block, r]``."""
    block = tl.program_id(0)
    expert = tl.program_id(1)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    if ROW_DOT:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_be + cols * stride_bc, mask=col_ok, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = rows < end
        if GATHER:
            sources = tl.load(token_ids_ptr + rows, mask=ok, other=0).to(tl.int64)
        else:
            sources = rows.to(tl.int64)
        tile = tl.load(rows_ptr + sources[:, None] * stride_rr + cols[None, :] * stride_rc,
                       mask=ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
        if ROW_DOT:
            tl.store(row_dot_ptr + block * num_rows + rows, tl.sum(tile * bias[None, :], axis=1), mask=ok)
        if HAS_COEF:
            tile = tile * tl.load(coef_ptr + rows, mask=ok, other=0.0)[:, None]
        acc += tl.sum(tile, axis=0)
    tl.store(out_ptr + expert.to(tl.int64) * stride_oe + cols * stride_oc, acc.to(out_ptr.dtype.element_ty),
             mask=col_ok)


def _fit(block: int, size: int, floor: int = 16) -> int:
    """``block``, or the power of two covering ``size`` when that is smaller (at least tl.dot's 16)."""
    return max(floor, min(block, triton.next_power_of_2(max(size, 1))))


def row_tile_config(dtype: torch.dtype, interpreter: bool, rows_per_expert: int) -> dict[str, int]:
    """Row tile of the dispatch-row GEMMs (shared by the kernels of one pass, which share the
    tile table), warps and stages: 128 rows of 16-bit operands for the tensor cores, 64 in fp32
    (full-precision products). Under the interpreter a program costs milliseconds and its cost
    grows with the tile's elements: tiles fitted to the sizes."""
    if interpreter:
        return dict(BLOCK_M=_fit(64, rows_per_expert), num_warps=4, num_stages=1)
    if dtype in (torch.float16, torch.bfloat16):
        return dict(BLOCK_M=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, num_warps=4, num_stages=2)


def column_tiles(dtype: torch.dtype, interpreter: bool, width: int, depth: int, *, narrow: int = 1
                 ) -> dict[str, int]:
    """BLOCK_N over the ``width`` output columns and BLOCK_K over the ``depth`` of the product;
    ``narrow`` divides BLOCK_N for kernels holding more tiles than the accumulator (2: the gated
    gate_up GEMM's two accumulators; the backward's epilogue with the pre tiles: 2, gated 4),
    so that they fit in registers without spills."""
    if interpreter:
        return dict(BLOCK_N=_fit(256, width), BLOCK_K=_fit(128, depth))
    wide = dtype in (torch.float16, torch.bfloat16)
    # fp32 products run on FMAs with both operand tiles in registers: a short BLOCK_K keeps
    # them from spilling.
    return dict(BLOCK_N=_fit((128 if wide else 64) // narrow, width), BLOCK_K=_fit(64 if wide else 16, depth))


def weight_grad_config(dtype: torch.dtype, interpreter: bool, out_rows: int, out_cols: int,
                       rows_per_expert: int) -> dict[str, int]:
    """Output tile of a per-expert weight gradient and BLOCK_K, the dispatch rows reduced per step."""
    if interpreter:
        return dict(BLOCK_M=_fit(256, out_rows), BLOCK_N=_fit(256, out_cols), BLOCK_K=_fit(64, rows_per_expert),
                    num_warps=4, num_stages=1)
    if dtype in (torch.float16, torch.bfloat16):
        return dict(BLOCK_M=128, BLOCK_N=_fit(128, out_cols), BLOCK_K=64, num_warps=8, num_stages=3)
    # 8 warps: with 4, Triton 3.6's fp32 d down spills on sm_80.
    return dict(BLOCK_M=64, BLOCK_N=_fit(64, out_cols), BLOCK_K=32, num_warps=8, num_stages=2)


def _precision(dtype: torch.dtype, interpreter: bool) -> dict:
    """UPCAST (16-bit operands widened before tl.dot: the interpreter's 16-bit dot is wrong) and ACC."""
    return dict(UPCAST=interpreter and dtype in (torch.float16, torch.bfloat16),
                ACC=tl.float64 if dtype == torch.float64 else tl.float32)


def _row_tiles(expert_offsets: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(expert, first row) of every row tile, on the device, and the host bound of their count.
    Expert e's tiles follow those of experts < e; tiles past the last get expert E."""
    num_experts = expert_offsets.shape[0] - 1
    bound = triton.cdiv(num_rows, block_m) + num_experts
    tiles = (expert_offsets.diff() + block_m - 1) // block_m
    ends = tiles.cumsum(0)
    ids = torch.arange(bound, device=expert_offsets.device)
    tile_expert = torch.searchsorted(ends, ids, right=True)
    owner = tile_expert.clamp(max=num_experts - 1)
    tile_start = expert_offsets[owner] + (ids - (ends - tiles)[owner]) * block_m
    return tile_expert.to(torch.int32), tile_start.to(torch.int32), bound


def _slot_of_row(inverse_positions: torch.Tensor) -> torch.Tensor:
    """``[N * k]`` int32: the routing slot ``t * k + j`` of each dispatch row (inverse_positions inverted)."""
    num_slots = inverse_positions.numel()
    slots = torch.arange(num_slots, dtype=torch.int32, device=inverse_positions.device)
    return torch.empty_like(slots).scatter_(0, inverse_positions.reshape(-1).long(), slots)


def _slot_sum(slot_rows: torch.Tensor, inverse_positions: torch.Tensor, expert_offsets: torch.Tensor,
              out: torch.Tensor, acc) -> torch.Tensor:
    num_tokens, top_k = inverse_positions.shape
    dim = out.shape[1]
    grid = (triton.cdiv(num_tokens, SLOT_SUM_BLOCK_T), triton.cdiv(dim, SLOT_SUM_BLOCK_D))
    _slot_sum_kernel[grid](slot_rows, inverse_positions, expert_offsets, out, num_tokens, top_k, dim,
                           expert_offsets.shape[0] - 1, ACC=acc, BLOCK_T=SLOT_SUM_BLOCK_T, BLOCK_D=SLOT_SUM_BLOCK_D)
    return out


def experts_forward(x: torch.Tensor, sorted_token_ids: torch.Tensor, inverse_positions: torch.Tensor,
                    expert_offsets: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, coef_rows: torch.Tensor,
                    activation: str, gated: bool, keep_pre: bool = True, *, gate_up_bias: torch.Tensor | None = None,
                    down_bias: torch.Tensor | None = None, interleaved: bool = False, swiglu_alpha: float = 1.702,
                    swiglu_limit: float = 7.0, interpreter: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out ``[N, H]``, pre-activations ``[N * k, 2I or I]`` in dispatch order and gate_up's row
    layout, or ``[0, 2I or I]`` without ``keep_pre``) of the grouped experts: ``out[t] = sum_j c[r] *
    (down[e] @ act(gate_up[e] @ x[t] + gate_up_bias[e]) + down_bias[e])`` with ``r`` the row of slot
    ``(t, j)`` and ``c = coef_rows`` (fp32); gate and up rows concatenated or ``interleaved``,
    ``swiglu_alpha`` and ``swiglu_limit`` those of clamped_swiglu. x, gate_up, down and the biases
    in any strides. ``interpreter`` (default: whether x is off CUDA) picks the tiles."""
    inverse_positions = inverse_positions.contiguous()
    num_tokens, hidden_size = x.shape
    num_rows = sorted_token_ids.shape[0]
    num_experts = expert_offsets.shape[0] - 1
    intermediate = down.shape[2]
    pre = torch.empty(num_rows if keep_pre else 0, gate_up.shape[1], dtype=x.dtype, device=x.device)
    out = torch.empty(num_tokens, hidden_size, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out.zero_(), pre
    if interpreter is None:
        interpreter = x.device.type != "cuda"
    precision = _precision(x.dtype, interpreter)
    rows = row_tile_config(x.dtype, interpreter, triton.cdiv(num_rows, num_experts))
    tile_expert, tile_start, bound = _row_tiles(expert_offsets, num_rows, rows["BLOCK_M"])
    hidden = torch.empty(num_rows, intermediate, dtype=x.dtype, device=x.device)
    # Interleaved rows of a transposed stack (gpt-oss's) are read at stride 2: narrower 16-bit
    # tiles keep their addresses in registers without spills.
    wide_interleaved = interleaved and x.dtype in (torch.float16, torch.bfloat16)
    first = column_tiles(x.dtype, interpreter, intermediate, hidden_size,
                         narrow=(4 if wide_interleaved else 2) if gated else 1)
    # An absent bias is passed as another tensor of x's dtype, never read.
    _gate_up_kernel[(bound * triton.cdiv(intermediate, first["BLOCK_N"]),)](
        x, sorted_token_ids, expert_offsets, tile_expert, tile_start, gate_up, _or(gate_up_bias, x), pre, hidden,
        num_experts, hidden_size, intermediate, float(swiglu_alpha), float(swiglu_limit), *x.stride(),
        *gate_up.stride(), *_or(gate_up_bias, x).stride(), ACTIVATION=ACTIVATION_CODES[activation], GATED=gated,
        INTERLEAVED=interleaved, HAS_BIAS=gate_up_bias is not None, STORE_PRE=keep_pre, **precision, **rows, **first)
    slot_rows = torch.empty(num_rows, hidden_size, dtype=x.dtype, device=x.device)
    # B[k, n] = down[e, n, k]: k over I, n over H
    second = column_tiles(x.dtype, interpreter, hidden_size, intermediate)
    _rows_to_slots_kernel[(bound * triton.cdiv(hidden_size, second["BLOCK_N"]),)](
        hidden, expert_offsets, tile_expert, tile_start, _slot_of_row(inverse_positions), coef_rows, down,
        _or(down_bias, x), slot_rows, num_experts, intermediate, hidden_size, intermediate, down.stride(0),
        down.stride(2), down.stride(1), *_or(down_bias, x).stride(), HAS_COEF=True, HAS_BIAS=down_bias is not None,
        **precision, **rows, **second)
    return _slot_sum(slot_rows, inverse_positions, expert_offsets, out, precision["ACC"]), pre


def _or(tensor: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """``tensor``, or for an absent one a 2-D stand-in a kernel takes and never reads."""
    return stand_in if tensor is None else tensor


def experts_backward(grad_out: torch.Tensor, x: torch.Tensor, sorted_token_ids: torch.Tensor,
                     inverse_positions: torch.Tensor, expert_offsets: torch.Tensor, gate_up: torch.Tensor,
                     down: torch.Tensor, coef_rows: torch.Tensor, pre: torch.Tensor, activation: str, gated: bool,
                     *, gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                     interleaved: bool = False, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                     interpreter: bool | None = None) -> tuple[torch.Tensor, ...]:
    """(d x, d gate_up, d down, d coef_rows, d gate_up_bias, d down_bias) of :func:`experts_forward`,
    the activation recomputed from ``pre``; every sum in a fixed order. The weight and bias
    gradients come in the strides ``torch.empty_like`` gives them; an absent bias's is empty."""
    grad_gate_up = torch.empty_like(gate_up)
    grad_down = torch.empty_like(down)
    grad_gate_up_bias = x.new_empty(0) if gate_up_bias is None else torch.empty_like(gate_up_bias)
    grad_down_bias = x.new_empty(0) if down_bias is None else torch.empty_like(down_bias)
    if sorted_token_ids.shape[0] == 0:
        return (x.new_zeros(x.shape), grad_gate_up.zero_(), grad_down.zero_(), coef_rows.new_zeros(coef_rows.shape),
                grad_gate_up_bias.zero_(), grad_down_bias.zero_())
    if interpreter is None:
        interpreter = x.device.type != "cuda"
    grad_x, grad_coef, grad_pre, hidden = _backward_rows(grad_out, x, sorted_token_ids, inverse_positions,
                                                         expert_offsets, gate_up, down, coef_rows, pre, activation,
                                                         gated, interpreter, interleaved, swiglu_alpha, swiglu_limit)
    expert_weight_grad(grad_pre, x, sorted_token_ids, expert_offsets, grad_gate_up, gather_p=False,
                       interpreter=interpreter)
    expert_weight_grad(grad_out, hidden, sorted_token_ids, expert_offsets, grad_down, gather_p=True,
                       coef_rows=coef_rows, interpreter=interpreter)
    if gate_up_bias is not None:
        expert_row_sum(grad_pre, sorted_token_ids, expert_offsets, grad_gate_up_bias, gather=False,
                       interpreter=interpreter)
    if down_bias is not None:
        # d c[r] gains <g[t(r)], down_bias[e]>: partials of it by column block, summed in block order.
        bias_dots = expert_row_sum(grad_out, sorted_token_ids, expert_offsets, grad_down_bias, gather=True,
                                   coef_rows=coef_rows, bias=down_bias, interpreter=interpreter)
        grad_coef = grad_coef + bias_dots.sum(0)
    return grad_x, grad_gate_up, grad_down, grad_coef, grad_gate_up_bias, grad_down_bias


def _backward_rows(grad_out, x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows, pre,
                   activation: str, gated: bool, interpreter: bool, interleaved: bool = False,
                   swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0):
    """(d x, d coef_rows without the down bias's term, d pre, hidden): the row GEMMs of the
    backward, hidden recomputed."""
    inverse_positions = inverse_positions.contiguous()
    hidden_size = x.shape[1]
    num_rows = sorted_token_ids.shape[0]
    num_experts = expert_offsets.shape[0] - 1
    intermediate = down.shape[2]
    pre_width = pre.shape[1]
    device = x.device
    precision = _precision(x.dtype, interpreter)
    rows_per_expert = triton.cdiv(num_rows, num_experts)
    rows = row_tile_config(x.dtype, interpreter, rows_per_expert)
    tile_expert, tile_start, bound = _row_tiles(expert_offsets, num_rows, rows["BLOCK_M"])
    hidden = torch.empty(num_rows, intermediate, dtype=x.dtype, device=device)
    grad_pre = torch.empty(num_rows, pre_width, dtype=x.dtype, device=device)
    first = column_tiles(x.dtype, interpreter, intermediate, hidden_size, narrow=4 if gated else 2)
    num_column_tiles = triton.cdiv(intermediate, first["BLOCK_N"])
    # Zeros: rows past expert_offsets[E] get no program and must add nothing.
    coef_partials = torch.zeros(num_column_tiles, num_rows, dtype=coef_rows.dtype, device=device)
    _down_backward_kernel[(bound * num_column_tiles,)](
        grad_out, sorted_token_ids, expert_offsets, tile_expert, tile_start, coef_rows, pre, down,
        grad_pre, hidden, coef_partials, num_experts, num_rows, hidden_size, intermediate, float(swiglu_alpha),
        float(swiglu_limit), *grad_out.stride(), *down.stride(), ACTIVATION=ACTIVATION_CODES[activation], GATED=gated,
        INTERLEAVED=interleaved, **precision, **rows, **first)
    grad_coef = coef_partials.sum(0)
    slot_rows = torch.empty(num_rows, hidden_size, dtype=x.dtype, device=device)
    # B[k, n] = gate_up[e, k, n]: k over 2I (or I), n over H
    second = column_tiles(x.dtype, interpreter, hidden_size, pre_width)
    _rows_to_slots_kernel[(bound * triton.cdiv(hidden_size, second["BLOCK_N"]),)](
        grad_pre, expert_offsets, tile_expert, tile_start, _slot_of_row(inverse_positions), coef_rows, gate_up,
        grad_pre, slot_rows, num_experts, pre_width, hidden_size, pre_width, gate_up.stride(0), gate_up.stride(1),
        gate_up.stride(2), *grad_pre.stride(), HAS_COEF=False, HAS_BIAS=False, **precision, **rows, **second)
    grad_x = _slot_sum(slot_rows, inverse_positions, expert_offsets, torch.empty(x.shape, dtype=x.dtype, device=device),
                       precision["ACC"])
    return grad_x, grad_coef, grad_pre, hidden


def expert_weight_grad(p: torch.Tensor, q: torch.Tensor, sorted_token_ids: torch.Tensor,
                       expert_offsets: torch.Tensor, out: torch.Tensor, *, gather_p: bool,
                       coef_rows: torch.Tensor | None = None, interpreter: bool) -> torch.Tensor:
    """``out[e] = sum_r (c[r] p[r])^T q[r]`` over the dispatch rows of expert e (``out``: an
    ``[E, P, Q]`` in any strides); the rows of p (``gather_p``) or else of q are token rows read
    through ``sorted_token_ids``, the other operand has one row per dispatch row."""
    num_experts, out_rows, out_cols = out.shape
    config = weight_grad_config(out.dtype, interpreter, out_rows, out_cols,
                                triton.cdiv(sorted_token_ids.shape[0], num_experts))
    grid = (triton.cdiv(out_rows, config["BLOCK_M"]), triton.cdiv(out_cols, config["BLOCK_N"]), num_experts)
    has_coef = coef_rows is not None
    _expert_weight_grad_kernel[grid](p, q, sorted_token_ids, coef_rows if has_coef else p, expert_offsets, out,
                                     out_rows, out_cols, *p.stride(), *q.stride(), *out.stride(), GATHER_P=gather_p,
                                     HAS_COEF=has_coef, **_precision(out.dtype, interpreter), **config)
    return out


def row_sum_config(interpreter: bool, width: int, rows_per_expert: int) -> dict[str, int]:
    """Column block and rows per step of the bias gradients' row sums."""
    if interpreter:
        return dict(BLOCK_R=_fit(64, rows_per_expert), BLOCK_N=_fit(256, width), num_warps=4)
    return dict(BLOCK_R=32, BLOCK_N=_fit(128, width), num_warps=4)


def expert_row_sum(rows: torch.Tensor, sorted_token_ids: torch.Tensor, expert_offsets: torch.Tensor,
                   out: torch.Tensor, *, gather: bool, coef_rows: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, interpreter: bool) -> torch.Tensor | None:
    """``out[e] = sum_r c[r] rows[r]`` over the dispatch rows of expert e in row order (``out``:
    ``[E, width]`` in any strides); ``rows`` are token rows read through ``sorted_token_ids``
    (``gather``) or dispatch rows. With ``bias`` (``[E, width]``), returns the fp32 partials
    ``[column blocks, M]`` of ``<rows[r], bias[e]>``, zero for rows past ``offsets[E]``."""
    num_experts, width = out.shape
    num_rows = sorted_token_ids.shape[0]
    config = row_sum_config(interpreter, width, triton.cdiv(num_rows, num_experts))
    blocks = triton.cdiv(width, config["BLOCK_N"])
    acc = _precision(out.dtype, interpreter)["ACC"]
    row_dots = None if bias is None else torch.zeros(blocks, num_rows, dtype=torch.float64 if acc == tl.float64
                                                     else torch.float32, device=rows.device)
    _expert_row_sum_kernel[(blocks, num_experts)](
        rows, sorted_token_ids, _or(coef_rows, rows), expert_offsets, out, _or(bias, out), _or(row_dots, out),
        num_rows, width, *rows.stride(), *out.stride(), *_or(bias, out).stride(), GATHER=gather,
        HAS_COEF=coef_rows is not None, ROW_DOT=bias is not None, ACC=acc, **config)
    return row_dots


# Example launches at a Qwen3-MoE layer's widths (H = 2048, I = 768, top-8), 8 experts.
_AOT_TOKENS, _AOT_TOP_K, _AOT_EXPERTS, _AOT_HIDDEN, _AOT_INTERMEDIATE = 256, 8, 8, 2048, 768


def _example_inputs(dtype: torch.dtype, gated: bool, transposed: bool = False):
    """x, the dispatch, gate_up, down and coef_rows; ``transposed``: the stacks as the transposed
    views of Aria's and gpt-oss's [E, H, 2I] and [E, I, H]."""
    rows = _AOT_TOKENS * _AOT_TOP_K
    dispatch = (torch.zeros(rows, dtype=torch.int32),
                torch.arange(rows, dtype=torch.int32).view(_AOT_TOKENS, _AOT_TOP_K),
                torch.arange(_AOT_EXPERTS + 1) * (rows // _AOT_EXPERTS))
    gate_up_rows = (2 if gated else 1) * _AOT_INTERMEDIATE
    if transposed:
        gate_up = torch.empty(_AOT_EXPERTS, _AOT_HIDDEN, gate_up_rows, dtype=dtype).transpose(1, 2)
        down = torch.empty(_AOT_EXPERTS, _AOT_INTERMEDIATE, _AOT_HIDDEN, dtype=dtype).transpose(1, 2)
    else:
        gate_up = torch.empty(_AOT_EXPERTS, gate_up_rows, _AOT_HIDDEN, dtype=dtype)
        down = torch.empty(_AOT_EXPERTS, _AOT_HIDDEN, _AOT_INTERMEDIATE, dtype=dtype)
    return (torch.empty(_AOT_TOKENS, _AOT_HIDDEN, dtype=dtype), *dispatch, gate_up, down, torch.empty(rows))


def _gpt_oss_options(dtype: torch.dtype) -> dict:
    """gpt-oss's experts: both biases, interleaved gate/up rows (with clamped_swiglu)."""
    return dict(gate_up_bias=torch.empty(_AOT_EXPERTS, 2 * _AOT_INTERMEDIATE, dtype=dtype),
                down_bias=torch.empty(_AOT_EXPERTS, _AOT_HIDDEN, dtype=dtype), interleaved=True)


def _example_forward(dtype: torch.dtype, activation: str, gated: bool, keep_pre: bool = True, gpt_oss: bool = False):
    experts_forward(*_example_inputs(dtype, gated, transposed=gpt_oss), activation, gated, keep_pre,
                    interpreter=False, **(_gpt_oss_options(dtype) if gpt_oss else {}))


def _example_backward(dtype: torch.dtype, activation: str, gated: bool, gpt_oss: bool = False):
    """The row kernels of the backward (its weight and bias gradients: :func:`_example_weight_grad`,
    :func:`_example_bias_grad`)."""
    inputs = _example_inputs(dtype, gated, transposed=gpt_oss)
    pre = torch.empty(inputs[1].shape[0], inputs[4].shape[1], dtype=dtype)
    _backward_rows(torch.empty_like(inputs[0]), *inputs, pre, activation, gated, interpreter=False,
                   interleaved=gpt_oss)


def _example_weight_grad(dtype: torch.dtype, of_gate_up: bool, transposed: bool = False):
    x, sorted_token_ids, _, expert_offsets, gate_up, down, coef_rows = _example_inputs(dtype, True, transposed)
    rows = sorted_token_ids.shape[0]
    if of_gate_up:  # d gate_up from d pre rows and token rows
        expert_weight_grad(torch.empty(rows, gate_up.shape[1], dtype=dtype), x, sorted_token_ids, expert_offsets,
                           torch.empty_like(gate_up), gather_p=False, interpreter=False)
    else:  # d down from weighted grad rows (token rows) and hidden rows
        expert_weight_grad(torch.empty_like(x), torch.empty(rows, down.shape[2], dtype=dtype), sorted_token_ids,
                           expert_offsets, torch.empty_like(down), gather_p=True, coef_rows=coef_rows,
                           interpreter=False)


def _example_bias_grad(dtype: torch.dtype, of_gate_up: bool):
    x, sorted_token_ids, _, expert_offsets, _, _, coef_rows = _example_inputs(dtype, True)
    biases = _gpt_oss_options(dtype)
    if of_gate_up:  # d gate_up_bias from d pre rows
        expert_row_sum(torch.empty(sorted_token_ids.shape[0], 2 * _AOT_INTERMEDIATE, dtype=dtype), sorted_token_ids,
                       expert_offsets, biases["gate_up_bias"], gather=False, interpreter=False)
    else:  # d down_bias from weighted grad rows (token rows), and the bias's part of d c
        expert_row_sum(torch.empty_like(x), sorted_token_ids, expert_offsets, torch.empty_like(biases["down_bias"]),
                       gather=True, coef_rows=coef_rows, bias=biases["down_bias"], interpreter=False)


def _cases(name: str, dtype: torch.dtype, activation: str, gated: bool, gpt_oss: bool = False):
    return {f"experts.forward_{name}": lambda: _example_forward(dtype, activation, gated, gpt_oss=gpt_oss),
            f"experts.backward_{name}": lambda: _example_backward(dtype, activation, gated, gpt_oss=gpt_oss)}


AOT_CASES = {**_cases("bf16_silu_gated", torch.bfloat16, "silu", True),
             **_cases("fp16_gelu_tanh_gated", torch.float16, "gelu_tanh", True),
             **_cases("fp32_silu_gated", torch.float32, "silu", True),
             **_cases("bf16_gelu", torch.bfloat16, "gelu", False),
             # Nemotron-H's experts: relu2, ungated
             **_cases("bf16_relu2", torch.bfloat16, "relu2", False),
             # gpt-oss's: biased, interleaved, clamped_swiglu, transposed stacks
             **_cases("bf16_gpt_oss", torch.bfloat16, "clamped_swiglu", True, gpt_oss=True),
             **_cases("fp32_gpt_oss", torch.float32, "clamped_swiglu", True, gpt_oss=True),
             "experts.forward_bf16_silu_gated_inference": lambda: _example_forward(torch.bfloat16, "silu", True,
                                                                                   keep_pre=False),
             **{f"experts.weight_grad_{name}_{operand}{'_transposed' if transposed else ''}": (
                 lambda d=dtype, g=operand == "gate_up", t=transposed: _example_weight_grad(d, g, t))
                for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
                for operand in ("gate_up", "down") for transposed in (False, True)},
             **{f"experts.bias_grad_{name}_{operand}": (lambda d=dtype, g=operand == "gate_up":
                                                        _example_bias_grad(d, g))
                for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
                for operand in ("gate_up", "down")}}
