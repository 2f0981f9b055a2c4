"""Dense weighted combine of E expert outputs, alone and fused with the stochastic residual
(Triton kernels :mod:`astrea.kernels.dense_combine`; on CPU tensors the C++ kernels of
csrc/cpu/dense_combine.cpp and csrc/cpu/residual.cpp, else the references).

``out[b] = sum_e w[b, e] * s[e] * y_e[b]``. The public functions fold ``w * s`` into fp32
coefficients ``c [B, E]`` with plain torch ops, so autograd carries ``d c`` back to the
weights and the scale; the registered ops ``astrea::dense_weighted_combine(experts, coef)``
and ``astrea::combine_residual(experts, coef, residual, draw...)`` do the memory-bound part
and share one backward op. Off the Triton kernel the fused op runs the combine, then the
residual, on the implementation its forward chose: the fused kernel equals the two in
sequence bit for bit.

Expert layout: a list of E tensors is passed to the kernel as E pointers with their own
strides (no stacking copy); a stacked ``[E, B, ..., D]`` tensor is unbound into E views
(its backward stacks the E gradients, one copy). The C++ kernels read the E tensors in
place too.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from astrea import _backend, _extension
from astrea._residual_draw import ResidualDraw
from astrea._validation import check_same_device, check_size
from astrea.ops.residual import check_like, residual_forward
from astrea.reference import dense_combine as reference

SPEC = _backend.declare_op(
    "dense_weighted_combine", kernel="triton", cpu_kernel="dense_combine_cpu",
    # One pointer and three strides per expert travel as kernel parameters: the dense layout
    # serves a handful of vision experts (the sparse weighted_combine handles many experts).
    limits={"num_experts": 32},
    supports={"triton": "experts of any strides, zero-coefficient experts skipped",
              "extension": "experts of any strides, float64 too, zero-coefficient experts skipped"})
# The fused form; its CPU path is the combine's C++ kernel, then the residual's (one _C build has both).
FUSED_SPEC = _backend.declare_op(
    "combine_residual", kernel="triton", cpu_kernel="stochastic_residual_cpu",
    limits=SPEC.limits,
    supports={"triton": "one kernel, one pass (dense and sparse layouts)",
              "extension": "the C++ combine, then the C++ residual: bit-identical to the fused kernel"})


def expert_list(op: str, expert_out) -> list[torch.Tensor]:
    """The E expert outputs ``[B, ..., D]`` of a stacked tensor or a list/tuple, validated."""
    if isinstance(expert_out, torch.Tensor):
        SPEC.check_tensor("expert_out", expert_out, op=op)
        if expert_out.dim() < 3:
            raise ValueError(f"{op}: a stacked expert_out must be [E, B, ..., D] (at least 3-D); "
                             f"got shape {tuple(expert_out.shape)}")
        experts = list(expert_out.unbind(0))
    elif isinstance(expert_out, (list, tuple)):
        experts = list(expert_out)
        for e, y in enumerate(experts):
            SPEC.check_tensor(f"expert_out[{e}]", y, op=op)
            if y.dim() < 2:
                raise ValueError(f"{op}: expert_out[{e}] must be [B, ..., D] (at least 2-D); "
                                 f"got shape {tuple(y.shape)}")
            if y.shape != experts[0].shape or y.dtype != experts[0].dtype:
                raise ValueError(f"{op}: every expert output must match expert_out[0] "
                                 f"({tuple(experts[0].shape)}, {experts[0].dtype}); expert_out[{e}] is "
                                 f"({tuple(y.shape)}, {y.dtype})")
    else:
        raise TypeError(f"{op}: expert_out must be a tensor [E, B, ..., D] or a list/tuple of E tensors "
                        f"[B, ..., D]; got {type(expert_out).__name__}")
    most = SPEC.limit("num_experts")
    if not 1 <= len(experts) <= most:
        raise ValueError(f"{op}: expert_out must hold between 1 and {most} experts; got {len(experts)}")
    check_same_device(op, **{f"expert_out[{e}]": y for e, y in enumerate(experts)})
    return experts


def coefficients(op: str, experts: Sequence[torch.Tensor], weights, expert_scale) -> torch.Tensor:
    """Validates ``weights [B, E]`` and ``expert_scale [E]``; returns contiguous fp32 ``w * s``."""
    num_experts = len(experts)
    SPEC.check_tensor("weights", weights, ndim=2, op=op)
    check_size(op, "weights", weights, 0, experts[0].shape[0], "the batch size B of the expert outputs")
    check_size(op, "weights", weights, 1, num_experts, "the number of experts E")
    if expert_scale is not None:
        SPEC.check_tensor("expert_scale", expert_scale, ndim=1, op=op)
        check_size(op, "expert_scale", expert_scale, 0, num_experts, "the number of experts E")
    check_same_device(op, expert_out=experts[0], weights=weights, expert_scale=expert_scale)
    coef = weights.float()
    if expert_scale is not None:
        coef = coef * expert_scale.float()
    return coef.contiguous()


def _as_btd(x: torch.Tensor) -> torch.Tensor:
    """``[B, ..., D]`` viewed as ``[B, T, D]`` (a copy only when the strides do not allow a view)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


