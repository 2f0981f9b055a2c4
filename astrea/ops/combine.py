"""The sparse weighted combine of MoE expert outputs, alone and fused with the stochastic
residual (Triton kernels in :mod:`astrea.kernels.combine`; on CPU tensors the C++ kernels of
csrc/cpu/moe.cpp and csrc/cpu/residual.cpp, else the references)."""

from __future__ import annotations

import functools
import math

import torch

from astrea import _backend, _extension
from astrea._residual_draw import ResidualDraw
from astrea._validation import check_same_device, check_size
from astrea.ops.dense_combine import FUSED_SPEC
from astrea.ops.dispatch import Dispatch, check_dispatch
from astrea.ops.residual import branch_gradient, residual_forward
from astrea.reference import combine as reference

SPEC = _backend.declare_op(
    "weighted_combine", kernel="triton", cpu_kernel="weighted_combine_cpu",
    supports={"triton": "any strides; out-of-range experts and zero-coefficient slots add nothing",
              "extension": "any strides, float64 too; out-of-range experts and zero-coefficient slots add nothing"})


def _triton_forward(expert_out, weights, indices, inverse_positions, expert_scale, num_experts):
    from astrea.kernels.combine import combine_forward

    return combine_forward(expert_out, inverse_positions, weights, indices, expert_scale, num_experts)


def _triton_backward(grad_out, expert_out, weights, indices, inverse_positions, expert_offsets, expert_scale):
    from astrea.kernels.combine import combine_backward

    return combine_backward(grad_out, expert_out, weights, indices, inverse_positions, expert_offsets, expert_scale)


def _c_backward(grad_out, expert_out, weights, indices, inverse_positions, expert_offsets, expert_scale):
    return torch.ops.astrea.weighted_combine_backward_cpu(grad_out, expert_out, weights, indices, inverse_positions,
                                                          expert_scale, expert_offsets.shape[0] - 1)


def _reference_backward(grad_out, expert_out, weights, indices, inverse_positions, expert_offsets, expert_scale):
    return reference.weighted_combine_backward(grad_out, expert_out, weights, indices, inverse_positions,
                                               expert_offsets.shape[0] - 1, expert_scale)


_COMBINE = _backend.Implementations(
    "weighted_combine", triton=_triton_forward, extension="weighted_combine_cpu",
    reference=lambda y, w, idx, pos, scale, e: reference.weighted_combine(y, w, idx, pos, e, scale))
# (d expert_out, d weights, d expert_scale or None/empty without expert_scale).
_COMBINE_BACKWARD = _backend.Implementations("weighted_combine_backward", triton=_triton_backward,
                                             extension=_c_backward, reference=_reference_backward)


def _triton_fused(expert_out, weights, indices, inverse_positions, expert_scale, num_experts, residual, draw):
    from astrea.kernels.combine import combine_forward

    out = combine_forward(expert_out, inverse_positions, weights, indices, expert_scale, num_experts,
                          residual=residual.reshape(weights.shape[0], residual.shape[-1]),
                          rows_per_unit=draw.units(residual.shape)[1], **draw.kernel_args())
    return out.view(residual.shape)


def _in_sequence(impl, expert_out, weights, indices, inverse_positions, expert_scale, num_experts, residual, draw):
    """The combine, then the stochastic residual, each on ``impl``."""
    combined = _COMBINE(impl, expert_out, weights, indices, inverse_positions, expert_scale, num_experts)
    return residual_forward(impl, combined.view(residual.shape), residual, draw)


# The combine with the stochastic residual: one pass on Triton, the two in sequence elsewhere;
# the output has residual's shape.
_FUSED = _backend.Implementations("sparse_combine_residual", triton=_triton_fused,
                                  extension=functools.partial(_in_sequence, "extension"),
                                  reference=functools.partial(_in_sequence, "reference"))


# ---- registration -------------------------------------------------------------------------


@torch.library.custom_op("astrea::weighted_combine", mutates_args=())
def _weighted_combine_op(expert_out: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                         inverse_positions: torch.Tensor, expert_offsets: torch.Tensor,
                         expert_scale: torch.Tensor | None, impl: str) -> torch.Tensor:
    return _COMBINE(impl, expert_out, weights, indices, inverse_positions, expert_scale, expert_offsets.shape[0] - 1)


def _combined_fake(expert_out, weights, indices, *_):
    return expert_out.new_empty(indices.shape[0], expert_out.shape[1])


