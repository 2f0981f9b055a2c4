"""Fused MoE router: scoring, top-k selection and the per-expert statistics of the
balancing losses in one pass over the logits, and the backward to the logits.

Forward, per row ``x`` (fp32 copy of the logits):
    lse = max(x) + log(sum(exp(x - max(x))))
    score = softmax(x) = exp(x - lse)  (softmax, topk_softmax)   or   sigmoid(x)
    selection = score, or x for topk_softmax
    key = x (no bias, no groups: same order as the scores), selection (groups, no bias),
          selection + bias (bias on scores) or x + bias (bias on logits)
    grouped: group g scored by the sum of its two largest keys (or its largest), the
          topk_groups best groups kept, every other expert excluded from the selection
    indices = the k largest keys, NaN ranked lowest (below -inf), equal keys to the lower expert index
    v_j = score[indices_j];  weights = v / sum(v) (renormalize) or v;
          topk_softmax: weights = softmax(x[indices]) over the k chosen logits
    renormalize with sum(v) < RENORMALIZE_MIN_TOTAL = 2^-64 (scores underflowing to 0):
          weights = softmax(x[indices]), equal to v / sum(v) to rounding (a softmax score is
          exp(x - lse); a sigmoid score below 2^-64 is exp(x) (1 - O(2^-64))) and finite
    weights *= scaling_factor
Rows whose lse is NaN (a NaN or +Inf logit, or every logit -Inf) get NaN weights.

Backward (derivation). Let g be the gradient reaching the full score row:
    g_e = grad_prob_sums_e + sum_j [indices_j == e] * dv_j
with, for renormalisation w_j = v_j / S, S = sum_i v_i:
    dv_j = (gw_j - sum_i gw_i w_i) / S        (no renormalisation: dv_j = gw_j).
Softmax Jacobian: dx = p * (g - <g, p>); sigmoid: dx = g * s * (1 - s).
The lse term adds grad_lse * softmax(x) for both scorings (d lse / dx = softmax(x)).
A scaling factor s multiplies gw by s first. topk_softmax weights softmax(x[indices]) equal
the renormalised softmax p_j / sum_i p_i, so they take the softmax + renormalise closed form.
Rows renormalised as softmax(x[indices]) (sum(v) < RENORMALIZE_MIN_TOTAL) take that softmax's
Jacobian instead: dx_j = w_j (gw_j - sum_i gw_i w_i) on the chosen experts, finite where S = 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SOFTMAX: tl.constexpr = tl.constexpr(0)
SIGMOID: tl.constexpr = tl.constexpr(1)
TOPK_SOFTMAX: tl.constexpr = tl.constexpr(2)
# Below this sum of the chosen scores, renormalisation is the softmax over the chosen logits
# (astrea.reference.router.RENORMALIZE_MIN_TOTAL).
RENORMALIZE_MIN_TOTAL: tl.constexpr = tl.constexpr(2.0**-64)


@triton.jit
def _load_logits(logits_ptr, rows, cols, row_ok, col_ok, stride_n, stride_e):
    """fp32 logits tile; padded rows hold zeros (finite), padded columns -inf."""
    offsets = rows.to(tl.int64)[:, None] * stride_n + cols.to(tl.int64)[None, :] * stride_e
    x = tl.load(logits_ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    return tl.where(col_ok[None, :], x, float("-inf"))


# Marks chosen (and padded) experts in the packed keys: below every packed key.
TAKEN: tl.constexpr = tl.constexpr(-(2**63))
# Experts outside a token's chosen groups: above TAKEN (so not counted as routed), below every key.
EXCLUDED: tl.constexpr = tl.constexpr(-(2**63) + 1)
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
def _group_mask(packed, cols, NUM_GROUPS, TOPK_GROUPS, GROUP_SIZE, GROUP_MAX: tl.constexpr,
                BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr):
    """Which experts of each row lie in its TOPK_GROUPS best groups: each group scored by the
    sum of its two largest keys (or its largest, GROUP_MAX), read off the packed keys, and
    the groups chosen by the same packed max as the experts (NaN lowest, ties to the lower
    group)."""
    group_of = cols // GROUP_SIZE
    group_ids = tl.arange(0, BLOCK_G)
    group_scores = tl.zeros([packed.shape[0], BLOCK_G], dtype=tl.float32)
    for group in range(NUM_GROUPS):
        members = tl.where((group_of == group)[None, :], packed, TAKEN)
        best = tl.max(members, axis=1)
        score = _key_of(best)
        if not GROUP_MAX:
            score += _key_of(tl.max(tl.where(members == best[:, None], TAKEN, members), axis=1))
        group_scores = tl.where(group_ids[None, :] == group, score[:, None], group_scores)
    group_packed = _packed_keys(group_scores, group_ids, group_ids < NUM_GROUPS, BLOCK_G)
    allowed = tl.zeros(packed.shape, dtype=tl.int1)
    for _ in range(TOPK_GROUPS):
        best = tl.max(group_packed, axis=1)
        group_packed = tl.where(group_packed == best[:, None], TAKEN, group_packed)
        chosen = (BLOCK_G - 1) - (best & 0xFFFFFFFF).to(tl.int32)
        allowed = allowed | (group_of[None, :] == chosen[:, None])
    return allowed


@triton.jit
def _masked_softmax(values, mask, rows_on):
    """The softmax of each row of ``values`` over its ``mask`` entries, on the rows ``rows_on``;
    0 elsewhere, without an inf - inf there. A row whose masked values are all -inf gives NaN."""
    mask = mask & rows_on[:, None]
    row_max = tl.where(rows_on, tl.max(tl.where(mask, values, float("-inf")), axis=1), 0.0)
    exps = tl.exp(tl.where(mask, values - row_max[:, None], float("-inf")))
    return exps / tl.where(rows_on, tl.sum(exps, axis=1), 1.0)[:, None]


@triton.jit
def _renormalize(chosen_scores, chosen_experts, logits_ptr, rows, row_ok, slot_ok, stride_n, stride_e):
    """The chosen scores divided by their row sum; a row whose sum is below
    RENORMALIZE_MIN_TOTAL gets the softmax over its chosen logits, read again (k per row) only
    when a row of the block needs them."""
    totals = tl.sum(chosen_scores, axis=1)
    underflow = row_ok & (totals < RENORMALIZE_MIN_TOTAL)
    weights = chosen_scores / tl.where(underflow, 1.0, totals)[:, None]
    if tl.max(underflow.to(tl.int32), axis=0) > 0:
        offsets = rows.to(tl.int64)[:, None] * stride_n + chosen_experts.to(tl.int64) * stride_e
        chosen_logits = tl.load(logits_ptr + offsets, mask=row_ok[:, None] & slot_ok, other=0.0).to(tl.float32)
        weights = tl.where(underflow[:, None], _masked_softmax(chosen_logits, slot_ok, underflow), weights)
    return weights


@triton.jit
def _router_topk_forward_kernel(
    logits_ptr, bias_ptr, weights_ptr, indices_ptr, lse_ptr, count_partials_ptr, prob_partials_ptr,
    N, E, K, stride_n, stride_e, NUM_GROUPS, TOPK_GROUPS, GROUP_SIZE, scaling_factor,
    SCORING: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_ON_LOGITS: tl.constexpr,
    GROUPED: tl.constexpr, GROUP_MAX: tl.constexpr, KEY_IS_LOGITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
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
        if SCORING == SIGMOID:
            score = tl.where(col_ok[None, :], tl.sigmoid(x), 0.0)
        else:
            score = exps * (1.0 / sum_exps)[:, None]
        prob_acc += tl.sum(tl.where(row_ok[:, None], score, 0.0), axis=0)
        if SCORING == TOPK_SOFTMAX:
            selection = x
        else:
            selection = score
        if HAS_BIAS:
            if BIAS_ON_LOGITS:
                key = x + bias[None, :]
            else:
                key = selection + bias[None, :]
        elif GROUPED:
            key = selection
        else:
            key = x
        packed = _packed_keys(key, cols, col_ok, BLOCK_E)
        if GROUPED:
            allowed = _group_mask(packed, cols, NUM_GROUPS, TOPK_GROUPS, GROUP_SIZE, GROUP_MAX, BLOCK_E, BLOCK_G)
            packed = tl.where(allowed, packed, EXCLUDED)
        chosen_scores = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        chosen_experts = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
        for slot in range(K):
            best = tl.max(packed, axis=1)
            hit = packed == best[:, None]
            packed = tl.where(hit, TAKEN, packed)
            expert = (BLOCK_E - 1) - (best & 0xFFFFFFFF).to(tl.int32)
            # The chosen value: read off the key when the keys are the logits, else a masked
            # sum over the row.
            if SCORING == TOPK_SOFTMAX:
                if KEY_IS_LOGITS:
                    value = _key_of(best)
                else:
                    value = tl.sum(tl.where(hit, x, 0.0), axis=1)
            elif not KEY_IS_LOGITS:
                value = tl.sum(tl.where(hit, score, 0.0), axis=1)
            elif SCORING == SOFTMAX:
                value = tl.exp(_key_of(best) - lse)
            else:
                value = tl.sigmoid(_key_of(best))
            in_slot = slots[None, :] == slot
            chosen_scores = tl.where(in_slot, value[:, None], chosen_scores)
            chosen_experts = tl.where(in_slot, expert[:, None], chosen_experts)
        slot_ok = (slots < K)[None, :]
        if SCORING == TOPK_SOFTMAX:
            chosen_logits = tl.where(slot_ok, chosen_scores, float("-inf"))
            chosen_exps = tl.exp(chosen_logits - tl.max(chosen_logits, axis=1)[:, None])
            chosen_scores = chosen_exps / tl.sum(chosen_exps, axis=1)[:, None]
        elif RENORMALIZE:
            chosen_scores = _renormalize(chosen_scores, chosen_experts, logits_ptr, rows, row_ok, slot_ok,
                                         stride_n, stride_e)
        chosen_scores = tl.where((lse == lse)[:, None], chosen_scores * scaling_factor, float("nan"))

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
    N, E, K, stride_n, stride_e, scaling_factor,
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
        grad_w = tl.load(grad_weights_ptr + row_offsets + slot, mask=row_ok, other=0.0) * scaling_factor
        hit = cols[None, :] == expert[:, None]
        selected = selected | hit
        grad_selected = tl.where(hit, grad_w[:, None], grad_selected)
    grad_rescued = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    if RENORMALIZE:
        # Padded rows select nothing: give them a unit total rather than 0/0.
        total = tl.where(row_ok, tl.sum(tl.where(selected, score, 0.0), axis=1), 1.0)
        underflow = total < RENORMALIZE_MIN_TOTAL
        if tl.max(underflow.to(tl.int32), axis=0) > 0:  # rows whose weights are softmax(x[indices])
            rescued = _masked_softmax(x, selected, underflow)
            grad_rescued = rescued * (grad_selected - tl.sum(grad_selected * rescued, axis=1)[:, None])
        total = tl.where(underflow, 1.0, total)
        weighted = tl.sum(grad_selected * score, axis=1) / total
        grad_selected = tl.where(selected & ~underflow[:, None], (grad_selected - weighted[:, None]) / total[:, None],
                                 0.0)

    grad_prob_sums = tl.load(grad_prob_sums_ptr + cols, mask=col_ok, other=0.0)
    grad_score = grad_selected + grad_prob_sums[None, :]
    if SCORING == SOFTMAX:
        grad_x = probs * (grad_score - tl.sum(grad_score * probs, axis=1)[:, None])
    else:
        grad_x = grad_score * score * (1.0 - score)
    grad_lse = tl.load(grad_lse_ptr + rows, mask=row_ok, other=0.0)
    grad_x += grad_lse[:, None] * probs + grad_rescued

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


def launch_config(num_experts: int, k: int, interpreter: bool, num_groups: int = 1) -> dict[str, int]:
    """Block sizes and warps for ``num_experts`` experts and top-``k``. A row never spans
    programs, so any E runs; up to E = 4096 without register spills (AOT_CASES), beyond
    that with some."""
    block_e = triton.next_power_of_2(max(num_experts, 2))
    tile = INTERPRETER_TILE_ELEMENTS if interpreter else TILE_ELEMENTS
    block_n = max(1, min(MAX_ROWS_PER_PROGRAM, tile // block_e))
    elements = block_n * block_e
    num_warps = min(16, max(4, elements // (32 * ELEMENTS_PER_THREAD)))
    return {"BLOCK_N": block_n, "BLOCK_E": block_e, "BLOCK_K": triton.next_power_of_2(k),
            "BLOCK_G": triton.next_power_of_2(num_groups), "num_warps": num_warps}


SCORINGS = {"softmax": SOFTMAX.value, "sigmoid": SIGMOID.value, "topk_softmax": TOPK_SOFTMAX.value}


def router_topk_forward(logits, k: int, scoring: str, renormalize: bool, bias, bias_on: str, num_groups: int,
                        topk_groups: int, group_score: str, scaling_factor: float, interpreter: bool):
    """Launches the forward on validated inputs; returns (weights, indices, counts, prob_sums, lse)."""
    n, e = logits.shape
    device = logits.device
    weights = torch.empty(n, k, dtype=torch.float32, device=device)
    indices = torch.empty(n, k, dtype=torch.int32, device=device)
    lse = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return (weights, indices, torch.zeros(e, dtype=torch.int32, device=device),
                torch.zeros(e, dtype=torch.float32, device=device), lse)
    config = launch_config(e, k, interpreter, num_groups)
    programs = min(triton.cdiv(n, config["BLOCK_N"]), MAX_FORWARD_PROGRAMS)
    count_partials = torch.empty(programs, e, dtype=torch.int32, device=device)
    prob_partials = torch.empty(programs, e, dtype=torch.float32, device=device)
    has_bias = bias is not None
    _router_topk_forward_kernel[(programs,)](
        logits, bias if has_bias else prob_partials, weights, indices, lse, count_partials, prob_partials,
        n, e, k, logits.stride(0), logits.stride(1), num_groups, topk_groups, e // num_groups, scaling_factor,
        SCORING=SCORINGS[scoring], RENORMALIZE=renormalize, HAS_BIAS=has_bias, BIAS_ON_LOGITS=bias_on == "logits",
        GROUPED=num_groups > 1, GROUP_MAX=group_score == "max",
        KEY_IS_LOGITS=not has_bias and (num_groups == 1 or scoring == "topk_softmax"),
        BLOCK_N=config["BLOCK_N"], BLOCK_E=config["BLOCK_E"], BLOCK_K=config["BLOCK_K"], BLOCK_G=config["BLOCK_G"],
        num_warps=config["num_warps"],
    )
    counts = count_partials.sum(0, dtype=torch.int32)
    return weights, indices, counts, prob_partials.sum(0), lse


def router_topk_backward(logits, indices, lse, grad_weights, grad_prob_sums, grad_lse,
                         scoring: str, renormalize: bool, scaling_factor: float, interpreter: bool):
    """Launches the backward on validated inputs; returns grad_logits (contiguous, logits' dtype)."""
    n, e = logits.shape
    k = indices.shape[1]
    grad_logits = torch.empty(n, e, dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad_logits
    config = launch_config(e, k, interpreter)
    _router_topk_backward_kernel[(triton.cdiv(n, config["BLOCK_N"]),)](
        logits, indices, lse, grad_weights, grad_prob_sums, grad_lse, grad_logits,
        n, e, k, logits.stride(0), logits.stride(1), scaling_factor,
        SCORING=SCORINGS[scoring], RENORMALIZE=renormalize,
        BLOCK_N=config["BLOCK_N"], BLOCK_E=config["BLOCK_E"], num_warps=config["num_warps"],
    )
    return grad_logits


# Rows of the example launches: the block sizes depend only on E and k.
_AOT_TOKENS = 4096


def _example_forward(dtype: torch.dtype, num_experts: int, k: int, scoring: str, renormalize: bool, has_bias: bool,
                     num_groups: int = 1, topk_groups: int = 1):
    bias = torch.empty(num_experts) if has_bias else None
    router_topk_forward(torch.empty(_AOT_TOKENS, num_experts, dtype=dtype), k, scoring, renormalize, bias, "scores",
                        num_groups, topk_groups, "top2_sum", 1.0, interpreter=False)


def _example_backward(dtype: torch.dtype, num_experts: int, k: int, scoring: str, renormalize: bool):
    router_topk_backward(torch.empty(_AOT_TOKENS, num_experts, dtype=dtype),
                         torch.empty(_AOT_TOKENS, k, dtype=torch.int32), torch.empty(_AOT_TOKENS),
                         torch.empty(_AOT_TOKENS, k), torch.empty(num_experts), torch.empty(_AOT_TOKENS),
                         scoring, renormalize, 1.0, interpreter=False)


AOT_CASES = {
    "router.forward_softmax_bf16_e64_k8": lambda: _example_forward(torch.bfloat16, 64, 8, "softmax", True, False),
    "router.forward_sigmoid_bias_bf16_e160_k6":
        lambda: _example_forward(torch.bfloat16, 160, 6, "sigmoid", True, True),
    "router.forward_softmax_bias_fp32_e8_k2": lambda: _example_forward(torch.float32, 8, 2, "softmax", False, True),
    "router.forward_sigmoid_bias_fp16_e4096_k8":
        lambda: _example_forward(torch.float16, 4096, 8, "sigmoid", True, True),
    "router.forward_sigmoid_bias_grouped_bf16_e256_k8":
        lambda: _example_forward(torch.bfloat16, 256, 8, "sigmoid", True, True, num_groups=8, topk_groups=4),
    "router.backward_softmax_bf16_e64": lambda: _example_backward(torch.bfloat16, 64, 8, "softmax", True),
    "router.backward_sigmoid_fp32_e256": lambda: _example_backward(torch.float32, 256, 8, "sigmoid", True),
    "router.backward_softmax_fp16_e4096": lambda: _example_backward(torch.float16, 4096, 8, "softmax", False),
}
