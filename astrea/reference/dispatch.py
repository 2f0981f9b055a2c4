"""References of the MoE token dispatch: the stable sort of routing slots by expert and the
permute into that order."""

from __future__ import annotations

import torch


def moe_dispatch(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sorted_token_ids[N*k]`` (int32), ``expert_offsets[E+1]`` (int64), ``inverse_positions[N, k]`` (int32).

    Slots ``r = t * k + j`` are stably sorted by expert (tokens ascend inside an expert).
    Out-of-range experts sort into a last bucket after ``expert_offsets[E]``, as in the kernel.
    """
    num_tokens, top_k = indices.shape
    flat = indices.reshape(-1).long()
    bucket = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = torch.argsort(bucket, stable=True)
    counts = torch.bincount(bucket, minlength=num_experts + 1)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=indices.device)
    offsets[1:] = counts[:num_experts].cumsum(0)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=indices.device)
    return (order // top_k).int(), offsets, inverse.view(num_tokens, top_k).int()


def permute(x: torch.Tensor, sorted_token_ids: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` in expert order: ``out[p] = x[sorted_token_ids[p]]``."""
    return x.index_select(0, sorted_token_ids.long())


def permute_backward(grad_out: torch.Tensor, inverse_positions: torch.Tensor) -> torch.Tensor:
    """``grad_x[t] = sum_j grad_out[inverse_positions[t, j]]``."""
    num_tokens, top_k = inverse_positions.shape
    gathered = grad_out.index_select(0, inverse_positions.reshape(-1).long())
    return gathered.view(num_tokens, top_k, -1).sum(1, dtype=torch.promote_types(grad_out.dtype, torch.float32)).to(
        grad_out.dtype)
