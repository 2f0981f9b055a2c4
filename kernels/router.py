"""Fused MoE router: scoring, top-k selection and the per-expert statistics of the
balancing losses in one pass over the logits, and the backward to the logits.

Forward, per row ``x`` (fp32 copy of the logits):
    lse = max(x) + log(sum(exp(x - max(x))))
    score = softmax(x) = exp(x - lse)        or   sigmoid(x)
    key = x (no bias: same order as the scores)   or   score + bias
    indices = the k largest keys, NaN ranked lowest (below -inf), equal keys to the lower expert index
    v_j = score[indices_j];  weights = v / sum(v) (renormalize) or v
Rows whose lse is NaN (a NaN or +Inf logit, or every logit -Inf) get NaN weights.

Backward (derivation). Let g be the gradient reaching the full score row:
    g_e = grad_prob_sums_e + sum_j [indices_j == e] * dv_j
with, for renormalisation w_j = v_j / S, S = sum_i v_i:
    dv_j = (gw_j - sum_i gw_i w_i) / S        (no renormalisation: dv_j = gw_j).
Softmax Jacobian: dx = p * (g - <g, p>); sigmoid: dx = g * s * (1 - s).
The lse term adds grad_lse * softmax(x) for both scorings (d lse / dx = softmax(x)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SOFTMAX: tl.constexpr = tl.constexpr(0)
SIGMOID: tl.constexpr = tl.constexpr(1)


@triton.jit
def _load_logits(logits_ptr, rows, cols, row_ok, col_ok, stride_n, stride_e):
    """fp32 logits tile; padded rows hold zeros (finite), padded columns -inf."""
    offsets = rows.to(tl.int64)[:, None] * stride_n + cols.to(tl.int64)[None, :] * stride_e
    x = tl.load(logits_ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    return tl.where(col_ok[None, :], x, float("-inf"))


# Marks chosen (and padded) experts in the packed keys: below every packed key.
TAKEN: tl.constexpr = tl.constexpr(-(2**63))
# The order-preserving high word of a NaN key: one below that of -inf (0xFF800000 ^ 0x7FFFFFFF),
# far above TAKEN's.
NAN_ORDERED: tl.constexpr = tl.constexpr(-2139095041 - 1)


@triton.jit
def _packed_keys(key, cols, col_ok, BLOCK_E: tl.constexpr):
    """One int64 per expert whose signed order is (key, then lower index), so that one max
    per top-k slot finds the next expert: the fp32 key's bits made order-preserving in the
    high word, BLOCK_E - 1 - index in the low word. NaN keys rank strictly below -inf: they
    all get the high word just under that of -inf (a NaN bit pattern again, for _key_of)."""
    is_nan = key != key
    key = tl.where(key == 0.0, 0.0, key)  # -0.0 and +0.0 are equal keys
    bits = key.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse the magnitude order
    ordered = tl.where(is_nan, NAN_ORDERED, ordered)
    packed = (ordered.to(tl.int64) << 32) | (BLOCK_E - 1 - cols).to(tl.int64)[None, :]
    return tl.where(col_ok[None, :], packed, TAKEN)


@triton.jit
def _key_of(packed):
    """The fp32 key held in the high word of packed keys."""
    ordered = (packed >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _router_topk_forward_kernel(
    logits_ptr, bias_ptr, weights_ptr, indices_ptr, lse_ptr, count_partials_ptr, prob_partials_ptr,
    N, E, K, stride_n, stride_e,
    SCORING: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Persistent over row blocks: each program accumulates its rows' counts and score
    # sums and writes one partial row; the partials are summed in a fixed order later.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    slots = tl.arange(0, BLOCK_K)
    count_acc = tl.zeros([BLOCK_E], dtype=tl.int32)
    prob_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
    for block in range(pid, tl.cdiv(N, BLOCK_N), num_programs):
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        x = _load_logits(logits_ptr, rows, cols, row_ok, col_ok, stride_n, stride_e)
        row_max = tl.max(x, axis=1)
        exps = tl.exp(x - row_max[:, None])
        sum_exps = tl.sum(exps, axis=1)
        lse = row_max + tl.log(sum_exps)
        if SCORING == SOFTMAX:
            score = exps * (1.0 / sum_exps)[:, None]
        else:
            score = tl.where(col_ok[None, :], tl.sigmoid(x), 0.0)
        prob_acc += tl.sum(tl.where(row_ok[:, None], score, 0.0), axis=0)
        if HAS_BIAS:
            packed = _packed_keys(score + bias[None, :], cols, col_ok, BLOCK_E)
        else:
            packed = _packed_keys(x, cols, col_ok, BLOCK_E)
        chosen_scores = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        chosen_experts = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
        for slot in range(K):
            best = tl.max(packed, axis=1)
            hit = packed == best[:, None]
            packed = tl.where(hit, TAKEN, packed)
            expert = (BLOCK_E - 1) - (best & 0xFFFFFFFF).to(tl.int32)
            if HAS_BIAS:
                value = tl.sum(tl.where(hit, score, 0.0), axis=1)
            elif SCORING == SOFTMAX:
                value = tl.exp(_key_of(best) - lse)
            else:
                value = tl.sigmoid(_key_of(best))
            in_slot = slots[None, :] == slot
            chosen_scores = tl.where(in_slot, value[:, None], chosen_scores)
            chosen_experts = tl.where(in_slot, expert[:, None], chosen_experts)
        if RENORMALIZE:
            chosen_scores = chosen_scores / tl.sum(chosen_scores, axis=1)[:, None]
        chosen_scores = tl.where((lse == lse)[:, None], chosen_scores, float("nan"))

        out_offsets = rows.to(tl.int64)[:, None] * K + slots[None, :]
        out_mask = row_ok[:, None] & (slots[None, :] < K)
        tl.store(weights_ptr + out_offsets, chosen_scores, mask=out_mask)
        tl.store(indices_ptr + out_offsets, chosen_experts, mask=out_mask)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        routed = (packed == TAKEN) & row_ok[:, None] & col_ok[None, :]
        count_acc += tl.sum(routed.to(tl.int32), axis=0)
    tl.store(count_partials_ptr + pid * E + cols, count_acc, mask=col_ok)
    tl.store(prob_partials_ptr + pid * E + cols, prob_acc, mask=col_ok)


@triton.jit
def _router_topk_backward_kernel(
    logits_ptr, indices_ptr, lse_ptr, grad_weights_ptr, grad_prob_sums_ptr, grad_lse_ptr, grad_logits_ptr,
    N, E, K, stride_n, stride_e,
    SCORING: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    x = _load_logits(logits_ptr, rows, cols, row_ok, col_ok, stride_n, stride_e)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    probs = tl.exp(x - lse[:, None])
    if SCORING == SOFTMAX:
        score = probs
    else:
        score = tl.where(col_ok[None, :], tl.sigmoid(x), 0.0)

    # Scatter the weight gradients onto their experts' columns (experts of a row are distinct).
    grad_selected = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    selected = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.int1)
    row_offsets = rows.to(tl.int64) * K
    for slot in range(K):
        expert = tl.load(indices_ptr + row_offsets + slot, mask=row_ok, other=-1)
        grad_w = tl.load(grad_weights_ptr + row_offsets + slot, mask=row_ok, other=0.0)
        hit = cols[None, :] == expert[:, None]
        selected = selected | hit
        grad_selected = tl.where(hit, grad_w[:, None], grad_selected)
    if RENORMALIZE:
        # Padded rows select nothing: give them a unit total rather than 0/0.
        total = tl.where(row_ok, tl.sum(tl.where(selected, score, 0.0), axis=1), 1.0)
        weighted = tl.sum(grad_selected * score, axis=1) / total
        grad_selected = tl.where(selected, (grad_selected - weighted[:, None]) / total[:, None], 0.0)

    grad_prob_sums = tl.load(grad_prob_sums_ptr + cols, mask=col_ok, other=0.0)
    grad_score = grad_selected + grad_prob_sums[None, :]
    if SCORING == SOFTMAX:
        grad_x = probs * (grad_score - tl.sum(grad_score * probs, axis=1)[:, None])
    else:
        grad_x = grad_score * score * (1.0 - score)
    grad_lse = tl.load(grad_lse_ptr + rows, mask=row_ok, other=0.0)
    grad_x += grad_lse[:, None] * probs

    out_offsets = rows.to(tl.int64)[:, None] * E + cols[None, :]
    tl.store(grad_logits_ptr + out_offsets, grad_x.to(grad_logits_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# Programs of the persistent forward grid, at most: the count depends only on the sizes
# (never on the device), so the fixed-order sum of the partials is reproducible anywhere.
MAX_FORWARD_PROGRAMS = 1024
# Logits held by one program: enough rows per program to stream the logits at full
# bandwidth, few enough per thread (the top-k loop keeps several copies of the tile
# live) to stay near 100 registers. The interpreter runs programs serially, so larger
# tiles mean fewer, cheaper-per-element programs there.
TILE_ELEMENTS = 2048
ELEMENTS_PER_THREAD = 8
INTERPRETER_TILE_ELEMENTS = 1 << 15
MAX_ROWS_PER_PROGRAM = 256


def launch_config(num_experts: int, k: int, interpreter: bool) -> dict[str, int]:
    """Block sizes and warps for ``num_experts`` experts and top-``k``. A row never spans
    programs, so any E runs; up to E = 4096 without register spills (AOT_CASES), beyond
    that with some."""
    block_e = triton.next_power_of_2(max(num_experts, 2))
    tile = INTERPRETER_TILE_ELEMENTS if interpreter else TILE_ELEMENTS
    block_n = max(1, min(MAX_ROWS_PER_PROGRAM, tile // block_e))
    elements = block_n * block_e
    num_warps = min(16, max(4, elements // (32 * ELEMENTS_PER_THREAD)))
    return {"BLOCK_N": block_n, "BLOCK_E": block_e, "BLOCK_K": triton.next_power_of_2(k), "num_warps": num_warps}


SCORINGS = {"softmax": SOFTMAX.value, "sigmoid": SIGMOID.value}


def router_topk_forward(logits, k: int, scoring: str, renormalize: bool, bias, interpreter: bool):
    """Launches the forward on validated inputs; returns (weights, indices, counts, prob_sums, lse)."""
    n, e = logits.shape
    device = logits.device
    weights = torch.empty(n, k, dtype=torch.float32, device=device)
    indices = torch.empty(n, k, dtype=torch.int32, device=device)
    lse = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return (weights, indices, torch.zeros(e, dtype=torch.int32, device=device),
                torch.zeros(e, dtype=torch.float32, device=device), lse)
    config = launch_config(e, k, interpreter)
    programs = min(triton.cdiv(n, config["BLOCK_N"]), MAX_FORWARD_PROGRAMS)
    count_partials = torch.empty(programs, e, dtype=torch.int32, device=device)
    prob_partials = torch.empty(programs, e, dtype=torch.float32, device=device)
    has_bias = bias is not None
    _router_topk_forward_kernel[(programs,)](
        logits, bias if has_bias else prob_partials, weights, indices, lse, count_partials, prob_partials,
        n, e, k, logits.stride(0), logits.stride(1),
        SCORING=SCORINGS[scoring], RENORMALIZE=renormalize, HAS_BIAS=has_bias,
        BLOCK_N=config["BLOCK_N"], BLOCK_E=config["BLOCK_E"], BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"],
    )
    counts = count_partials.sum(0, dtype=torch.int32)
    return weights, indices, counts, prob_partials.sum(0), lse


def router_topk_backward(logits, indices, lse, grad_weights, grad_prob_sums, grad_lse,
                         scoring: str, renormalize: bool, interpreter: bool):
    """Launches the backward on validated inputs; returns grad_logits (contiguous, logits' dtype)."""
    n, e = logits.shape
    k = indices.shape[1]
    grad_logits = torch.empty(n, e, dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad_logits
    config = launch_config(e, k, interpreter)
    _router_topk_backward_kernel[(triton.cdiv(n, config["BLOCK_N"]),)](
        logits, indices, lse, grad_weights, grad_prob_sums, grad_lse, grad_logits,
        n, e, k, logits.stride(0), logits.stride(1),
        SCORING=SCORINGS[scoring], RENORMALIZE=renormalize,
        BLOCK_N=config["BLOCK_N"], BLOCK_E=config["BLOCK_E"], num_warps=config["num_warps"],
    )
    return grad_logits


# Rows of the example launches: the block sizes depend only on E and k.
_AOT_TOKENS = 4096


def _example_forward(dtype: torch.dtype, num_experts: int, k: int, scoring: str, renormalize: bool, has_bias: bool):
    bias = torch.empty(num_experts) if has_bias else None
    router_topk_forward(torch.empty(_AOT_TOKENS, num_experts, dtype=dtype), k, scoring, renormalize, bias,
                        interpreter=False)


def _example_backward(dtype: torch.dtype, num_experts: int, k: int, scoring: str, renormalize: bool):
    router_topk_backward(torch.empty(_AOT_TOKENS, num_experts, dtype=dtype),
                         torch.empty(_AOT_TOKENS, k, dtype=torch.int32), torch.empty(_AOT_TOKENS),
                         torch.empty(_AOT_TOKENS, k), torch.empty(num_experts), torch.empty(_AOT_TOKENS),
                         scoring, renormalize, interpreter=False)


AOT_CASES = {
    "router.forward_softmax_bf16_e64_k8": lambda: _example_forward(torch.bfloat16, 64, 8, "softmax", True, False),
    "router.forward_sigmoid_bias_bf16_e160_k6":
        lambda: _example_forward(torch.bfloat16, 160, 6, "sigmoid", True, True),
    "router.forward_softmax_bias_fp32_e8_k2": lambda: _example_forward(torch.float32, 8, 2, "softmax", False, True),
    "router.forward_sigmoid_bias_fp16_e4096_k8":
        lambda: _example_forward(torch.float16, 4096, 8, "sigmoid", True, True),
    "router.backward_softmax_bf16_e64": lambda: _example_backward(torch.bfloat16, 64, 8, "softmax", True),
    "router.backward_sigmoid_fp32_e256": lambda: _example_backward(torch.float32, 256, 8, "sigmoid", True),
    "router.backward_softmax_fp16_e4096": lambda: _example_backward(torch.float16, 4096, 8, "softmax", False),
}
