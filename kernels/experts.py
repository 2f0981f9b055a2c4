"""Grouped expert FFNs on stacked weights: grouped GEMMs over the expert-ordered rows of a
dispatch, with the gather, the gated activation, the routing weight and the sum over each
token's k slots fused in (see :mod:`astrea.ops.experts` for the op and its layout).

Forward (``M = N * k`` rows in dispatch order, row ``r`` holding token ``t(r)`` for expert ``e``):

* ``_gate_up_kernel``: ``pre[r] = gate_up[e] @ x[t(r)]``, the token rows read through the
  dispatch's token ids inside the A-tile loads (no permuted copy of x). It writes ``pre``
  (kept for the backward) and, from the rounded ``pre``, ``hidden[r] = act(gate) * up`` (or
  ``act(pre)``): gate and up columns of a tile are multiplied in one program.
* ``_rows_to_slots_kernel``: ``c[r] * (down[e] @ hidden[r])`` written to the row of its routing
  slot ``(t, j)`` in a ``[N * k, H]`` buffer; ``_slot_sum_kernel`` sums each token's k slot rows
  in slot order. No float atomics anywhere: bitwise reproducible.

Backward, recomputing the activation from ``pre``:

* ``_down_backward_kernel``: ``dh[r] = down[e]^T @ g[t(r)]`` (grad rows read through the token
  ids), and in its epilogue ``hidden`` again, ``d pre`` (``c * dh`` through the activation) and
  per-column-tile partials of ``d c[r] = <dh[r], hidden[r]>`` summed afterwards in tile order.
* ``_rows_to_slots_kernel`` again: ``d pre[r] @ gate_up[e]`` to the slot rows, summed per token
  by ``_slot_sum_kernel`` into ``d x``.
* ``_expert_weight_grad_kernel``: ``d gate_up[e] = sum_r d pre[r]^T x[t(r)]`` and
  ``d down[e] = sum_r (c[r] g[t(r)])^T hidden[r]``; each program owns one output tile of one
  expert and walks that expert's rows in order (an expert without rows gets zeros).

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
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "relu2": 4}

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
def _row_tile(tile_expert_ptr, tile_start_ptr, offsets_ptr, num_experts, width, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """(expert, rows, row_ok, column tile, live) of this program; ``live`` is False past the last
    row tile. Column tiles vary fastest: the programs running together share their A rows and
    their expert's weights in L2."""
    column_tiles = tl.cdiv(width, BLOCK_N)
    tile = tl.program_id(0) // column_tiles
    expert = tl.load(tile_expert_ptr + tile)
    live = expert < num_experts
    safe_expert = tl.where(live, expert, 0)
    end = tl.load(offsets_ptr + safe_expert + 1)
    rows = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    return safe_expert.to(tl.int64), rows, rows < end, tl.program_id(0) % column_tiles, live


