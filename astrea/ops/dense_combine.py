"""Dense weighted combine of E expert outputs (Triton kernel; C++ kernel of astrea._C on CPU).

``dense_weighted_combine(expert_out, weights, expert_scale)`` computes
``out[b] = sum_e w[b, e] * s[e] * y_e[b]``. The public function folds ``w * s`` into fp32
coefficients ``c [B, E]`` with plain torch ops, so autograd carries ``d c`` back to the
weights and the scale; the registered op ``astrea::dense_weighted_combine(experts, coef)``
does the memory-bound part. :mod:`astrea.ops.residual` fuses it with the stochastic
residual and shares the backward op defined here.

Expert layout: a list of E tensors is passed to the kernel as E pointers with their own
strides (no stacking copy); a stacked ``[E, B, ..., D]`` tensor is unbound into E views
(its backward stacks the E gradients, one copy). At most :data:`MAX_EXPERTS` experts.
On CPU tensors the auto backend runs ``astrea::dense_combine_cpu`` and
``astrea::dense_combine_backward_cpu``, which read the E tensors in place too.
"""

from __future__ import annotations

from typing import Sequence

import torch

from astrea import _backend
from astrea._validation import FLOAT_DTYPES, check_same_device, check_size, check_tensor
from astrea.reference import dense_combine as reference

# One pointer and three strides per expert travel as kernel parameters; the dense layout
# serves a handful of vision experts (the sparse weighted_combine handles many experts).
MAX_EXPERTS = 32

_backend.declare_op("dense_weighted_combine", kernel="triton", cpu_extension_op="dense_combine_cpu")


def expert_list(op: str, expert_out) -> list[torch.Tensor]:
    """The E expert outputs ``[B, ..., D]`` of a stacked tensor or a list/tuple, validated."""
    if isinstance(expert_out, torch.Tensor):
        check_tensor(op, "expert_out", expert_out, dtypes=FLOAT_DTYPES)
        if expert_out.dim() < 3:
            raise ValueError(f"{op}: a stacked expert_out must be [E, B, ..., D] (at least 3-D); "
                             f"got shape {tuple(expert_out.shape)}")
        experts = list(expert_out.unbind(0))
    elif isinstance(expert_out, (list, tuple)):
        experts = list(expert_out)
        for e, y in enumerate(experts):
            check_tensor(op, f"expert_out[{e}]", y, dtypes=FLOAT_DTYPES)
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
    if not 1 <= len(experts) <= MAX_EXPERTS:
        raise ValueError(f"{op}: expert_out must hold between 1 and {MAX_EXPERTS} experts; got {len(experts)}")
    check_same_device(op, **{f"expert_out[{e}]": y for e, y in enumerate(experts)})
    return experts


def coefficients(op: str, experts: Sequence[torch.Tensor], weights, expert_scale) -> torch.Tensor:
    """Validates ``weights [B, E]`` and ``expert_scale [E]``; returns contiguous fp32 ``w * s``."""
    num_experts = len(experts)
    check_tensor(op, "weights", weights, ndim=2, dtypes=FLOAT_DTYPES)
    check_size(op, "weights", weights, 0, experts[0].shape[0], "the batch size B of the expert outputs")
    check_size(op, "weights", weights, 1, num_experts, "the number of experts E")
    if expert_scale is not None:
        check_tensor(op, "expert_scale", expert_scale, ndim=1, dtypes=FLOAT_DTYPES)
        check_size(op, "expert_scale", expert_scale, 0, num_experts, "the number of experts E")
    check_same_device(op, expert_out=experts[0], weights=weights, expert_scale=expert_scale)
    return reference.combine_coefficients(weights, expert_scale).contiguous()


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
    return torch.ops.astrea.dense_weighted_combine(experts, coef)


