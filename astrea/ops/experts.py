"""Grouped expert FFNs on stacked weights: the gather, both grouped GEMMs, the activation and
the weighted sum over each token's k slots in one op, without a host sync.

Layout (transformers' fused experts, taken as they are, without a copy): ``gate_up [E, 2I, H]``
(gate rows first, then up rows; ``[E, I, H]`` for a plain, ungated FFN) and ``down [E, H, I]``.
For routing slot ``(t, j)`` with expert ``e``::

    pre = gate_up[e] @ x[t];   a = act(pre[:I]) * pre[I:]   (gated)  or  act(pre)
    out[t] = sum_j  w[t, j] * s[e] * (down[e] @ a)          (j in slot order, fp32)

Implementations, all keeping the pre-activations of the forward for the backward, which
recomputes the activation from them and sums each token's slots in a fixed order (no atomics,
bitwise reproducible):

* ``triton`` (CUDA tensors under ``auto``; CPU tensors under the ``triton`` backend, through
  the interpreter): the grouped-GEMM kernels of :mod:`astrea.kernels.experts`, the token rows
  gathered inside the first GEMM's tile loads, the activation in its epilogue, the routing
  coefficient in the second's, tiles scheduled from the offsets on the device.
* ``torch`` (CPU tensors under ``auto``): the rows gathered in expert order (``index_select``),
  ``F.grouped_mm`` for both projections with the group offsets read on the device, and
  fixed-order sums; shapes whose strides are not 16-byte aligned (or float64, for gradcheck)
  run the same steps as one matmul per expert. The backward runs four grouped GEMMs (d rows,
  d gate_up, d down, d a).
* ``reference``: the torch steps with one plain matmul per expert.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from astrea import _backend, _extension
from astrea._validation import check_choice, check_same_device, check_size
from astrea.ops.dispatch import Dispatch, check_dispatch
from astrea.reference.experts import ACTIVATIONS

SPEC = _backend.declare_op(
    "moe_experts", kernel="triton", cpu_impl="torch",
    dtypes={"cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
            "cuda": (torch.float32, torch.float16, torch.bfloat16)},
    supports={"triton": "grouped GEMMs gathering token rows through the dispatch, activation and routing weight "
                        "fused, any strides, no host sync; float64 only under the interpreter",
              "torch": "F.grouped_mm on 16-byte-aligned shapes, one matmul per expert otherwise (float64 too); "
                       "no host sync on aligned shapes"})

__all__ = ["ACTIVATIONS", "moe_experts"]


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
    On CPU tensors the weight gradients (``grouped_k``) run the C++ kernel, whose sums over each
    expert's rows have one order on any thread count (F.grouped_mm's BLAS splits them)."""
    if grouped and grouped_k and a.device.type == "cpu" and _extension.has_kernel("grouped_weight_grad_cpu", "CPU"):
        return torch.ops.astrea.grouped_weight_grad_cpu(a, b, offsets)
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


def _activation_grad(grad: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    """``grad * act'(x)`` by aten's fused derivative kernels (the backward recomputes the
    activation from the saved pre-activations)."""
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, x)
    if activation in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh" if activation == "gelu_tanh" else "none")
    return torch.ops.aten.threshold_backward(grad, x, 0)


