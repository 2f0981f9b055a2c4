"""Grouped expert FFNs on stacked weights: the gather, both grouped GEMMs, the activation, the
biases and the weighted sum over each token's k slots in one op, without a host sync.

Layout (transformers' fused experts, taken as they are, without a copy): ``gate_up [E, 2I, H]``
(``[E, I, H]`` for a plain, ungated FFN) and ``down [E, H, I]``, in any strides: Aria's and
gpt-oss's stacks ``[E, H, 2I]`` and ``[E, I, H]`` are passed as their ``transpose(1, 2)`` views.
A gated gate_up keeps gate rows 0..I-1 then up rows I..2I-1 (``gate_up_layout="concatenated"``)
or gate row i at 2i and up row i at 2i + 1 (``"interleaved"``, gpt-oss); ``gate_up_bias [E, 2I]``
(``[E, I]`` ungated) follows gate_up's rows. For routing slot ``(t, j)`` with expert ``e``::

    pre = gate_up[e] @ x[t] + gate_up_bias[e];   a = act(gate) * up   (gated)  or  act(pre)
    out[t] = sum_j  w[t, j] * s[e] * (down[e] @ a + down_bias[e])      (j in slot order, fp32)

The ``torch`` implementation sums half-precision rows without down bias by one bmm in fp32
where the coefficients ``w * s`` are exact in their dtype (in bmm's order, fixed by the shapes).

``clamped_swiglu`` (gated only) replaces ``act(gate) * up`` by gpt-oss's
``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``.

Implementations, all keeping the pre-activations of the forward for the backward, which
recomputes the activation from them and sums each token's slots and each expert's rows in a
fixed order (no atomics, bitwise reproducible):

* ``triton`` (CUDA tensors under ``auto``; CPU tensors under the ``triton`` backend, through
  the interpreter): the grouped-GEMM kernels of :mod:`astrea.kernels.experts`, the token rows
  gathered inside the first GEMM's tile loads, bias and activation in its epilogue, bias and
  routing coefficient in the second's, tiles scheduled from the offsets on the device; the
  bias gradients from a kernel summing each expert's rows in order (which also gives the down
  bias's part of the routing weights' gradient).
* ``torch`` (CPU tensors under ``auto``): the rows gathered in expert order (``index_select``),
  both projections by the C++ grouped GEMMs of ``astrea._C`` (each expert's rows in tiles fixed
  by the sizes, one BLAS thread a tile: one summation order on any thread count), and
  fixed-order sums. Without ``astrea._C`` (and on CUDA tensors run on this implementation)
  ``F.grouped_mm`` with the group offsets read on the device, where its 16-byte alignment
  allows, else one matmul per expert. The backward runs four grouped GEMMs (d rows,
  d gate_up, d down, d a); the bias gradients are segment sums of the dispatch-ordered rows.
* ``reference``: the torch steps with one plain matmul per expert.

Weight gradients come back in the strides of the weights (a transposed view gets a transposed
gradient, which its base takes without a copy).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from astrea import _backend, _extension
from astrea._validation import check_choice, check_same_device, check_size
from astrea.ops.dispatch import Dispatch, check_dispatch
from astrea.reference.experts import (ACTIVATIONS, GATE_UP_LAYOUTS, GATED_ACTIVATIONS, SWIGLU_ALPHA, SWIGLU_LIMIT,
                                      gated_hidden)

SPEC = _backend.declare_op(
    "moe_experts", kernel="triton", cpu_impl="torch",
    dtypes={"cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
            "cuda": (torch.float32, torch.float16, torch.bfloat16)},
    supports={"triton": "grouped GEMMs gathering token rows through the dispatch, biases, activation (clamped "
                        "SwiGLU and relu2 too) and routing weight fused, either gate/up layout, any strides, no "
                        "host sync; float64 only under the interpreter",
              "torch": "CPU: astrea._C's grouped GEMMs, bitwise identical on any thread count (float64 too); "
                       "without _C or on CUDA tensors F.grouped_mm on 16-byte-aligned shapes (no host sync), one "
                       "matmul per expert otherwise; biases, both gate/up layouts"})

__all__ = ["ACTIVATIONS", "GATED_ACTIVATIONS", "GATE_UP_LAYOUTS", "moe_experts"]


def _aligned(*tensors: torch.Tensor) -> bool:
    """Whether F.grouped_mm takes these operands: 16-byte-aligned data, one of the two matrix
    dimensions unit-strided and the other (and the batch stride) a multiple of 16 bytes."""
    for t in tensors:
        size = t.element_size()
        if t.dtype == torch.float64 or t.data_ptr() % 16:
            return False
        *batch, rows, cols = t.stride()
        if not ((cols == 1 and rows * size % 16 == 0) or (rows == 1 and cols * size % 16 == 0)):
            return False  # e.g. a [M, 1] operand: both strides 1
        if any(stride * size % 16 for stride in batch):
            return False
    return True


def _per_expert(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, grouped_k: bool) -> torch.Tensor:
    """``F.grouped_mm(a, b, offs=offsets[1:])`` as one matmul per expert (reads the offsets on the host)."""
    bounds = offsets.tolist()
    if grouped_k:  # a [m, M], b [M, n] -> [E, m, n]
        return torch.stack([a[:, lo:hi] @ b[lo:hi] for lo, hi in zip(bounds, bounds[1:])])
    out = a.new_zeros(a.shape[0], b.shape[-1])  # a [M, k], b [E, k, n] -> [M, n]
    for e, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        out[lo:hi] = a[lo:hi] @ b[e]
    return out


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, *, grouped_k: bool = False,
                grouped: bool = True) -> torch.Tensor:
    """Rows ``[offsets[e], offsets[e+1])`` of ``a`` times ``b[e]`` (``grouped_k``: the rows of
    ``a.t()`` and ``b`` of expert e multiplied into ``out[e]``). Rows past ``offsets[E]`` are zero.
    ``grouped=False`` (or operands F.grouped_mm does not take) runs one matmul per expert.
    On CPU tensors both run the C++ kernels (csrc/cpu/experts.cpp), whose sums have one order on
    any thread count where F.grouped_mm's BLAS splits them over its threads (and which run
    several times faster than its CPU kernel on these shapes)."""
    if grouped and a.device.type == "cpu" and _extension.has_kernel("grouped_mm_cpu", "CPU"):
        kernel = torch.ops.astrea.grouped_weight_grad_cpu if grouped_k else torch.ops.astrea.grouped_mm_cpu
        return kernel(a, b, offsets)
    if not (grouped and _aligned(a, b)):
        return _per_expert(a, b, offsets, grouped_k)
    out = F.grouped_mm(a, b, offs=offsets[1:].to(torch.int32))
    if a.device.type == "cpu":
        # torch's CPU kernel zero-fills experts without rows, and rows past offsets[E] cannot
        # occur: moe_dispatch rejects out-of-range experts on CPU tensors.
        return out
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    if grouped_k:  # an expert without rows gets no write
        return torch.where((offsets[1:] > offsets[:-1])[:, None, None], out, zero)
    rows = torch.arange(a.shape[0], device=a.device)
    return torch.where((rows < offsets[-1])[:, None], out, zero)


def _in_layout_of(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` in the strides ``torch.empty_like(like)`` has (those of a dense ``like``, a
    transposed view's included; contiguous otherwise), copied only where they differ."""
    strides = torch.empty_like(like, device="meta").stride()
    if grad.stride() == strides:
        return grad
    return torch.empty_like(like).copy_(grad)