def _as_btd(x: torch.Tensor) -> torch.Tensor:
    """``[B, ..., D]`` viewed as ``[B, T, D]`` (a copy only when the strides do not allow a view)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def residual_draw(p: float, seed: int, offset: int, granularity: str, training: bool) -> dict:
    """Kernel arguments of the stochastic residual (``stochastic=False``: plain ``y + r``)."""
    return {"seed": seed, "offset": offset, "keep_p": p, "inv_p": 1.0 / p, "stochastic": training and p < 1.0,
            "sample_units": granularity == "sample"}


def _unfused_combine(experts: list[torch.Tensor], coef: torch.Tensor) -> torch.Tensor:
    """The combine alone off the Triton kernel: the C++ CPU kernel where there is one, else the reference."""
    if _backend.choose("dense_weighted_combine", experts[0].device) == "extension":
        return torch.ops.astrea.dense_combine_cpu(experts, coef)
    return reference.dense_weighted_combine(experts, coef)


def _unfused_combine_backward(grad: torch.Tensor, experts: list[torch.Tensor], coef: torch.Tensor,
                              expert_grad: bool, coef_grad: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(d experts or [], d coef or None) of the combine alone off the Triton kernel."""
    if _backend.choose("dense_weighted_combine", grad.device) == "extension":
        grad_experts, grad_coef = torch.ops.astrea.dense_combine_backward_cpu(grad, experts, coef, expert_grad,
                                                                              coef_grad)
        return grad_experts, grad_coef if coef_grad else None
    grad_experts, grad_coef = reference.dense_weighted_combine_backward(grad, experts, coef)
    return grad_experts if expert_grad else [], grad_coef if coef_grad else None


def dense_combine_forward(experts: list[torch.Tensor], coef: torch.Tensor, residual: torch.Tensor | None = None,
                          p: float = 1.0, seed: int = 0, offset: int = 0, granularity: str = "token",
                          training: bool = True) -> torch.Tensor:
    """Launcher of the combine, with the stochastic residual fused when ``residual`` is given."""
    op = "dense_weighted_combine" if residual is None else "combine_residual"
    if _backend.choose(op, experts[0].device) != "triton":
        combined = _unfused_combine(experts, coef)
        if residual is None:
            return combined
        from astrea.ops.residual import stochastic_residual_forward  # (astrea.ops.residual imports this module)

        # The two ops in sequence: the residual's C++ CPU kernel where there is one.
        return stochastic_residual_forward(combined, residual, p, seed, offset, granularity, training)
    out = torch.empty(experts[0].shape, dtype=experts[0].dtype, device=experts[0].device)
    if out.numel() == 0:
        return out
    from astrea.kernels.dense_combine import launch_dense_combine

    launch_dense_combine(_as_btd(out), [_as_btd(y) for y in experts], coef,
                         residual=None if residual is None else _as_btd(residual),
                         **residual_draw(p, seed, offset, granularity, training))
    return out