# ---- implementations ----------------------------------------------------------------------


def _triton_forward(experts: list[torch.Tensor], coef: torch.Tensor, residual: torch.Tensor | None,
                    draw: ResidualDraw) -> torch.Tensor:
    from astrea.kernels.dense_combine import launch_dense_combine

    out = torch.empty(experts[0].shape, dtype=experts[0].dtype, device=experts[0].device)
    if out.numel():
        launch_dense_combine(_as_btd(out), [_as_btd(y) for y in experts], coef,
                             residual=None if residual is None else _as_btd(residual),
                             sample_units=draw.granularity == "sample", **draw.kernel_args())
    return out


def _triton_backward(grad: torch.Tensor, experts: list[torch.Tensor], coef: torch.Tensor, expert_grad: bool,
                     coef_grad: bool, residual_grad: bool, draw: ResidualDraw):
    from astrea.kernels.dense_combine import launch_dense_combine_backward, num_partials

    grad = grad.contiguous()
    B, T, D = _as_btd(grad).shape
    grad_experts = [torch.empty_like(grad, dtype=y.dtype) for y in experts] if expert_grad else []
    partials = grad.new_empty((B, len(experts), num_partials(T, D)), dtype=torch.float32) if coef_grad else None
    grad_residual = torch.empty_like(grad) if residual_grad else None
    if grad.numel():
        launch_dense_combine_backward(
            _as_btd(grad), [_as_btd(y) for y in experts], coef,
            grad_experts=[_as_btd(g) for g in grad_experts] if expert_grad else None,
            partials=partials, grad_residual=_as_btd(grad_residual) if residual_grad else None,
            sample_units=draw.granularity == "sample", **draw.kernel_args())
    grad_coef = None
    if coef_grad:
        grad_coef = partials.sum(-1) if grad.numel() else coef.new_zeros(coef.shape)
    return grad_experts, grad_coef, grad_residual


def _reference_combine_backward(grad, experts, coef, expert_grad, coef_grad):
    grad_experts, grad_coef = reference.dense_weighted_combine_backward(grad, experts, coef)
    return grad_experts if expert_grad else [], grad_coef


# The combine alone, off the Triton kernel (which fuses the residual itself).
_COMBINE = _backend.Implementations("dense_combine_unfused", triton=None, extension="dense_combine_cpu",
                                    reference=lambda experts, coef: reference.dense_weighted_combine(experts, coef))
_COMBINE_BACKWARD = _backend.Implementations("dense_combine_backward_unfused", triton=None,
                                             extension="dense_combine_backward_cpu",
                                             reference=_reference_combine_backward)


def _in_sequence(impl: str, experts, coef, residual, draw):
    """The combine, then (with ``residual``) the stochastic residual, each on ``impl``."""
    combined = _COMBINE(impl, experts, coef)
    return combined if residual is None else residual_forward(impl, combined, residual, draw)


def _in_sequence_backward(impl: str, grad, experts, coef, expert_grad, coef_grad, residual_grad, draw):
    grad_experts, grad_coef = _COMBINE_BACKWARD(impl, grad, experts, coef, expert_grad, coef_grad)
    grad_residual = residual_forward(impl, None, grad, draw) if residual_grad else None
    return grad_experts, grad_coef if coef_grad else None, grad_residual


# (experts, coef, residual or None, draw) -> the combine, with the stochastic residual when given.
_FORWARD = _backend.Implementations("dense_weighted_combine", triton=_triton_forward,
                                    extension=functools.partial(_in_sequence, "extension"),
                                    reference=functools.partial(_in_sequence, "reference"))
# (grad, experts, coef, expert_grad, coef_grad, residual_grad, draw) ->
# (d experts or [], d coef [B, E] or None, d residual or None).
_BACKWARD = _backend.Implementations("dense_combine_backward", triton=_triton_backward,
                                     extension=functools.partial(_in_sequence_backward, "extension"),
                                     reference=functools.partial(_in_sequence_backward, "reference"))


# ---- registration -------------------------------------------------------------------------


@torch.library.custom_op("astrea::dense_weighted_combine", mutates_args=())
def _dense_weighted_combine_op(experts: list[torch.Tensor], coef: torch.Tensor, impl: str) -> torch.Tensor:
    return _FORWARD(impl, experts, coef, None, ResidualDraw())


def _combined_fake(experts, *_):
    return experts[0].new_empty(experts[0].shape)


_dense_weighted_combine_op.register_fake(_combined_fake)
_extension.register_fake("dense_combine_cpu", _combined_fake)


@torch.library.custom_op("astrea::combine_residual", mutates_args=())
def _combine_residual_op(experts: list[torch.Tensor], coef: torch.Tensor, residual: torch.Tensor, p: float, seed: int,
                         offset: int, granularity: str, training: bool, impl: str) -> torch.Tensor:
    return _FORWARD(impl, experts, coef, residual, ResidualDraw(p, seed, offset, granularity, training))