def _weight_grad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, like: torch.Tensor,
                 grouped: bool) -> torch.Tensor:
    """``out[e] = a[:, rows of e] @ b[rows of e]``, the gradient of the weight stack ``like``,
    in its strides: a transposed stack's (``like.stride(1) == 1``) computed as the transposed
    product, so that its base takes the gradient without a copy."""
    if like.stride(-2) == 1 and like.stride(-1) != 1:
        grad = _grouped_mm(b.t(), a.t(), offsets, grouped_k=True, grouped=grouped).transpose(-2, -1)
    else:
        grad = _grouped_mm(a, b, offsets, grouped_k=True, grouped=grouped)
    return _in_layout_of(grad, like)


def _row_experts(expert_offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The expert of each dispatch row, on the device; rows past ``offsets[E]`` get E - 1 (their
    coefficient is 0 and no segment sum takes them)."""
    rows = torch.arange(num_rows, dtype=expert_offsets.dtype, device=expert_offsets.device)
    experts = torch.searchsorted(expert_offsets[1:], rows, right=True)
    return experts.clamp(max=expert_offsets.shape[0] - 2)


def _segment_sums(rows: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """``out[e] = sum of rows [offsets[e], offsets[e+1])`` in row order (``torch.segment_reduce``:
    one order on any thread count), in rows' dtype; rows past ``offsets[E]`` are dropped."""
    bounds = torch.cat([expert_offsets, expert_offsets.new_full((1,), rows.shape[0])])
    return torch.segment_reduce(rows, "sum", offsets=bounds, axis=0, unsafe=True)[:-1]


def _activation_grad(grad: torch.Tensor, x: torch.Tensor, activation: str, out: torch.Tensor) -> torch.Tensor:
    """``grad * act'(x)`` by aten's fused derivative kernels (the backward recomputes the
    activation from the saved pre-activations), written into ``out`` (a view of d pre)."""
    if activation == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=out)
    if activation in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward.grad_input(grad, x, approximate="tanh" if activation == "gelu_tanh"
                                                       else "none", grad_input=out)
    if activation == "relu2":
        return torch.mul(grad, 2 * F.relu(x), out=out)
    return torch.ops.aten.threshold_backward.grad_input(grad, x, 0, grad_input=out)