_weighted_combine_op.register_fake(_combined_fake)
_extension.register_fake("weighted_combine_cpu", _combined_fake)


@torch.library.custom_op("astrea::sparse_combine_residual", mutates_args=())
def _sparse_combine_residual_op(expert_out: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                                inverse_positions: torch.Tensor, expert_offsets: torch.Tensor,
                                expert_scale: torch.Tensor | None, residual: torch.Tensor, p: float, seed: int,
                                offset: int, granularity: str, training: bool, impl: str) -> torch.Tensor:
    return _FUSED(impl, expert_out, weights, indices, inverse_positions, expert_scale, expert_offsets.shape[0] - 1,
                  residual, ResidualDraw(p, seed, offset, granularity, training))


@_sparse_combine_residual_op.register_fake
def _(expert_out, weights, indices, inverse_positions, expert_offsets, expert_scale, residual, p, seed, offset,
      granularity, training, impl):
    return expert_out.new_empty(residual.shape)


@torch.library.custom_op("astrea::weighted_combine_backward", mutates_args=())
def _weighted_combine_backward_op(grad_out: torch.Tensor, expert_out: torch.Tensor, weights: torch.Tensor,
                                  indices: torch.Tensor, inverse_positions: torch.Tensor,
                                  expert_offsets: torch.Tensor, expert_scale: torch.Tensor | None, impl: str
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for expert_out, weights and expert_scale (an empty tensor without expert_scale)."""
    grad_y, grad_weights, grad_scale = _COMBINE_BACKWARD(impl, grad_out, expert_out, weights, indices,
                                                         inverse_positions, expert_offsets, expert_scale)
    return grad_y, grad_weights, grad_scale if expert_scale is not None else weights.new_empty(0)


def _combine_gradients_fake(grad_out, expert_out, weights, expert_scale):
    return (torch.empty_like(expert_out, memory_format=torch.contiguous_format),
            torch.empty_like(weights, memory_format=torch.contiguous_format),
            expert_scale.new_empty(expert_scale.shape) if expert_scale is not None else weights.new_empty(0))


_weighted_combine_backward_op.register_fake(
    lambda grad_out, expert_out, weights, indices, inverse_positions, expert_offsets, expert_scale, impl:
    _combine_gradients_fake(grad_out, expert_out, weights, expert_scale))
_extension.register_fake(
    "weighted_combine_backward_cpu",
    lambda grad_out, expert_out, weights, indices, inverse_positions, expert_scale, num_experts:
    _combine_gradients_fake(grad_out, expert_out, weights, expert_scale))


def _setup_context(ctx, inputs, output):
    """Both forward ops: ``(expert_out, weights, indices, inverse_positions, expert_offsets,
    expert_scale, [residual, p, seed, offset, granularity, training,] impl)``."""
    *combine_inputs, ctx.impl = inputs[:6] + inputs[-1:]
    ctx.has_scale = combine_inputs[5] is not None
    ctx.save_for_backward(*combine_inputs)
    ctx.draw = ResidualDraw(*inputs[7:-1]) if len(inputs) > 7 else None


def _backward(ctx, grad):
    expert_out, weights, indices, inverse_positions, expert_offsets, expert_scale = ctx.saved_tensors
    grad_y = grad_weights = grad_scale = None
    if any(ctx.needs_input_grad[i] for i in (0, 1, 5)):  # expert_out, weights, expert_scale
        grad_y, grad_weights, grad_scale = torch.ops.astrea.weighted_combine_backward(
            # N rows named, not -1: with D = 0 the row count cannot be inferred.
            grad.reshape(weights.shape[0], grad.shape[-1]), expert_out, weights, indices, inverse_positions,
            expert_offsets,
            expert_scale, ctx.impl)
    grads = (grad_y, grad_weights, None, None, None, grad_scale if ctx.has_scale else None)
    if ctx.draw is None:
        return (*grads, None)
    grad_residual = branch_gradient(grad, ctx.draw, ctx.impl) if ctx.needs_input_grad[6] else None
    return (*grads, grad_residual, None, None, None, None, None, None)


_weighted_combine_op.register_autograd(_backward, setup_context=_setup_context)
_sparse_combine_residual_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public functions ---------------------------------------------------------------------


def check_combine_inputs(op: str, expert_out, weights, dispatch, expert_scale) -> Dispatch:
    """Validates the arguments of the sparse combine (also those of the fused combine + residual)."""
    dispatch = check_dispatch(op, dispatch)
    SPEC.check_tensor("expert_out", expert_out, ndim=2, op=op)
    SPEC.check_tensor("weights", weights, ndim=2, op=op)
    indices = dispatch.indices
    if weights.shape != indices.shape:
        raise ValueError(f"{op}: weights must have the shape of dispatch.indices {tuple(indices.shape)}; "
                         f"got {tuple(weights.shape)}")
    check_size(op, "expert_out", expert_out, 0, dispatch.sorted_token_ids.shape[0], "the N*k rows of dispatch")
    if expert_scale is not None:
        SPEC.check_tensor("expert_scale", expert_scale, ndim=1, op=op)
        check_size(op, "expert_scale", expert_scale, 0, dispatch.num_experts, "the number of experts E of dispatch")
    check_same_device(op, expert_out=expert_out, weights=weights, indices=indices, expert_scale=expert_scale)
    return dispatch


def weighted_combine(expert_out: torch.Tensor, weights: torch.Tensor, dispatch: Dispatch,
                     expert_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Un-permute and weighted sum of the expert outputs:
    ``out[t] = sum_j weights[t, j] * expert_scale[e(t, j)] * expert_out[pos(t, j)]``.

    Args:
        expert_out: ``[N*k, D]`` fp32/fp16/bf16 expert outputs in the layout of ``dispatch``.
        weights: ``[N, k]`` float routing weights, the shape of ``dispatch.indices``.
        dispatch: the :class:`~astrea.ops.Dispatch` from :func:`~astrea.ops.moe_dispatch`.
        expert_scale: optional ``[E]`` float per-expert calibration.

    Returns:
        ``[N, D]`` in expert_out's dtype, accumulated in fp32. Slots whose expert is out of
        range (possible only on CUDA, see :func:`~astrea.ops.moe_dispatch`) contribute nothing.
        A slot whose coefficient ``weights[t, j] * expert_scale[e(t, j)]`` is zero is skipped,
        the rule of :func:`~astrea.ops.dense_weighted_combine`: its row is not read and adds
        exactly nothing, even when it holds NaN or Inf (``0 * NaN`` would be NaN).
        Backward gives expert_out, weights and expert_scale gradients, deterministically:
        the expert_scale gradient sums each expert's rows in a fixed order, without atomics.
        As in the dense combine, the weight and scale gradients are those of the smooth sum:
        a zero-weight slot still gets ``s * <grad[t], y[pos(t, j)]>`` (NaN for a NaN row).
    """
    dispatch = check_combine_inputs("weighted_combine", expert_out, weights, dispatch, expert_scale)
    return torch.ops.astrea.weighted_combine(expert_out, weights, dispatch.indices, dispatch.inverse_positions,
                                             dispatch.expert_offsets, expert_scale, SPEC.choose(expert_out.device))


def sparse_combine_residual(expert_out, weights: torch.Tensor, residual: torch.Tensor, draw: ResidualDraw,
                            expert_scale: torch.Tensor | None, dispatch: Dispatch) -> torch.Tensor:
    """:func:`astrea.ops.combine_residual` in the sparse layout (``draw`` already validated)."""
    op = "combine_residual"
    dispatch = check_combine_inputs(op, expert_out, weights, dispatch, expert_scale)
    SPEC.check_tensor("residual", residual, op=op)
    num_tokens, dim = weights.shape[0], expert_out.shape[1]
    if residual.dim() < 2 or residual.shape[-1] != dim or math.prod(residual.shape[:-1]) != num_tokens:
        raise ValueError(f"{op}: residual must be [N, D] = ({num_tokens}, {dim}) or [B, ..., D] whose rows "
                         f"flatten to N = {num_tokens} with D = {dim}; got shape {tuple(residual.shape)}")
    if residual.dtype != expert_out.dtype:
        raise TypeError(f"{op}: residual must have the dtype of expert_out ({expert_out.dtype}); got {residual.dtype}")
    device = check_same_device(op, expert_out=expert_out, residual=residual)
    return torch.ops.astrea.sparse_combine_residual(expert_out, weights, dispatch.indices, dispatch.inverse_positions,
                                                    dispatch.expert_offsets, expert_scale, residual, *draw.as_args(),
                                                    FUSED_SPEC.choose(device))
