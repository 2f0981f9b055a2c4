"""References of the fused router: top-k routing with its loss statistics, and its backward."""

from __future__ import annotations

import torch


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_lse(x: torch.Tensor) -> torch.Tensor:
    # Written out (not torch.logsumexp) so that non-finite rows give NaN as in the kernel.
    row_max = x.amax(dim=1, keepdim=True)
    return (row_max + torch.log(torch.exp(x - row_max).sum(dim=1, keepdim=True))).squeeze(1)


def _scores(x: torch.Tensor, lse: torch.Tensor, scoring: str) -> torch.Tensor:
    return torch.exp(x - lse[:, None]) if scoring == "softmax" else torch.sigmoid(x)


def select_experts(x: torch.Tensor, scores: torch.Tensor, k: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The k experts of each row with the largest keys (logits, or scores + bias), NaN keys
    ranked lowest (below -inf), equal keys to the lower expert index (stable sorts)."""
    key = x if bias is None else scores + bias.to(scores.dtype)
    is_nan = torch.isnan(key)
    order = torch.sort(key.masked_fill(is_nan, float("-inf")), dim=1, descending=True, stable=True).indices
    # Then the NaN keys after every number, keeping the order within each group.
    last = torch.sort(is_nan.gather(1, order).to(torch.uint8), dim=1, stable=True).indices
    return order.gather(1, last)[:, :k]


def router_topk(logits: torch.Tensor, k: int, scoring: str = "softmax", renormalize: bool = True,
                bias: torch.Tensor | None = None):
    """(weights [N,k], indices [N,k] int32, counts [E] int32, prob_sums [E], lse [N]), computed in
    fp32 (fp64 for fp64 logits) and differentiable w.r.t. ``logits`` through plain autograd."""
    x = logits.to(_compute_dtype(logits))
    lse = _row_lse(x)
    scores = _scores(x, lse, scoring)
    indices = select_experts(x.detach(), scores.detach(), k, bias)
    weights = scores.gather(1, indices)
    if renormalize:
        weights = weights / weights.sum(dim=1, keepdim=True)
    weights = torch.where(torch.isnan(lse)[:, None], float("nan"), weights)
    counts = torch.bincount(indices.flatten(), minlength=x.shape[1]).to(torch.int32)
    return weights, indices.to(torch.int32), counts, scores.sum(dim=0), lse


def router_topk_backward(logits, indices, lse, grad_weights, grad_prob_sums, grad_lse, scoring: str,
                         renormalize: bool) -> torch.Tensor:
    """grad_logits (logits' dtype) of :func:`router_topk`, by the closed form the kernel uses."""
    x = logits.to(_compute_dtype(logits))
    lse = lse.to(x.dtype)
    probs = torch.exp(x - lse[:, None])
    scores = probs if scoring == "softmax" else torch.sigmoid(x)
    indices = indices.long()
    grad_weights = grad_weights.to(x.dtype)
    if renormalize:
        chosen = scores.gather(1, indices)
        total = chosen.sum(dim=1, keepdim=True)
        grad_weights = (grad_weights - (grad_weights * chosen).sum(dim=1, keepdim=True) / total) / total
    grad_scores = torch.zeros_like(x).scatter(1, indices, grad_weights) + grad_prob_sums.to(x.dtype)
    if scoring == "softmax":
        grad_x = probs * (grad_scores - (grad_scores * probs).sum(dim=1, keepdim=True))
    else:
        grad_x = grad_scores * scores * (1 - scores)
    grad_x = grad_x + grad_lse.to(x.dtype)[:, None] * probs
    return grad_x.to(logits.dtype)
