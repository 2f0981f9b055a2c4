"""References of the sparse weighted combine of MoE expert outputs (fp32 accumulation, or
the inputs' float64)."""

from __future__ import annotations

import torch

from astrea._validation import accumulation_dtype
from astrea.reference.residual import stochastic_residual


def _coefficients(weights, indices, expert_scale, num_experts, dtype):
    """``w[t, j] * s[e(t, j)]``, zero where the expert is out of range."""
    valid = (indices >= 0) & (indices < num_experts)
    coefficient = torch.where(valid, weights.to(dtype), 0)
    if expert_scale is not None:
        coefficient = coefficient * expert_scale.to(dtype)[indices.long().clamp(0, num_experts - 1)]
    return coefficient, valid


def weighted_combine(expert_out: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                     inverse_positions: torch.Tensor, num_experts: int,
                     expert_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * s[e(t, j)] * y[pos(t, j)]``; out-of-range experts and slots whose
    coefficient ``w * s`` is zero contribute exactly nothing (even a NaN/Inf row)."""
    dtype = accumulation_dtype(expert_out, weights, expert_scale)
    num_tokens, top_k = indices.shape
    coefficient, valid = _coefficients(weights, indices, expert_scale, num_experts, dtype)
    rows = expert_out.index_select(0, inverse_positions.reshape(-1).long()).view(num_tokens, top_k, -1).to(dtype)
    rows = torch.where((valid & (coefficient != 0))[..., None], rows, 0)
    return (coefficient[..., None] * rows).sum(1).to(expert_out.dtype)


def weighted_combine_backward(grad_out: torch.Tensor, expert_out: torch.Tensor, weights: torch.Tensor,
                              indices: torch.Tensor, inverse_positions: torch.Tensor, num_experts: int,
                              expert_scale: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`weighted_combine` for ``expert_out``, ``weights`` and ``expert_scale``."""
    dtype = accumulation_dtype(grad_out, expert_out, weights, expert_scale)
    num_tokens, top_k = indices.shape
    positions = inverse_positions.reshape(-1).long()
    coefficient, valid = _coefficients(weights, indices, expert_scale, num_experts, dtype)
    grad = grad_out.to(dtype)
    grad_y = torch.empty(expert_out.shape, dtype=dtype, device=expert_out.device)
    grad_y[positions] = (coefficient[..., None] * grad[:, None, :]).reshape(num_tokens * top_k, -1)
    rows = expert_out.index_select(0, positions).view(num_tokens, top_k, -1).to(dtype)
    dots = torch.where(valid, (rows * grad[:, None, :]).sum(-1), 0)
    if expert_scale is None:
        return grad_y.to(expert_out.dtype), dots.to(weights.dtype), None
    expert = indices.long().clamp(0, num_experts - 1)
    grad_weights = dots * expert_scale.to(dtype)[expert]
    grad_scale = torch.zeros(num_experts, dtype=dtype, device=expert_scale.device)
    grad_scale.index_add_(0, expert[valid], (weights.to(dtype) * dots)[valid])
    return grad_y.to(expert_out.dtype), grad_weights.to(weights.dtype), grad_scale.to(expert_scale.dtype)


def sparse_combine_residual(expert_out: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                            inverse_positions: torch.Tensor, num_experts: int, residual: torch.Tensor, p: float, *,
                            seed: int, offset: int = 0, granularity: str = "token", training: bool = True,
                            expert_scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`weighted_combine` viewed as ``residual`` (``[B, ..., D]`` whose rows flatten to N),
    then the stochastic residual with ``residual`` as the dropped branch."""
    combined = weighted_combine(expert_out, weights, indices, inverse_positions, num_experts, expert_scale)
    return stochastic_residual(combined.view(residual.shape), residual, p, seed=seed, offset=offset,
                               granularity=granularity, training=training)