def _activation(pre: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """The FFN's hidden rows from the (fp32) pre-activations."""
    if not gated:
        return ACTIVATIONS[activation](pre)
    gate, up = pre.chunk(2, dim=-1)
    return ACTIVATIONS[activation](gate) * up


def _activation_backward(pre: torch.Tensor, grad_hidden: torch.Tensor, activation: str, gated: bool,
                         dtype: torch.dtype) -> torch.Tensor:
    """d pre in ``dtype`` from d hidden, gate and up halves written into one output tensor."""
    if not gated:
        return _activation_grad(grad_hidden, pre, activation).to(dtype)
    gate, up = pre.chunk(2, dim=-1)
    grad_pre = torch.empty(pre.shape, dtype=dtype, device=pre.device)
    intermediate = gate.shape[-1]
    grad_pre[:, :intermediate] = _activation_grad(grad_hidden * up, gate, activation)
    grad_pre[:, intermediate:] = grad_hidden * ACTIVATIONS[activation](gate)
    return grad_pre


def _sum_slots(rows: torch.Tensor, inverse_positions: torch.Tensor, coef_rows: torch.Tensor,
               weighted: bool = True) -> torch.Tensor:
    """``out[t] = sum_j c[r] * rows[r]`` (or ``sum_j rows[r]``) with ``r = inverse_positions[t, j]``,
    j in order, in c's dtype: the rows are widened as they are read, never copied wide."""
    num_tokens, top_k = inverse_positions.shape
    positions = inverse_positions.reshape(-1).long()
    gathered = rows.index_select(0, positions).view(num_tokens, top_k, rows.shape[1])
    if not weighted:
        return gathered.sum(1, dtype=coef_rows.dtype)
    return (gathered * coef_rows.index_select(0, positions).view(num_tokens, top_k, 1)).sum(1)


def _forward(x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows, activation, gated,
             keep_pre, grouped: bool = True):
    """(out, pre-activations, or none of their rows without ``keep_pre``): the GEMMs in x's
    dtype, the activation and the weighted sum in fp32."""
    rows = x.index_select(0, sorted_token_ids.long())
    pre = _grouped_mm(rows, gate_up.transpose(-2, -1), expert_offsets, grouped=grouped)
    # The activation in x's dtype, as PyTorch computes it (each op in fp32 inside, rounded once).
    hidden = _activation(pre, activation, gated)
    y = _grouped_mm(hidden, down.transpose(-2, -1), expert_offsets, grouped=grouped)
    return _sum_slots(y, inverse_positions, coef_rows).to(x.dtype), pre if keep_pre else pre.new_empty(0, pre.shape[1])


def _backward(grad_out, x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows, pre,
              activation, gated, grouped: bool = True):
    """(d x, d gate_up, d down, d coef_rows) of :func:`_forward`."""
    wide = coef_rows.dtype
    ids = sorted_token_ids.long()
    rows = x.index_select(0, ids)
    hidden = _activation(pre, activation, gated)  # recomputed, as the forward computed it
    grad_rows = grad_out.index_select(0, ids)
    # d a = c * (g @ down[e]) and d c = <g, down[e] @ a> = <g @ down[e], a>: one GEMM for both.
    grad_hidden_unscaled = _grouped_mm(grad_rows, down, expert_offsets, grouped=grouped)
    grad_coef = torch.linalg.vecdot(grad_hidden_unscaled.to(wide), hidden.to(wide))
    column = coef_rows[:, None]
    grad_down = _grouped_mm((grad_rows * column).to(x.dtype).t(), hidden, expert_offsets, grouped_k=True,
                            grouped=grouped)
    grad_pre = _activation_backward(pre, (grad_hidden_unscaled * column).to(x.dtype), activation, gated, x.dtype)
    grad_gate_up = _grouped_mm(grad_pre.t(), rows, expert_offsets, grouped_k=True, grouped=grouped)
    grad_rows_x = _grouped_mm(grad_pre, gate_up, expert_offsets, grouped=grouped)
    grad_x = _sum_slots(grad_rows_x, inverse_positions, coef_rows, weighted=False).to(x.dtype)
    return grad_x, grad_gate_up, grad_down, grad_coef


def _triton_forward(*args):
    from astrea.kernels.experts import experts_forward

    return experts_forward(*args)


def _triton_backward(*args):
    from astrea.kernels.experts import experts_backward

    return experts_backward(*args)


# The reference runs the torch steps with one plain matmul per expert.
_FORWARD = _backend.Implementations("moe_experts", triton=_triton_forward, torch=_forward,
                                    reference=functools.partial(_forward, grouped=False))
_BACKWARD = _backend.Implementations("moe_experts_backward", triton=_triton_backward, torch=_backward,
                                     reference=functools.partial(_backward, grouped=False))


@torch.library.custom_op("astrea::moe_experts", mutates_args=())
def _moe_experts_op(x: torch.Tensor, sorted_token_ids: torch.Tensor, inverse_positions: torch.Tensor,
                    expert_offsets: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, coef_rows: torch.Tensor,
                    activation: str, gated: bool, keep_pre: bool, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [N, H], the pre-activations [N*k, 2I or I] in dispatch order kept for the backward:
    none of their rows, [0, 2I or I], without ``keep_pre``, when nothing needs a gradient)."""
    return _FORWARD(impl, x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows,
                    activation, gated, keep_pre)


@_moe_experts_op.register_fake
def _(x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows, activation, gated, keep_pre,
      impl):
    return x.new_empty(x.shape), x.new_empty(sorted_token_ids.shape[0] if keep_pre else 0, gate_up.shape[1])


_extension.register_fake("grouped_weight_grad_cpu",
                         lambda a, b, offsets: a.new_empty(offsets.shape[0] - 1, a.shape[0], b.shape[1]))


@torch.library.custom_op("astrea::moe_experts_backward", mutates_args=())
def _moe_experts_backward_op(grad_out: torch.Tensor, x: torch.Tensor, sorted_token_ids: torch.Tensor,
                             inverse_positions: torch.Tensor, expert_offsets: torch.Tensor, gate_up: torch.Tensor,
                             down: torch.Tensor, coef_rows: torch.Tensor, pre: torch.Tensor, activation: str,
                             gated: bool, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d x, d gate_up, d down, d coef_rows)."""
    return _BACKWARD(impl, grad_out, x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down,
                     coef_rows, pre, activation, gated)


@_moe_experts_backward_op.register_fake
def _(grad_out, x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows, pre, activation,
      gated, impl):
    return x.new_empty(x.shape), gate_up.new_empty(gate_up.shape), down.new_empty(down.shape), \
        coef_rows.new_empty(coef_rows.shape)


def _setup_context(ctx, inputs, output):
    x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows, ctx.activation, ctx.gated, \
        _, ctx.impl = inputs
    ctx.save_for_backward(x, sorted_token_ids, inverse_positions, expert_offsets, gate_up, down, coef_rows, output[1])


def _autograd_backward(ctx, grad_out, _grad_pre):
    grad_x, grad_gate_up, grad_down, grad_coef = torch.ops.astrea.moe_experts_backward(
        grad_out.contiguous(), *ctx.saved_tensors, ctx.activation, ctx.gated, ctx.impl)
    return grad_x, None, None, None, grad_gate_up, grad_down, grad_coef, None, None, None, None


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
        # One more segment takes the rows past offsets[E] (slots of out-of-range experts): dropped.
        bounds = torch.cat([expert_offsets, expert_offsets.new_full((1,), num_rows)])
        return torch.segment_reduce(rows, "sum", offsets=bounds, unsafe=True)[:-1], None, None, None


def moe_experts(x: torch.Tensor, dispatch: Dispatch, gate_up: torch.Tensor, down: torch.Tensor,
                weights: torch.Tensor, *, activation: str = "silu", gated: bool = True,
                expert_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The experts of a MoE layer on stacked weights: ``out[t] = sum_j w[t, j] * s[e] * FFN_e(x[t])``.

    Args:
        x: ``[N, H]`` token features, fp32/fp16/bf16 (float64 too, on CPU tensors).
        dispatch: the :class:`~astrea.ops.Dispatch` of the routing indices ``[N, k]`` of these tokens.
        gate_up: ``[E, 2I, H]`` gate rows then up rows (gated), or ``[E, I, H]`` (``gated=False``);
            x's dtype. transformers' ``gate_up_proj`` as it is.
        down: ``[E, H, I]`` (transformers' ``down_proj``), x's dtype.
        weights: ``[N, k]`` routing weights (any float dtype; the weighted sum is fp32).
        activation: one of :data:`ACTIVATIONS` (``silu``, ``gelu``, ``gelu_tanh``, ``relu``), on
            the gate half (gated) or the whole up projection.
        expert_scale: optional ``[E]`` per-expert calibration, as in :func:`astrea.ops.weighted_combine`.

    Returns:
        ``[N, H]`` in x's dtype. Differentiable in x, both weight stacks, the routing weights and
        expert_scale; deterministic. Slots whose expert is out of range contribute nothing.
    """
    op = "moe_experts"
    dispatch = check_dispatch(op, dispatch)
    SPEC.check_tensor("x", x, ndim=2)
    check_choice(op, "activation", activation, ACTIVATIONS)
    if not isinstance(gated, bool):
        raise TypeError(f"{op}: gated must be a bool, got {type(gated).__name__}")
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
    SPEC.check_tensor("weights", weights, ndim=2)
    if weights.shape != dispatch.indices.shape:
        raise ValueError(f"{op}: weights must have the shape of dispatch.indices {tuple(dispatch.indices.shape)}; "
                         f"got {tuple(weights.shape)}")
    if expert_scale is not None:
        SPEC.check_tensor("expert_scale", expert_scale, ndim=1)
        check_size(op, "expert_scale", expert_scale, 0, num_experts, "the number of experts E of dispatch")
    device = check_same_device(op, x=x, gate_up=gate_up, down=down, weights=weights, expert_scale=expert_scale,
                               indices=dispatch.indices)
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
    keep_pre = torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_up, down, coef_rows))
    out, _ = torch.ops.astrea.moe_experts(x, dispatch.sorted_token_ids, dispatch.inverse_positions,
                                          dispatch.expert_offsets, gate_up, down, coef_rows, activation, gated,
                                          keep_pre, SPEC.choose(device))
    return out