def dense_combine_backward_impl(grad: torch.Tensor, experts: list[torch.Tensor], coef: torch.Tensor,
                                expert_grad: bool, coef_grad: bool, residual_grad: bool, p: float, seed: int,
                                offset: int, granularity: str, training: bool
                                ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(d experts or [], d coef [B, E] fp32 or empty, d residual or empty) of the (fused) combine."""
    op = "combine_residual" if residual_grad else "dense_weighted_combine"
    # Outputs not asked for are distinct empty tensors (custom op outputs must not alias).
    no_coef_grad, no_residual_grad = grad.new_empty(0, dtype=torch.float32), grad.new_empty(0)
    if _backend.choose(op, grad.device) != "triton":
        grad_experts, grad_coef = _unfused_combine_backward(grad, experts, coef, expert_grad, coef_grad)
        grad_residual = no_residual_grad
        if residual_grad:
            from astrea.ops.residual import stochastic_residual_forward

            grad_residual = stochastic_residual_forward(None, grad, p, seed, offset, granularity, training)
        return grad_experts, no_coef_grad if grad_coef is None else grad_coef, grad_residual
    from astrea.kernels.dense_combine import launch_dense_combine_backward, num_partials

    grad = grad.contiguous()
    B, T, D = _as_btd(grad).shape
    grad_experts = [torch.empty_like(grad, dtype=y.dtype) for y in experts] if expert_grad else []
    partials = grad.new_empty((B, len(experts), num_partials(T, D)), dtype=torch.float32) if coef_grad else None
    grad_residual = torch.empty_like(grad) if residual_grad else no_residual_grad
    if grad.numel():
        launch_dense_combine_backward(
            _as_btd(grad), [_as_btd(y) for y in experts], coef,
            grad_experts=[_as_btd(g) for g in grad_experts] if expert_grad else None,
            partials=partials, grad_residual=_as_btd(grad_residual) if residual_grad else None,
            **residual_draw(p, seed, offset, granularity, training))
    if not coef_grad:
        grad_coef = no_coef_grad
    elif grad.numel():
        grad_coef = partials.sum(-1)
    else:
        grad_coef = coef.new_zeros(coef.shape)
    return grad_experts, grad_coef, grad_residual


# ---- registration ---------------------------------------------------------------------------


@torch.library.custom_op("astrea::dense_weighted_combine", mutates_args=())
def _dense_weighted_combine_op(experts: list[torch.Tensor], coef: torch.Tensor) -> torch.Tensor:
    return dense_combine_forward(experts, coef)


@_dense_weighted_combine_op.register_fake
def _(experts, coef):
    return experts[0].new_empty(experts[0].shape)


@torch.library.custom_op("astrea::dense_combine_backward", mutates_args=())
def _dense_combine_backward_op(grad: torch.Tensor, experts: list[torch.Tensor], coef: torch.Tensor,
                               expert_grad: bool, coef_grad: bool, residual_grad: bool, p: float, seed: int,
                               offset: int, granularity: str, training: bool
                               ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    return dense_combine_backward_impl(grad, experts, coef, expert_grad, coef_grad, residual_grad, p, seed,
                                       offset, granularity, training)


@_dense_combine_backward_op.register_fake
def _(grad, experts, coef, expert_grad, coef_grad, residual_grad, p, seed, offset, granularity, training):
    grad_experts = [grad.new_empty(grad.shape, dtype=y.dtype) for y in experts] if expert_grad else []
    grad_coef = coef.new_empty(coef.shape) if coef_grad else grad.new_empty(0, dtype=torch.float32)
    grad_residual = grad.new_empty(grad.shape) if residual_grad else grad.new_empty(0)
    return grad_experts, grad_coef, grad_residual


def combine_backward(ctx, grad: torch.Tensor, residual_grad: bool, p: float = 1.0, seed: int = 0, offset: int = 0,
                     granularity: str = "token", training: bool = True):
    """(d experts (a list, of Nones when not needed), d coef or None, d residual or None) for an autograd backward."""
    *experts, coef = ctx.saved_tensors
    expert_grad = any(ctx.needs_input_grad[0])  # one flag per expert of the list input
    coef_grad = ctx.needs_input_grad[1]
    grad_experts, grad_coef, grad_residual = torch.ops.astrea.dense_combine_backward(
        grad, experts, coef, expert_grad, coef_grad, residual_grad, p, seed, offset, granularity, training)
    return (grad_experts if expert_grad else [None] * len(experts), grad_coef if coef_grad else None,
            grad_residual if residual_grad else None)


def _setup_context(ctx, inputs, output):
    experts, coef = inputs
    ctx.save_for_backward(*experts, coef)


def _backward(ctx, grad):
    grad_experts, grad_coef, _ = combine_backward(ctx, grad, residual_grad=False)
    return grad_experts, grad_coef


_dense_weighted_combine_op.register_autograd(_backward, setup_context=_setup_context)