def _halves(pre: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) column views of gated rows in gate_up's row layout."""
    if interleaved:
        return pre[:, 0::2], pre[:, 1::2]
    return pre.chunk(2, dim=-1)


def _activation(pre: torch.Tensor, activation: str, gated: bool, interleaved: bool, alpha: float,
                limit: float) -> torch.Tensor:
    """The FFN's hidden rows from the pre-activations, in their dtype, as PyTorch computes them."""
    if not gated:
        return ACTIVATIONS[activation](pre)
    return gated_hidden(*_halves(pre, interleaved), activation, alpha, limit)


def _clamped_swiglu_grads(grad_hidden: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, alpha: float,
                          limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of :func:`astrea.reference.experts.clamped_swiglu` in fp32 (float64 for
    float64 rows): zero where a clamp holds its half, torch.clamp's derivative at the bounds (1)."""
    wide = torch.float64 if gate.dtype == torch.float64 else torch.float32
    gate, up, grad_hidden = gate.to(wide), up.to(wide), grad_hidden.to(wide)
    clamped_gate = gate.clamp(max=limit)
    sig = torch.sigmoid(clamped_gate * alpha)
    glu_grad = sig * (1 + clamped_gate * alpha * (1 - sig))
    grad_gate = torch.where(gate <= limit, grad_hidden * (up.clamp(-limit, limit) + 1) * glu_grad, 0)
    grad_up = torch.where((up >= -limit) & (up <= limit), grad_hidden * clamped_gate * sig, 0)
    return grad_gate, grad_up


def _activation_backward(pre: torch.Tensor, grad_hidden: torch.Tensor, activation: str, gated: bool,
                         interleaved: bool, alpha: float, limit: float, dtype: torch.dtype,
                         act_gate: torch.Tensor | None = None) -> torch.Tensor:
    """d pre in ``dtype`` from d hidden, gate and up columns written straight into one output
    tensor in gate_up's row layout; ``act_gate``: ``act(gate)`` where the caller has it."""
    grad_pre = torch.empty(pre.shape, dtype=dtype, device=pre.device)
    if not gated:
        return _activation_grad(grad_hidden, pre, activation, out=grad_pre)
    gate, up = _halves(pre, interleaved)
    grad_gate, grad_up = _halves(grad_pre, interleaved)
    if activation == "clamped_swiglu":
        grads = _clamped_swiglu_grads(grad_hidden, gate, up, alpha, limit)
        grad_gate.copy_(grads[0])
        grad_up.copy_(grads[1])
        return grad_pre
    if act_gate is None:
        act_gate = ACTIVATIONS[activation](gate)
    _activation_grad(grad_hidden * up, gate, activation, out=grad_gate)
    torch.mul(grad_hidden, act_gate, out=grad_up)
    return grad_pre


def _exact_in(coef_rows: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the fp32 coefficients are all exact in the half-precision ``dtype`` (routing
    weights that came in it); checked on CPU tensors only, where reading the answer costs no sync."""
    if dtype not in (torch.bfloat16, torch.float16) or coef_rows.device.type != "cpu":
        return False
    return torch.equal(coef_rows.to(dtype).to(coef_rows.dtype), coef_rows)


def _sum_slots(rows: torch.Tensor, inverse_positions: torch.Tensor, coef_rows: torch.Tensor,
               weighted: bool = True, bias: torch.Tensor | None = None,
               row_experts: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = sum_j c[r] * (rows[r] + bias[e(r)])`` (or ``sum_j rows[r]``) with
    ``r = inverse_positions[t, j]``, j in order, in c's dtype: the rows are widened as they are
    read, never copied wide. Weighted half-precision rows without bias, with coefficients exact in
    their dtype, come back in it instead (one bmm: the exact fp32 products summed in fp32 in
    bmm's order, rounded once). Unweighted sums come back in rows' dtype (half rows summed in
    fp32, rounded once)."""
    num_tokens, top_k = inverse_positions.shape
    positions = inverse_positions.reshape(-1).long()
    gathered = rows.index_select(0, positions).view(num_tokens, top_k, rows.shape[1])
    if not weighted:
        return gathered.sum(1)
    if bias is None and _exact_in(coef_rows, rows.dtype):
        # Half-precision rows times coefficients exact in their dtype: the products are exact in
        # fp32, and bmm sums them in fp32 without the fp32 terms or output. Its order (and its
        # flushing of subnormal products) can change the last bit of a few sums against the
        # slot-order sum below; each shape has one order on any thread count.
        narrow_coef = coef_rows.to(rows.dtype).index_select(0, positions).view(num_tokens, 1, top_k)
        return torch.bmm(narrow_coef, gathered).view(num_tokens, rows.shape[1])
    coef = coef_rows.index_select(0, positions).view(num_tokens, top_k, 1)
    terms = gathered * coef
    if bias is not None:
        terms.addcmul_(bias.index_select(0, row_experts.index_select(0, positions)).view(terms.shape), coef)
    return terms.sum(1)


def _forward(x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows, gate_up_bias,
             down_bias, activation, gated, interleaved, alpha, limit, keep_pre, grouped: bool = True):
    """(out, pre-activations, or none of their rows without ``keep_pre``): the GEMMs in x's
    dtype, the activation in x's dtype and the weighted sum in fp32."""
    rows = x.index_select(0, sorted_token_ids.long())
    pre = _grouped_mm(rows, gate_up.transpose(-2, -1), expert_offsets, grouped=grouped)
    row_experts = None
    if gate_up_bias is not None or down_bias is not None:
        row_experts = _row_experts(expert_offsets, rows.shape[0])
    if gate_up_bias is not None:
        pre = pre + gate_up_bias.index_select(0, row_experts)
    # The activation in x's dtype, as PyTorch computes it (each op in fp32 inside, rounded once).
    hidden = _activation(pre, activation, gated, interleaved, alpha, limit)
    y = _grouped_mm(hidden, down.transpose(-2, -1), expert_offsets, grouped=grouped)
    out = _sum_slots(y, inverse_positions, coef_rows, bias=down_bias, row_experts=row_experts)
    return out.to(x.dtype), pre if keep_pre else pre.new_empty(0, pre.shape[1])


def _backward(grad_out, x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows, gate_up_bias,
              down_bias, pre, activation, gated, interleaved, alpha, limit, grouped: bool = True):
    """(d x, d gate_up, d down, d coef_rows, d gate_up_bias, d down_bias) of :func:`_forward`;
    an absent bias gets an empty gradient."""
    wide = coef_rows.dtype
    ids = sorted_token_ids.long()
    rows = x.index_select(0, ids)
    # Recomputed, as the forward did; act(gate) kept for d up.
    act_gate = None
    if gated and activation not in GATED_ACTIVATIONS:
        gate, up = _halves(pre, interleaved)
        act_gate = ACTIVATIONS[activation](gate)
        hidden = act_gate * up
    else:
        hidden = _activation(pre, activation, gated, interleaved, alpha, limit)
    grad_rows = grad_out.index_select(0, ids)
    # d a = c * (g @ down[e]) and d c = <g, down[e] @ a + down_bias[e]>: one GEMM for both.
    grad_hidden_unscaled = _grouped_mm(grad_rows, down, expert_offsets, grouped=grouped)
    grad_coef = torch.linalg.vecdot(grad_hidden_unscaled.to(wide), hidden.to(wide))
    column = coef_rows[:, None]
    # Coefficients exact in x's half dtype: the product in x's dtype is the exact fp32 product
    # rounded once, the same bits as from the fp32 column, without the fp32 temporary.
    narrow_column = column.to(x.dtype) if _exact_in(coef_rows, x.dtype) else column
    grad_down_bias = x.new_empty(0)
    if down_bias is not None:
        row_experts = _row_experts(expert_offsets, rows.shape[0])
        grad_coef = grad_coef + torch.linalg.vecdot(grad_rows.to(wide), down_bias.index_select(0, row_experts).to(wide))
        wide_scaled_rows = grad_rows * column  # the bias gradient sums the products unrounded
        grad_down_bias = _in_layout_of(_segment_sums(wide_scaled_rows, expert_offsets).to(x.dtype), down_bias)
        scaled_grad_rows = wide_scaled_rows.to(x.dtype)
    else:
        # The products in coef's dtype rounded once into x's, as a cast would, without the wide copy.
        scaled_grad_rows = torch.mul(grad_rows, narrow_column, out=torch.empty_like(grad_rows))
    grad_down = _weight_grad(scaled_grad_rows.t(), hidden, expert_offsets, down, grouped)
    grad_hidden = torch.mul(grad_hidden_unscaled, narrow_column, out=torch.empty_like(grad_hidden_unscaled))
    grad_pre = _activation_backward(pre, grad_hidden, activation, gated, interleaved, alpha, limit, x.dtype, act_gate)
    grad_gate_up_bias = x.new_empty(0)
    if gate_up_bias is not None:
        grad_gate_up_bias = _in_layout_of(_segment_sums(grad_pre.to(wide), expert_offsets).to(x.dtype), gate_up_bias)
    grad_gate_up = _weight_grad(grad_pre.t(), rows, expert_offsets, gate_up, grouped)
    grad_rows_x = _grouped_mm(grad_pre, gate_up, expert_offsets, grouped=grouped)
    grad_x = _sum_slots(grad_rows_x, inverse_positions, coef_rows, weighted=False)
    return grad_x, grad_gate_up, grad_down, grad_coef, grad_gate_up_bias, grad_down_bias


def _triton_forward(x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows, gate_up_bias,
                    down_bias, activation, gated, interleaved, alpha, limit, keep_pre):
    from astrea.kernels.experts import experts_forward

    return experts_forward(x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows,
                           activation, gated, keep_pre, gate_up_bias=gate_up_bias, down_bias=down_bias,
                           interleaved=interleaved, swiglu_alpha=alpha, swiglu_limit=limit)


def _triton_backward(grad_out, x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows,
                     gate_up_bias, down_bias, pre, activation, gated, interleaved, alpha, limit):
    from astrea.kernels.experts import experts_backward

    return experts_backward(grad_out, x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down,
                            coef_rows, pre, activation, gated, gate_up_bias=gate_up_bias, down_bias=down_bias,
                            interleaved=interleaved, swiglu_alpha=alpha, swiglu_limit=limit)


# The reference runs the torch steps with one plain matmul per expert.
_FORWARD = _backend.Implementations("moe_experts", triton=_triton_forward, torch=_forward,
                                    reference=functools.partial(_forward, grouped=False))
_BACKWARD = _backend.Implementations("moe_experts_backward", triton=_triton_backward, torch=_backward,
                                     reference=functools.partial(_backward, grouped=False))


@torch.library.custom_op("astrea::moe_experts", mutates_args=())
def _moe_experts_op(x: torch.Tensor, sorted_token_ids: torch.Tensor, inverse_positions: torch.Tensor,
                    expert_offsets: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, coef_rows: torch.Tensor,
                    gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, activation: str, gated: bool,
                    interleaved: bool, swiglu_alpha: float, swiglu_limit: float, keep_pre: bool,
                    impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [N, H], the pre-activations [N*k, 2I or I] in dispatch order and gate_up's row layout,
    biased, kept for the backward: none of their rows, [0, 2I or I], without ``keep_pre``, when
    nothing needs a gradient)."""
    return _FORWARD(impl, x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows,
                    gate_up_bias, down_bias, activation, gated, interleaved, swiglu_alpha, swiglu_limit, keep_pre)


@_moe_experts_op.register_fake
def _(x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows, gate_up_bias, down_bias,
      activation, gated, interleaved, swiglu_alpha, swiglu_limit, keep_pre, impl):
    return x.new_empty(x.shape), x.new_empty(sorted_token_ids.shape[0] if keep_pre else 0, gate_up.shape[1])


_extension.register_fake("grouped_mm_cpu", lambda a, b, offsets: a.new_empty(a.shape[0], b.shape[2]))
_extension.register_fake("grouped_weight_grad_cpu",
                         lambda a, b, offsets: a.new_empty(offsets.shape[0] - 1, a.shape[0], b.shape[1]))


@torch.library.custom_op("astrea::moe_experts_backward", mutates_args=())
def _moe_experts_backward_op(grad_out: torch.Tensor, x: torch.Tensor, sorted_token_ids: torch.Tensor,
                             inverse_positions: torch.Tensor, expert_offsets: torch.Tensor, gate_up: torch.Tensor,
                             down: torch.Tensor, coef_rows: torch.Tensor, gate_up_bias: torch.Tensor | None,
                             down_bias: torch.Tensor | None, pre: torch.Tensor, activation: str, gated: bool,
                             interleaved: bool, swiglu_alpha: float, swiglu_limit: float, impl: str
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor]:
    """(d x, d gate_up, d down, d coef_rows, d gate_up_bias, d down_bias): the weight and bias
    gradients in the strides ``torch.empty_like`` gives them, an absent bias's empty."""
    return _BACKWARD(impl, grad_out, x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down,
                     coef_rows, gate_up_bias, down_bias, pre, activation, gated, interleaved, swiglu_alpha,
                     swiglu_limit)


def _bias_grad_like(bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0) if bias is None else torch.empty_like(bias)


@_moe_experts_backward_op.register_fake
def _(grad_out, x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows, gate_up_bias,
      down_bias, pre, activation, gated, interleaved, swiglu_alpha, swiglu_limit, impl):
    return (x.new_empty(x.shape), torch.empty_like(gate_up), torch.empty_like(down),
            coef_rows.new_empty(coef_rows.shape), _bias_grad_like(gate_up_bias, x), _bias_grad_like(down_bias, x))


def _setup_context(ctx, inputs, output):
    (x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows, gate_up_bias, down_bias,
     ctx.activation, ctx.gated, ctx.interleaved, ctx.swiglu_alpha, ctx.swiglu_limit, _, ctx.impl) = inputs
    ctx.save_for_backward(x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows,
                          gate_up_bias, down_bias, output[1])


def _autograd_backward(ctx, grad_out, _grad_pre):
    *tensors, gate_up_bias, down_bias, pre = ctx.saved_tensors
    grad_x, grad_gate_up, grad_down, grad_coef, grad_gate_up_bias, grad_down_bias = \
        torch.ops.astrea.moe_experts_backward(grad_out.contiguous(), *tensors, gate_up_bias, down_bias, pre,
                                              ctx.activation, ctx.gated, ctx.interleaved, ctx.swiglu_alpha,
                                              ctx.swiglu_limit, ctx.impl)
    return (grad_x, None, None, None, grad_gate_up, grad_down, grad_coef,
            None if gate_up_bias is None else grad_gate_up_bias, None if down_bias is None else grad_down_bias,
            None, None, None, None, None, None, None)


_moe_experts_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class _SlotScale(torch.autograd.Function):
    """``expert_scale[e(t, j)]`` for every slot ``(t, j)``. The backward sums each expert's slot
    gradients as one segment of dispatch rows (``torch.segment_reduce``, a fixed order) where
    indexing's backward would scatter-add them in an order CUDA does not fix."""

    @staticmethod
    def forward(expert_scale, experts, inverse_positions, expert_offsets):
        return expert_scale[experts]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2], inputs[3])

    @staticmethod
    def backward(ctx, grad):
        inverse_positions, expert_offsets = ctx.saved_tensors
        num_rows = inverse_positions.numel()
        rows = grad.new_zeros(num_rows).scatter(0, inverse_positions.reshape(-1).long(), grad.reshape(-1))
        # Slots of out-of-range experts (rows past offsets[E]) are dropped.
        return _segment_sums(rows, expert_offsets), None, None, None


