"""Reference of the dense weighted combine of E expert outputs ``[B, ..., D]``."""

from __future__ import annotations

from typing import Sequence

import torch

from astrea.reference.residual import compute_dtype, stochastic_residual


def combine_coefficients(weights: torch.Tensor, expert_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``c[b, e] = w[b, e] * s[e]``, in fp32 (float64 stays float64)."""
    math = compute_dtype(weights.dtype)
    coef = weights.to(math)
    if expert_scale is not None:
        coef = coef * expert_scale.to(math)
    return coef


def _per_sample(column: torch.Tensor, ndim: int) -> torch.Tensor:
    return column.reshape(-1, *([1] * (ndim - 1)))


def dense_weighted_combine(expert_out: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor,
                           expert_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``out[b] = sum_e w[b, e] * s[e] * y_e[b]``, summed in expert order in fp32, rounded to
    the experts' dtype. ``expert_out``: stacked ``[E, B, ..., D]`` or E tensors ``[B, ..., D]``.
    An expert with a zero coefficient for a sample adds exactly nothing (even non-finite values)."""
    experts = list(expert_out)
    coef = combine_coefficients(weights, expert_scale)
    math = compute_dtype(experts[0].dtype)
    acc = torch.zeros(experts[0].shape, dtype=math, device=experts[0].device)
    for e, y in enumerate(experts):
        c = _per_sample(coef[:, e].to(math), y.dim())
        acc = acc + torch.where(c != 0, c * y.to(math), torch.zeros((), dtype=math, device=y.device))
    return acc.to(experts[0].dtype)


def dense_weighted_combine_backward(grad: torch.Tensor, expert_out: torch.Tensor | Sequence[torch.Tensor],
                                    coef: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradients of the combine with respect to each expert output (``c[b, e] * grad[b]``, in the
    experts' dtype) and to the coefficients ``c`` (``sum grad[b] * y_e[b]``, in fp32 or float64).
    The chain rule to ``w`` and ``s`` is ``d w = d c * s`` and ``d s = sum_b d c * w``."""
    experts = list(expert_out)
    math = compute_dtype(experts[0].dtype)
    grad_wide = grad.to(math)
    grad_experts = [(_per_sample(coef[:, e].to(math), y.dim()) * grad_wide).to(y.dtype) for e, y in enumerate(experts)]
    reduce_dims = tuple(range(1, grad.dim()))
    grad_coef = torch.stack([(grad_wide * y.to(math)).sum(reduce_dims) for y in experts], dim=1)
    return grad_experts, grad_coef


def combine_residual(expert_out: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor,
                     residual: torch.Tensor, p: float, *, seed: int, offset: int = 0, granularity: str = "token",
                     training: bool = True, expert_scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dense_weighted_combine`, then the stochastic residual with ``residual`` as the dropped branch."""
    combined = dense_weighted_combine(expert_out, weights, expert_scale)
    return stochastic_residual(combined, residual, p, seed=seed, offset=offset, granularity=granularity,
                               training=training)