_combine_residual_op.register_fake(_combined_fake)


@torch.library.custom_op("astrea::dense_combine_backward", mutates_args=())
def _dense_combine_backward_op(grad: torch.Tensor, experts: list[torch.Tensor], coef: torch.Tensor,
                               expert_grad: bool, coef_grad: bool, residual_grad: bool, p: float, seed: int,
                               offset: int, granularity: str, training: bool, impl: str
                               ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(d experts or [], d coef [B, E] fp32 or empty, d residual or empty) of either forward op."""
    grad_experts, grad_coef, grad_residual = _BACKWARD(
        impl, grad, experts, coef, expert_grad, coef_grad, residual_grad,
        ResidualDraw(p, seed, offset, granularity, training))
    # Outputs not asked for are distinct empty tensors (custom op outputs must not alias).
    return (grad_experts, grad.new_empty(0, dtype=torch.float32) if grad_coef is None else grad_coef,
            grad.new_empty(0) if grad_residual is None else grad_residual)


def _combine_gradients_fake(grad, experts, coef, expert_grad, coef_grad):
    grad_experts = [grad.new_empty(grad.shape, dtype=y.dtype) for y in experts] if expert_grad else []
    return grad_experts, coef.new_empty(coef.shape) if coef_grad else grad.new_empty(0, dtype=torch.float32)


@_dense_combine_backward_op.register_fake
def _(grad, experts, coef, expert_grad, coef_grad, residual_grad, p, seed, offset, granularity, training, impl):
    grad_residual = grad.new_empty(grad.shape) if residual_grad else grad.new_empty(0)
    return (*_combine_gradients_fake(grad, experts, coef, expert_grad, coef_grad), grad_residual)


_extension.register_fake("dense_combine_backward_cpu", _combine_gradients_fake)


def _setup_context(ctx, inputs, output):
    """Both forward ops: ``(experts, coef, [residual, p, seed, offset, granularity, training,] impl)``."""
    experts, coef, *rest, ctx.impl = inputs
    ctx.save_for_backward(*experts, coef)
    ctx.fused = bool(rest)
    ctx.draw = ResidualDraw(*rest[1:]) if rest else ResidualDraw()


def _backward(ctx, grad):
    *experts, coef = ctx.saved_tensors
    expert_grad = any(ctx.needs_input_grad[0])  # one flag per expert of the list input
    coef_grad = ctx.needs_input_grad[1]
    residual_grad = ctx.fused and ctx.needs_input_grad[2]
    grad_experts, grad_coef, grad_residual = torch.ops.astrea.dense_combine_backward(
        grad, experts, coef, expert_grad, coef_grad, residual_grad, *ctx.draw.as_args(), ctx.impl)
    grads = (grad_experts if expert_grad else [None] * len(experts), grad_coef if coef_grad else None)
    if not ctx.fused:
        return (*grads, None)
    return (*grads, grad_residual if residual_grad else None, None, None, None, None, None, None)


_dense_weighted_combine_op.register_autograd(_backward, setup_context=_setup_context)
_combine_residual_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public functions ---------------------------------------------------------------------


def dense_weighted_combine(expert_out, weights: torch.Tensor, expert_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weighted sum of E expert outputs: ``out[b] = sum_e w[b, e] * s[e] * y_e[b]``.

    Args:
        expert_out: stacked ``[E, B, ..., D]`` or a list/tuple of E tensors ``[B, ..., D]``
            (same shape and dtype, fp32/fp16/bf16, any strides; 1 <= E <= 32).
        weights: ``[B, E]`` routing weights (any float dtype). An expert whose ``w * s`` is
            zero for a sample is skipped: its rows are not read and add exactly nothing.
        expert_scale: optional ``[E]`` per-expert calibration (``AdaptiveWeightAllocator.scale``).

    Returns:
        ``[B, ..., D]`` in the experts' dtype, accumulated in fp32 in expert order.
        Differentiable in the expert outputs, weights and scale (deterministic, no atomics).
        The weight gradient is that of the smooth sum: a zero weight still gets
        ``sum grad[b] * s[e] * y_e[b]``, so backward reads every expert when ``weights`` or
        ``expert_scale`` needs a gradient (and none of them when only the experts do).
    """
    op = "dense_weighted_combine"
    experts = expert_list(op, expert_out)
    coef = coefficients(op, experts, weights, expert_scale)
    return torch.ops.astrea.dense_weighted_combine(experts, coef, SPEC.choose(experts[0].device))


def dense_combine_residual(expert_out, weights: torch.Tensor, residual: torch.Tensor, draw: ResidualDraw,
                           expert_scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`astrea.ops.combine_residual` in the dense layout (``draw`` already validated)."""
    op = "combine_residual"
    experts = expert_list(op, expert_out)
    coef = coefficients(op, experts, weights, expert_scale)
    check_like(op, "residual", residual, "an expert output", experts[0])
    device = check_same_device(op, expert_out=experts[0], residual=residual)
    return torch.ops.astrea.combine_residual(experts, coef, residual, *draw.as_args(), FUSED_SPEC.choose(device))
