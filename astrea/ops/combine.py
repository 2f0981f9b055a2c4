"""The sparse weighted combine of MoE expert outputs (Triton kernels in :mod:`astrea.kernels.combine`;
on CPU tensors the C++ kernels of csrc/cpu/moe.cpp)."""

from __future__ import annotations

import torch

from astrea import _backend, _extension
from astrea._validation import FLOAT_DTYPES, check_same_device, check_size, check_tensor
from astrea.ops.dispatch import Dispatch, check_dispatch
from astrea.reference import combine as reference

_backend.declare_op("weighted_combine", kernel="triton", cpu_extension_op="weighted_combine_cpu")


@torch.library.custom_op("astrea::weighted_combine", mutates_args=())
def _weighted_combine(expert_out: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                      inverse_positions: torch.Tensor, expert_offsets: torch.Tensor,
                      expert_scale: torch.Tensor | None) -> torch.Tensor:
    return weighted_combine_forward(expert_out, weights, indices, inverse_positions, expert_offsets, expert_scale)


def weighted_combine_forward(expert_out: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                             inverse_positions: torch.Tensor, expert_offsets: torch.Tensor,
                             expert_scale: torch.Tensor | None) -> torch.Tensor:
    """Launcher of the combine (also the first step of the sparse combine + residual on CPU)."""
    num_experts = expert_offsets.shape[0] - 1
    impl = _backend.choose("weighted_combine", expert_out.device)
    if impl == "extension":
        return torch.ops.astrea.weighted_combine_cpu(expert_out, weights, indices, inverse_positions, expert_scale,
                                                     num_experts)
    if impl == "reference":
        return reference.weighted_combine(expert_out, weights, indices, inverse_positions, num_experts, expert_scale)
    from astrea.kernels.combine import combine_forward

    return combine_forward(expert_out, inverse_positions, weights, indices, expert_scale, num_experts)


@_weighted_combine.register_fake
def _weighted_combine_fake(expert_out, weights, indices, inverse_positions, expert_offsets, expert_scale):
    return expert_out.new_empty(indices.shape[0], expert_out.shape[1])


@torch.library.custom_op("astrea::weighted_combine_backward", mutates_args=())
def _weighted_combine_backward(grad_out: torch.Tensor, expert_out: torch.Tensor, weights: torch.Tensor,
                               indices: torch.Tensor, inverse_positions: torch.Tensor,
                               expert_offsets: torch.Tensor, expert_scale: torch.Tensor | None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for expert_out, weights and expert_scale (an empty tensor without expert_scale)."""
    num_experts = expert_offsets.shape[0] - 1
    impl = _backend.choose("weighted_combine", expert_out.device)
    if impl == "extension":
        return torch.ops.astrea.weighted_combine_backward_cpu(grad_out, expert_out, weights, indices,
                                                              inverse_positions, expert_scale, num_experts)
    if impl == "reference":
        grads = reference.weighted_combine_backward(grad_out, expert_out, weights, indices, inverse_positions,
                                                    num_experts, expert_scale)
    else:
        from astrea.kernels.combine import combine_backward

        grads = combine_backward(grad_out, expert_out, weights, indices, inverse_positions, expert_offsets,
                                 expert_scale)
    grad_y, grad_weights, grad_scale = grads
    return grad_y, grad_weights, grad_scale if grad_scale is not None else weights.new_empty(0)


@_weighted_combine_backward.register_fake
def _weighted_combine_backward_fake(grad_out, expert_out, weights, indices, inverse_positions, expert_offsets,
                                    expert_scale):
    return (torch.empty_like(expert_out, memory_format=torch.contiguous_format),
            torch.empty_like(weights, memory_format=torch.contiguous_format),
            expert_scale.new_empty(expert_scale.shape) if expert_scale is not None else weights.new_empty(0))


if _extension.has_kernel("weighted_combine_cpu", "CPU"):
    @torch.library.register_fake("astrea::weighted_combine_cpu")
    def _weighted_combine_cpu_fake(expert_out, weights, indices, inverse_positions, expert_scale, num_experts):
        return _weighted_combine_fake(expert_out, weights, indices, inverse_positions, None, expert_scale)

    @torch.library.register_fake("astrea::weighted_combine_backward_cpu")
    def _weighted_combine_backward_cpu_fake(grad_out, expert_out, weights, indices, inverse_positions, expert_scale,
                                            num_experts):
        return _weighted_combine_backward_fake(grad_out, expert_out, weights, indices, inverse_positions, None,
                                               expert_scale)


def save_combine_inputs(ctx, expert_out, weights, indices, inverse_positions, expert_offsets, expert_scale) -> None:
    """Saves what :func:`combine_gradients` needs (shared with the fused combine + residual op)."""
    ctx.has_scale = expert_scale is not None
    ctx.save_for_backward(expert_out, weights, indices, inverse_positions, expert_offsets, expert_scale)


def combine_gradients(ctx, grad_out: torch.Tensor):
    """(d expert_out, d weights, d expert_scale or None) of the combine saved by :func:`save_combine_inputs`."""
    expert_out, weights, indices, inverse_positions, expert_offsets, expert_scale = ctx.saved_tensors
    grad_y, grad_weights, grad_scale = torch.ops.astrea.weighted_combine_backward(
        grad_out, expert_out, weights, indices, inverse_positions, expert_offsets, expert_scale)
    return grad_y, grad_weights, grad_scale if ctx.has_scale else None


def _setup_context(ctx, inputs, output):
    save_combine_inputs(ctx, *inputs)


def _backward(ctx, grad_out):
    grad_y, grad_weights, grad_scale = combine_gradients(ctx, grad_out)
    return grad_y, grad_weights, None, None, None, grad_scale


_weighted_combine.register_autograd(_backward, setup_context=_setup_context)


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
        Backward gives expert_out, weights and expert_scale gradients, deterministically:
        the expert_scale gradient sums each expert's rows in a fixed order, without atomics.
    """
    dispatch = check_combine_inputs("weighted_combine", expert_out, weights, dispatch, expert_scale)
    return torch.ops.astrea.weighted_combine(expert_out, weights, dispatch.indices, dispatch.inverse_positions,
                                             dispatch.expert_offsets, expert_scale)


def check_combine_inputs(op: str, expert_out, weights, dispatch, expert_scale) -> Dispatch:
    """Validates the arguments of the sparse combine (also those of the fused combine + residual)."""
    dispatch = check_dispatch(op, dispatch)
    check_tensor(op, "expert_out", expert_out, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "weights", weights, ndim=2, dtypes=FLOAT_DTYPES)
    indices = dispatch.indices
    if weights.shape != indices.shape:
        raise ValueError(f"{op}: weights must have the shape of dispatch.indices {tuple(indices.shape)}; "
                         f"got {tuple(weights.shape)}")
    check_size(op, "expert_out", expert_out, 0, dispatch.sorted_token_ids.shape[0], "the N*k rows of dispatch")
    if expert_scale is not None:
        check_tensor(op, "expert_scale", expert_scale, ndim=1, dtypes=FLOAT_DTYPES)
        check_size(op, "expert_scale", expert_scale, 0, dispatch.num_experts, "the number of experts E of dispatch")
    check_same_device(op, expert_out=expert_out, weights=weights, indices=indices, expert_scale=expert_scale)
    return dispatch
