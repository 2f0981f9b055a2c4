"""Stochastic residual (Triton kernel :mod:`astrea.kernels.residual`; on CPU tensors the C++
kernel of csrc/cpu/residual.cpp, else the reference).

Training: ``y + m * r / p`` with the mask ``m`` of a :class:`~astrea._residual_draw.ResidualDraw`
(Philox keyed by ``(seed, offset + unit)``, never stored; the backward regenerates it).
Eval, or ``p == 1``: exactly ``y + r``. The fused forms with the weighted combine are
:func:`astrea.ops.combine_residual`; off their fused kernels they run :func:`residual_forward`
after the combine.
"""

from __future__ import annotations

import torch

from astrea import _backend, _extension
from astrea._residual_draw import GRANULARITIES, ResidualDraw
from astrea._validation import check_same_device
from astrea.reference import residual as reference

SPEC = _backend.declare_op(
    "stochastic_residual", kernel="triton", cpu_kernel="stochastic_residual_cpu",
    supports={"triton": "any shape and strides", "extension": "any shape and strides, float64 too"})

__all__ = ["GRANULARITIES", "check_like", "residual_forward", "stochastic_residual"]


def _triton_residual(base: torch.Tensor | None, branch: torch.Tensor, p: float, seed: int, offset: int,
                     granularity: str, training: bool) -> torch.Tensor:
    from astrea.kernels.residual import launch_stochastic_residual

    out = torch.empty(branch.shape, dtype=branch.dtype, device=branch.device)
    if out.numel() == 0:
        return out
    draw = ResidualDraw(p, seed, offset, granularity, training)
    dim = branch.shape[-1]
    launch_stochastic_residual(out.view(-1, dim), None if base is None else base.reshape(-1, dim),
                               branch.reshape(-1, dim), rows_per_unit=draw.units(branch.shape)[1],
                               **draw.kernel_args())
    return out


def _reference_residual(base: torch.Tensor | None, branch: torch.Tensor, p: float, seed: int, offset: int,
                        granularity: str, training: bool) -> torch.Tensor:
    draw = {"seed": seed, "offset": offset, "granularity": granularity, "training": training}
    if base is None:
        return reference.stochastic_residual_backward(branch, p, **draw).to(branch.dtype, copy=True)
    return reference.stochastic_residual(base, branch, p, **draw)


# ``base + m * branch / p``; with ``base=None``, ``m * branch / p`` (the backward of ``r``).
_RESIDUAL = _backend.Implementations("stochastic_residual", triton=_triton_residual, reference=_reference_residual,
                                     extension="stochastic_residual_cpu")


def residual_forward(impl: str, base: torch.Tensor | None, branch: torch.Tensor, draw: ResidualDraw) -> torch.Tensor:
    """``base + m * branch / p`` (or ``m * branch / p`` without a base) on implementation ``impl``."""
    return _RESIDUAL(impl, base, branch, *draw.as_args())


def check_like(op: str, name: str, value, like_name: str, like: torch.Tensor) -> None:
    """``value`` is a floating tensor of ``like``'s shape and dtype."""
    SPEC.check_tensor(name, value, op=op)
    if value.shape != like.shape:
        raise ValueError(f"{op}: {name} must have the shape of {like_name} {tuple(like.shape)}; "
                         f"got {tuple(value.shape)}")
    if value.dtype != like.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of {like_name} ({like.dtype}); got {value.dtype}")


@torch.library.custom_op("astrea::stochastic_residual", mutates_args=())
def _stochastic_residual_op(y: torch.Tensor, r: torch.Tensor, p: float, seed: int, offset: int, granularity: str,
                            training: bool, impl: str) -> torch.Tensor:
    return _RESIDUAL(impl, y, r, p, seed, offset, granularity, training)


@_stochastic_residual_op.register_fake
def _(y, r, p, seed, offset, granularity, training, impl):
    return y.new_empty(y.shape)


_extension.register_fake("stochastic_residual_cpu",
                         lambda base, branch, p, seed, offset, granularity, training: branch.new_empty(branch.shape))


@torch.library.custom_op("astrea::stochastic_residual_backward", mutates_args=())
def _stochastic_residual_backward_op(grad: torch.Tensor, p: float, seed: int, offset: int, granularity: str,
                                     training: bool, impl: str) -> torch.Tensor:
    return _RESIDUAL(impl, None, grad, p, seed, offset, granularity, training)


@_stochastic_residual_backward_op.register_fake
def _(grad, p, seed, offset, granularity, training, impl):
    return grad.new_empty(grad.shape)


def branch_gradient(grad: torch.Tensor, draw: ResidualDraw, impl: str) -> torch.Tensor:
    """``m * grad / p`` with the mask regenerated from ``draw`` on ``impl``; ``grad`` itself without a draw."""
    if draw.stochastic:
        return torch.ops.astrea.stochastic_residual_backward(grad, *draw.as_args(), impl)
    return grad


def _setup_context(ctx, inputs, output):
    *draw, ctx.impl = inputs[2:]
    ctx.draw = ResidualDraw(*draw)


def _backward(ctx, grad):
    grad_r = branch_gradient(grad, ctx.draw, ctx.impl) if ctx.needs_input_grad[1] else None
    return grad, grad_r, None, None, None, None, None, None


_stochastic_residual_op.register_autograd(_backward, setup_context=_setup_context)


def stochastic_residual(y: torch.Tensor, r: torch.Tensor, p: float, *, seed: int, offset: int = 0,
                        granularity: str = "token", training: bool = True) -> torch.Tensor:
    """``y + m * r / p`` in training (``m ~ Bernoulli(p)`` per token row or per sample), ``y + r`` in eval.

    Args:
        y: ``[B, ..., D]`` base (the identity path), fp32/fp16/bf16, any strides.
        r: the residual branch, same shape and dtype as ``y``; dropped where ``m = 0``.
        p: keep probability in (0, 1]; ``p = 1`` gives exactly ``y + r``.
        seed, offset: non-negative ints keying the Philox draw of unit ``i`` as
            ``(seed, offset + i)``; :func:`astrea.reference.residual.keep_mask` gives the same mask.
        granularity: ``"token"`` (one draw per ``[..., D]`` row) or ``"sample"`` (per index of dim 0).
        training: False gives ``y + r``.

    Returns:
        ``[B, ..., D]`` in ``y``'s dtype (fp32 math). Backward: ``d y = grad``, ``d r = m * grad / p``,
        the mask regenerated from ``(seed, offset)``.
    """
    op = "stochastic_residual"
    SPEC.check_tensor("y", y)
    if y.dim() < 2:
        raise ValueError(f"{op}: y must be [B, ..., D] (at least 2-D); got shape {tuple(y.shape)}")
    check_like(op, "r", r, "y", y)
    device = check_same_device(op, y=y, r=r)
    draw = ResidualDraw.checked(op, p, seed, offset, granularity, training)
    return torch.ops.astrea.stochastic_residual(y, r, *draw.as_args(), SPEC.choose(device))