def _check_bias(op: str, name: str, bias: torch.Tensor | None, x: torch.Tensor, experts: int, width: int,
                meaning: str) -> None:
    if bias is None:
        return
    SPEC.check_tensor(name, bias, ndim=2)
    check_size(op, name, bias, 0, experts, "the number of experts E of dispatch")
    check_size(op, name, bias, 1, width, meaning)
    if bias.dtype != x.dtype:
        raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}; got {bias.dtype}")


def _check_real(op: str, name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{op}: {name} must be {'a positive' if positive else 'a'} finite number; got {value!r}")
    return float(value)


def moe_experts(x: torch.Tensor, dispatch: Dispatch, gate_up: torch.Tensor, down: torch.Tensor,
                weights: torch.Tensor, *, activation: str = "silu", gated: bool = True,
                expert_scale: torch.Tensor | None = None, gate_up_bias: torch.Tensor | None = None,
                down_bias: torch.Tensor | None = None, gate_up_layout: str = "concatenated",
                swiglu_alpha: float = SWIGLU_ALPHA, swiglu_limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """The experts of a MoE layer on stacked weights: ``out[t] = sum_j w[t, j] * s[e] * FFN_e(x[t])``
    with ``FFN_e(h) = down[e] @ act(gate_up[e] @ h + gate_up_bias[e]) + down_bias[e]``.

    Args:
        x: ``[N, H]`` token features, fp32/fp16/bf16 (float64 too, on CPU tensors).
        dispatch: the :class:`~astrea.ops.Dispatch` of the routing indices ``[N, k]`` of these tokens.
        gate_up: ``[E, 2I, H]`` gate and up rows in ``gate_up_layout`` (gated), or ``[E, I, H]``
            (``gated=False``); x's dtype, any strides. transformers' ``gate_up_proj`` as it is, or
            ``gate_up_proj.transpose(1, 2)`` for a stack stored ``[E, H, 2I]`` (Aria, gpt-oss).
        down: ``[E, H, I]`` (transformers' ``down_proj``; ``down_proj.transpose(1, 2)`` for one
            stored ``[E, I, H]``), x's dtype, any strides.
        weights: ``[N, k]`` routing weights (any float dtype; the weighted sum is fp32).
        activation: one of :data:`ACTIVATIONS` (``silu``, ``gelu``, ``gelu_tanh``, ``relu``,
            ``relu2`` = relu(z)^2), on the gate half (gated) or the whole up projection; or
            ``clamped_swiglu`` (gated only): gpt-oss's ``(clamp(up, -limit, limit) + 1) * g *
            sigmoid(alpha * g)`` with ``g = min(gate, limit)``.
        gated: whether gate_up holds gate and up rows (``act(gate) * up``) or up rows only.
        expert_scale: optional ``[E]`` per-expert calibration, as in :func:`astrea.ops.weighted_combine`.
        gate_up_bias: optional ``[E, 2I]`` (``[E, I]`` ungated), x's dtype, in gate_up's row
            layout, added to ``gate_up[e] @ x[t]`` before the activation.
        down_bias: optional ``[E, H]``, x's dtype, added to each expert's output before the
            routing weight and expert_scale multiply it.
        gate_up_layout: ``"concatenated"`` (gate rows 0..I-1, then up rows I..2I-1) or
            ``"interleaved"`` (gate row i at 2i, up row i at 2i + 1: gpt-oss); gated only.
        swiglu_alpha, swiglu_limit: ``alpha`` and ``limit`` (> 0) of ``clamped_swiglu``
            (gpt-oss's 1.702 and 7.0).

    Returns:
        ``[N, H]`` in x's dtype. Differentiable in x, both weight stacks, both biases, the routing
        weights and expert_scale; the weight and bias gradients come in the strides of the tensors
        given (a transposed view's gradient is transposed: its base takes it without a copy).
        Deterministic. Slots whose expert is out of range contribute nothing.
    """
    op = "moe_experts"
    dispatch = check_dispatch(op, dispatch)
    SPEC.check_tensor("x", x, ndim=2)
    check_choice(op, "activation", activation, (*ACTIVATIONS, *GATED_ACTIVATIONS))
    if not isinstance(gated, bool):
        raise TypeError(f"{op}: gated must be a bool, got {type(gated).__name__}")
    check_choice(op, "gate_up_layout", gate_up_layout, GATE_UP_LAYOUTS)
    if not gated and activation in GATED_ACTIVATIONS:
        raise ValueError(f"{op}: activation {activation!r} gates the up half, so it needs gated=True; got gated=False")
    if not gated and gate_up_layout != "concatenated":
        raise ValueError(f"{op}: gate_up_layout {gate_up_layout!r} places gate and up rows, so it needs gated=True "
                         "(an ungated gate_up has up rows only); got gated=False")
    swiglu_alpha = _check_real(op, "swiglu_alpha", swiglu_alpha)
    swiglu_limit = _check_real(op, "swiglu_limit", swiglu_limit, positive=True)
    num_tokens, hidden = x.shape
    num_experts = dispatch.num_experts
    check_size(op, "x", x, 0, dispatch.inverse_positions.shape[0], "the number of tokens N of dispatch")
    SPEC.check_tensor("gate_up", gate_up, ndim=3)
    SPEC.check_tensor("down", down, ndim=3)
    check_size(op, "gate_up", gate_up, 0, num_experts, "the number of experts E of dispatch")
    check_size(op, "gate_up", gate_up, 2, hidden, "the hidden size H = x.shape[1]")
    check_size(op, "down", down, 0, num_experts, "the number of experts E of dispatch")
    check_size(op, "down", down, 1, hidden, "the hidden size H = x.shape[1]")
    intermediate = down.shape[2]
    check_size(op, "gate_up", gate_up, 1, 2 * intermediate if gated else intermediate,
               "2 * I (gated) or I, with I = down.shape[2]")
    for name, value in (("gate_up", gate_up), ("down", down)):
        if value.dtype != x.dtype:
            raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}; got {value.dtype}")
    _check_bias(op, "gate_up_bias", gate_up_bias, x, num_experts, gate_up.shape[1],
                "gate_up.shape[1] (2 * I gated, I ungated)")
    _check_bias(op, "down_bias", down_bias, x, num_experts, hidden, "the hidden size H = x.shape[1]")
    SPEC.check_tensor("weights", weights, ndim=2)
    if weights.shape != dispatch.indices.shape:
        raise ValueError(f"{op}: weights must have the shape of dispatch.indices {tuple(dispatch.indices.shape)}; "
                         f"got {tuple(weights.shape)}")
    if expert_scale is not None:
        SPEC.check_tensor("expert_scale", expert_scale, ndim=1)
        check_size(op, "expert_scale", expert_scale, 0, num_experts, "the number of experts E of dispatch")
    device = check_same_device(op, x=x, gate_up=gate_up, down=down, weights=weights, expert_scale=expert_scale,
                               gate_up_bias=gate_up_bias, down_bias=down_bias, indices=dispatch.indices)
    # The weight of each row of the dispatch layout: torch ops, so autograd carries its gradient
    # to the routing weights and (by _SlotScale, in a fixed order) the scale. Out-of-range slots
    # weigh 0.
    indices = dispatch.indices.long()
    in_range = (indices >= 0) & (indices < num_experts)
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    coef = torch.where(in_range, weights.to(wide), 0)
    if expert_scale is not None:
        coef = coef * _SlotScale.apply(expert_scale.to(wide), indices.clamp(0, num_experts - 1),
                                       dispatch.inverse_positions, dispatch.expert_offsets)
    coef_rows = coef.new_zeros(num_tokens * indices.shape[1]).scatter(
        0, dispatch.inverse_positions.reshape(-1).long(), coef.reshape(-1))
    # The backward needs the pre-activations; inference writes none.
    keep_pre = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, gate_up, down, coef_rows, gate_up_bias, down_bias))
    out, _ = torch.ops.astrea.moe_experts(x, dispatch.sorted_token_ids, dispatch.inverse_positions,
                                          dispatch.expert_offsets, gate_up, down, coef_rows, gate_up_bias, down_bias,
                                          activation, gated, gate_up_layout == "interleaved", swiglu_alpha,
                                          swiglu_limit, keep_pre, SPEC.choose(device))
    return out