@triton.jit
def _gate_up_kernel(x_ptr, token_ids_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, gate_up_ptr,
                    pre_ptr, hidden_ptr, num_experts, hidden_size, intermediate,
                    stride_xt, stride_xh, stride_ge, stride_gn, stride_gh,
                    ACTIVATION: tl.constexpr, GATED: tl.constexpr, STORE_PRE: tl.constexpr, UPCAST: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``pre[r] = gate_up[e] @ x[t(r)]`` for the gate (and up) columns of this tile, the token
    rows read through the token ids; writes pre (STORE_PRE) and the activated rows."""
    expert, rows, row_ok, column_tile, live = _row_tile(tile_expert_ptr, tile_start_ptr, offsets_ptr, num_experts,
                                                        intermediate, BLOCK_M, BLOCK_N)
    if not live:
        return
    tokens = tl.load(token_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = column_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < intermediate
    # B[k, n] = gate_up[e, n, k]: the gate rows, then (PAIR) the up rows I further on.
    gate, up = _expert_matmul(x_ptr, tokens * stride_xt, stride_xh, row_ok, gate_up_ptr + expert * stride_ge,
                              intermediate * stride_gn, stride_gh, stride_gn, cols, col_ok, hidden_size,
                              GATED, UPCAST, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    out_rows = rows.to(tl.int64)[:, None]
    dtype = pre_ptr.dtype.element_ty
    pre_width = 2 * intermediate if GATED else intermediate
    gate = gate.to(dtype)
    if STORE_PRE:
        tl.store(pre_ptr + out_rows * pre_width + cols[None, :], gate, mask=tile_ok)
    # hidden from the rounded pre, exactly as the backward recomputes it
    hidden = _activate(gate.to(ACC), ACTIVATION)
    if GATED:
        up = up.to(dtype)
        if STORE_PRE:
            tl.store(pre_ptr + out_rows * pre_width + intermediate + cols[None, :], up, mask=tile_ok)
        hidden = hidden * up.to(ACC)
    tl.store(hidden_ptr + out_rows * intermediate + cols[None, :], hidden.to(dtype), mask=tile_ok)


@triton.jit
def _rows_to_slots_kernel(a_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, slot_of_row_ptr, coef_ptr, w_ptr,
                          out_ptr, num_experts, depth, width, stride_ar, stride_we, stride_wk, stride_wn,
                          HAS_COEF: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[slot(r)] = c[r] * (a[r] @ B_e)`` (or without c) with ``B_e[k, n] = w[e, k * stride_wk +
    n * stride_wn]``: the forward's down projection and the backward's d x rows."""
    expert, rows, row_ok, column_tile, live = _row_tile(tile_expert_ptr, tile_start_ptr, offsets_ptr, num_experts,
                                                        width, BLOCK_M, BLOCK_N)
    if not live:
        return
    cols = column_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    acc, _ = _expert_matmul(a_ptr, rows.to(tl.int64) * stride_ar, 1, row_ok, w_ptr + expert * stride_we, 0,
                            stride_wk, stride_wn, cols, col_ok, depth, False, UPCAST, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
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
                          num_experts, num_rows, hidden_size, intermediate,
                          stride_gt, stride_gh, stride_de, stride_dh, stride_di,
                          ACTIVATION: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dh[r] = down[e]^T @ g[t(r)]``; epilogue: hidden recomputed from pre, ``d pre`` from
    ``c[r] * dh[r]`` and this column tile's part of ``d c[r] = <dh[r], hidden[r]>``."""
    expert, rows, row_ok, column_tile, live = _row_tile(tile_expert_ptr, tile_start_ptr, offsets_ptr, num_experts,
                                                        intermediate, BLOCK_M, BLOCK_N)
    if not live:
        return
    tokens = tl.load(token_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = column_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < intermediate
    # B[k, n] = down[e, k, n]: k over H, n over I
    grad_hidden, _ = _expert_matmul(grad_out_ptr, tokens * stride_gt, stride_gh, row_ok, down_ptr + expert * stride_de,
                                    0, stride_dh, stride_di, cols, col_ok, hidden_size, False, UPCAST, ACC,
                                    BLOCK_M, BLOCK_N, BLOCK_K)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    out_rows = rows.to(tl.int64)[:, None]
    pre_width = 2 * intermediate if GATED else intermediate
    dtype = hidden_ptr.dtype.element_ty
    gate = tl.load(pre_ptr + out_rows * pre_width + cols[None, :], mask=tile_ok, other=0.0).to(ACC)
    activated = _activate(gate, ACTIVATION)
    scaled = grad_hidden * tl.load(coef_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if GATED:
        up = tl.load(pre_ptr + out_rows * pre_width + intermediate + cols[None, :], mask=tile_ok, other=0.0).to(ACC)
        hidden = (activated * up).to(dtype)
        tl.store(grad_pre_ptr + out_rows * pre_width + cols[None, :],
                 (scaled * up * _activate_grad(gate, ACTIVATION)).to(dtype), mask=tile_ok)
        tl.store(grad_pre_ptr + out_rows * pre_width + intermediate + cols[None, :], (scaled * activated).to(dtype),
                 mask=tile_ok)
    else:
        hidden = activated.to(dtype)
        tl.store(grad_pre_ptr + out_rows * pre_width + cols[None, :],
                 (scaled * _activate_grad(gate, ACTIVATION)).to(dtype), mask=tile_ok)
    tl.store(hidden_ptr + out_rows * intermediate + cols[None, :], hidden, mask=tile_ok)
    tl.store(coef_partials_ptr + column_tile * num_rows + rows, tl.sum(grad_hidden * hidden.to(ACC), axis=1),
             mask=row_ok)


@triton.jit
def _expert_weight_grad_kernel(p_ptr, q_ptr, token_ids_ptr, coef_ptr, offsets_ptr, out_ptr, out_rows, out_cols,
                               stride_pr, stride_pc, stride_qr, stride_qc,
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
    tl.store(out_ptr + expert.to(tl.int64) * out_rows * out_cols + m[:, None] * out_cols + n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


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
    """(out ``[N, H]``, pre-activations ``[N * k, 2I or I]`` in dispatch order, or ``[0, 2I or I]``
    without ``keep_pre``) of the grouped experts: ``out[t] = sum_j c[r] * down[e] @ act(gate_up[e]
    @ x[t])`` with ``r`` the row of slot ``(t, j)`` and ``c = coef_rows`` (fp32). x, gate_up and
    down in any strides. ``interpreter`` (default: whether x is off CUDA) picks the tiles."""
    _not_yet(gate_up_bias, down_bias, interleaved, activation)
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
    first = column_tiles(x.dtype, interpreter, intermediate, hidden_size, narrow=2 if gated else 1)
    _gate_up_kernel[(bound * triton.cdiv(intermediate, first["BLOCK_N"]),)](
        x, sorted_token_ids, expert_offsets, tile_expert, tile_start, gate_up, pre, hidden,
        num_experts, hidden_size, intermediate, *x.stride(), *gate_up.stride(),
        ACTIVATION=ACTIVATION_CODES[activation], GATED=gated, STORE_PRE=keep_pre, **precision, **rows, **first)
    slot_rows = torch.empty(num_rows, hidden_size, dtype=x.dtype, device=x.device)
    # B[k, n] = down[e, n, k]: k over I, n over H
    second = column_tiles(x.dtype, interpreter, hidden_size, intermediate)
    _rows_to_slots_kernel[(bound * triton.cdiv(hidden_size, second["BLOCK_N"]),)](
        hidden, expert_offsets, tile_expert, tile_start, _slot_of_row(inverse_positions), coef_rows, down, slot_rows,
        num_experts, intermediate, hidden_size, intermediate, down.stride(0), down.stride(2), down.stride(1),
        HAS_COEF=True, **precision, **rows, **second)
    return _slot_sum(slot_rows, inverse_positions, expert_offsets, out, precision["ACC"]), pre


def experts_backward(grad_out: torch.Tensor, x: torch.Tensor, sorted_token_ids: torch.Tensor,
                     inverse_positions: torch.Tensor, expert_offsets: torch.Tensor, gate_up: torch.Tensor,
                     down: torch.Tensor, coef_rows: torch.Tensor, pre: torch.Tensor, activation: str, gated: bool,
                     *, gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                     interleaved: bool = False, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                     interpreter: bool | None = None) -> tuple[torch.Tensor, ...]:
    """(d x, d gate_up, d down, d coef_rows, d gate_up_bias, d down_bias) of :func:`experts_forward`,
    the activation recomputed from ``pre``; every sum in a fixed order. An absent bias gets an
    empty gradient."""
    _not_yet(gate_up_bias, down_bias, interleaved, activation)
    grad_gate_up = torch.empty(gate_up.shape, dtype=x.dtype, device=x.device)
    grad_down = torch.empty(down.shape, dtype=x.dtype, device=x.device)
    if sorted_token_ids.shape[0] == 0:
        return (x.new_zeros(x.shape), grad_gate_up.zero_(), grad_down.zero_(), coef_rows.new_zeros(coef_rows.shape),
                x.new_empty(0), x.new_empty(0))
    if interpreter is None:
        interpreter = x.device.type != "cuda"
    grad_x, grad_coef, grad_pre, hidden = _backward_rows(grad_out, x, sorted_token_ids, inverse_positions,
                                                         expert_offsets, gate_up, down, coef_rows, pre, activation,
                                                         gated, interpreter)
    expert_weight_grad(grad_pre, x, sorted_token_ids, expert_offsets, grad_gate_up, gather_p=False,
                       interpreter=interpreter)
    expert_weight_grad(grad_out, hidden, sorted_token_ids, expert_offsets, grad_down, gather_p=True,
                       coef_rows=coef_rows, interpreter=interpreter)
    return grad_x, grad_gate_up, grad_down, grad_coef, x.new_empty(0), x.new_empty(0)


def _not_yet(gate_up_bias, down_bias, interleaved, activation):
    if gate_up_bias is not None or down_bias is not None or interleaved or activation not in ACTIVATION_CODES:
        raise NotImplementedError("astrea.kernels.experts: biases, the interleaved layout and clamped_swiglu are not "
                                  "in the Triton kernels yet; run moe_experts on the torch backend")


def _backward_rows(grad_out, x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows, pre,
                   activation: str, gated: bool, interpreter: bool):
    """(d x, d coef_rows, d pre, hidden): the row GEMMs of the backward, hidden recomputed."""
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
        grad_pre, hidden, coef_partials, num_experts, num_rows, hidden_size, intermediate,
        *grad_out.stride(), *down.stride(), ACTIVATION=ACTIVATION_CODES[activation], GATED=gated,
        **precision, **rows, **first)
    grad_coef = coef_partials.sum(0)
    slot_rows = torch.empty(num_rows, hidden_size, dtype=x.dtype, device=device)
    # B[k, n] = gate_up[e, k, n]: k over 2I (or I), n over H
    second = column_tiles(x.dtype, interpreter, hidden_size, pre_width)
    _rows_to_slots_kernel[(bound * triton.cdiv(hidden_size, second["BLOCK_N"]),)](
        grad_pre, expert_offsets, tile_expert, tile_start, _slot_of_row(inverse_positions), coef_rows, gate_up,
        slot_rows, num_experts, pre_width, hidden_size, pre_width, gate_up.stride(0), gate_up.stride(1),
        gate_up.stride(2), HAS_COEF=False, **precision, **rows, **second)
    grad_x = _slot_sum(slot_rows, inverse_positions, expert_offsets, torch.empty(x.shape, dtype=x.dtype, device=device),
                       precision["ACC"])
    return grad_x, grad_coef, grad_pre, hidden


def expert_weight_grad(p: torch.Tensor, q: torch.Tensor, sorted_token_ids: torch.Tensor,
                       expert_offsets: torch.Tensor, out: torch.Tensor, *, gather_p: bool,
                       coef_rows: torch.Tensor | None = None, interpreter: bool) -> torch.Tensor:
    """``out[e] = sum_r (c[r] p[r])^T q[r]`` over the dispatch rows of expert e (``out``: a
    contiguous ``[E, P, Q]``); the rows of p (``gather_p``) or else of q are token rows read
    through ``sorted_token_ids``, the other operand has one row per dispatch row."""
    num_experts, out_rows, out_cols = out.shape
    config = weight_grad_config(out.dtype, interpreter, out_rows, out_cols,
                                triton.cdiv(sorted_token_ids.shape[0], num_experts))
    grid = (triton.cdiv(out_rows, config["BLOCK_M"]), triton.cdiv(out_cols, config["BLOCK_N"]), num_experts)
    has_coef = coef_rows is not None
    _expert_weight_grad_kernel[grid](p, q, sorted_token_ids, coef_rows if has_coef else p, expert_offsets, out,
                                     out_rows, out_cols, *p.stride(), *q.stride(), GATHER_P=gather_p,
                                     HAS_COEF=has_coef, **_precision(out.dtype, interpreter), **config)
    return out


# Example launches at a Qwen3-MoE layer's widths (H = 2048, I = 768, top-8), 8 experts.
_AOT_TOKENS, _AOT_TOP_K, _AOT_EXPERTS, _AOT_HIDDEN, _AOT_INTERMEDIATE = 256, 8, 8, 2048, 768


def _example_inputs(dtype: torch.dtype, gated: bool):
    rows = _AOT_TOKENS * _AOT_TOP_K
    dispatch = (torch.zeros(rows, dtype=torch.int32),
                torch.arange(rows, dtype=torch.int32).view(_AOT_TOKENS, _AOT_TOP_K),
                torch.arange(_AOT_EXPERTS + 1) * (rows // _AOT_EXPERTS))
    gate_up = torch.empty(_AOT_EXPERTS, (2 if gated else 1) * _AOT_INTERMEDIATE, _AOT_HIDDEN, dtype=dtype)
    down = torch.empty(_AOT_EXPERTS, _AOT_HIDDEN, _AOT_INTERMEDIATE, dtype=dtype)
    return (torch.empty(_AOT_TOKENS, _AOT_HIDDEN, dtype=dtype), *dispatch, gate_up, down, torch.empty(rows))


def _example_forward(dtype: torch.dtype, activation: str, gated: bool, keep_pre: bool = True):
    experts_forward(*_example_inputs(dtype, gated), activation, gated, keep_pre, interpreter=False)


def _example_backward(dtype: torch.dtype, activation: str, gated: bool):
    """The row kernels of the backward (its weight gradients: :func:`_example_weight_grad`)."""
    inputs = _example_inputs(dtype, gated)
    pre = torch.empty(inputs[1].shape[0], inputs[4].shape[1], dtype=dtype)
    _backward_rows(torch.empty_like(inputs[0]), *inputs, pre, activation, gated, interpreter=False)


def _example_weight_grad(dtype: torch.dtype, of_gate_up: bool):
    x, sorted_token_ids, _, expert_offsets, gate_up, down, coef_rows = _example_inputs(dtype, gated=True)
    rows = sorted_token_ids.shape[0]
    if of_gate_up:  # d gate_up from d pre rows and token rows
        expert_weight_grad(torch.empty(rows, gate_up.shape[1], dtype=dtype), x, sorted_token_ids, expert_offsets,
                           torch.empty_like(gate_up), gather_p=False, interpreter=False)
    else:  # d down from weighted grad rows (token rows) and hidden rows
        expert_weight_grad(torch.empty_like(x), torch.empty(rows, down.shape[2], dtype=dtype), sorted_token_ids,
                           expert_offsets, torch.empty_like(down), gather_p=True, coef_rows=coef_rows,
                           interpreter=False)


def _cases(name: str, dtype: torch.dtype, activation: str, gated: bool):
    return {f"experts.forward_{name}": lambda: _example_forward(dtype, activation, gated),
            f"experts.backward_{name}": lambda: _example_backward(dtype, activation, gated)}


AOT_CASES = {**_cases("bf16_silu_gated", torch.bfloat16, "silu", True),
             **_cases("fp16_gelu_tanh_gated", torch.float16, "gelu_tanh", True),
             **_cases("fp32_silu_gated", torch.float32, "silu", True),
             **_cases("bf16_gelu", torch.bfloat16, "gelu", False),
             "experts.forward_bf16_silu_gated_inference": lambda: _example_forward(torch.bfloat16, "silu", True,
                                                                                   keep_pre=False),
             **{f"experts.weight_grad_{name}_{operand}": (lambda d=dtype, g=operand == "gate_up":
                                                          _example_weight_grad(d, g))
                for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
                for operand in ("gate_up", "down")}}
