"""References of the fused router: top-k routing with its loss statistics, and its backward."""

from __future__ import annotations

import torch


# Below this sum the chosen scores are renormalised as a softmax over their logits (see
# renormalized_weights); the kernels use the same constant.
RENORMALIZE_MIN_TOTAL = 2.0**-64


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_lse(x: torch.Tensor) -> torch.Tensor:
    # Written out (not torch.logsumexp) so that non-finite rows give NaN as in the kernel.
    row_max = x.amax(dim=1, keepdim=True)
    return (row_max + torch.log(torch.exp(x - row_max).sum(dim=1, keepdim=True))).squeeze(1)


def _scores(x: torch.Tensor, lse: torch.Tensor, scoring: str) -> torch.Tensor:
    """The full score row: sigmoid(x), else softmax(x) (also for topk_softmax, whose
    prob_sums and lse are those of the full softmax)."""
    return torch.sigmoid(x) if scoring == "sigmoid" else torch.exp(x - lse[:, None])


def _top(key: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest keys of each row, best first: NaN keys ranked lowest (below
    -inf), equal keys to the lower index (stable sorts)."""
    is_nan = torch.isnan(key)
    order = torch.sort(key.masked_fill(is_nan, float("-inf")), dim=1, descending=True, stable=True).indices
    # Then the NaN keys after every number, keeping the order within each group.
    last = torch.sort(is_nan.gather(1, order).to(torch.uint8), dim=1, stable=True).indices
    return order.gather(1, last)[:, :k]


def selection_keys(x: torch.Tensor, scores: torch.Tensor, scoring: str, bias: torch.Tensor | None,
                   bias_on: str, grouped: bool) -> torch.Tensor:
    """What experts are ranked by. The selection scores are the scores (softmax or sigmoid),
    the logits for topk_softmax; with a bias, ``scores + bias`` (bias_on="scores") or
    ``logits + bias`` (bias_on="logits"). Without a bias or groups the logits, which rank
    as the scores do."""
    selection = x if scoring == "topk_softmax" else scores
    if bias is not None:
        return (x if bias_on == "logits" else selection) + bias.to(x.dtype)
    return selection if grouped else x


def _top_allowed(key: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`_top` among the ``allowed`` experts only (every row allows at least k)."""
    order = _top(key, key.shape[1])
    excluded_last = torch.sort((~allowed).gather(1, order).to(torch.uint8), dim=1, stable=True).indices
    return order.gather(1, excluded_last)[:, :k]


def select_experts(key: torch.Tensor, k: int, num_groups: int = 1, topk_groups: int = 1,
                   group_score: str = "top2_sum") -> torch.Tensor:
    """The k experts of each row with the largest keys, among the experts of its
    ``topk_groups`` best groups when ``num_groups > 1`` (E split into equal contiguous
    groups, each scored by the sum of its two largest keys, or by its largest key for
    ``group_score="max"``); NaN keys and NaN group scores rank lowest, equal ones go to
    the lower index."""
    if num_groups == 1:
        return _top(key, k)
    rows, experts = key.shape
    members = key.reshape(rows * num_groups, experts // num_groups)
    best = members.gather(1, _top(members, 2 if group_score == "top2_sum" else 1))
    group_scores = best.sum(1).reshape(rows, num_groups)
    chosen_groups = _top(group_scores, topk_groups)
    allowed = torch.zeros(rows, num_groups, dtype=torch.bool, device=key.device).scatter(1, chosen_groups, True)
    return _top_allowed(key, allowed.repeat_interleave(experts // num_groups, dim=1), k)


def renormalized_weights(chosen_scores: torch.Tensor, chosen_logits: torch.Tensor) -> torch.Tensor:
    """The chosen scores [N, k] divided by their row sum S; where S < RENORMALIZE_MIN_TOTAL, the
    softmax over the chosen logits instead. That is the same function to rounding: a softmax
    score is exp(x - lse), and a sigmoid score below 2^-64 is exp(x) times 1 - O(2^-64), far
    under fp64's unit roundoff; but it stays finite where the scores underflow to 0 (sigmoid
    below about -88 in fp32, or softmax scores of experts a bias picked far below the row's
    maximum), where S would give 0 / 0. A row whose chosen logits are all -inf has no positive
    score either way: NaN weights. Differentiable through plain autograd, with no NaN from the
    branch not taken."""
    total = chosen_scores.sum(dim=1, keepdim=True)
    underflow = total < RENORMALIZE_MIN_TOTAL
    direct = chosen_scores / torch.where(underflow, 1.0, total)
    rescued = torch.softmax(chosen_logits.masked_fill(~underflow, 0.0), dim=1)
    return torch.where(underflow, rescued, direct)


def router_topk(logits: torch.Tensor, k: int, scoring: str = "softmax", renormalize: bool = True,
                bias: torch.Tensor | None = None, bias_on: str = "scores", num_groups: int = 1,
                topk_groups: int = 1, group_score: str = "top2_sum", scaling_factor: float = 1.0):
    """(weights [N,k], indices [N,k] int32, counts [E] int32, prob_sums [E], lse [N]), computed in
    fp32 (fp64 for fp64 logits) and differentiable w.r.t. ``logits`` through plain autograd.
    The arguments are those of :func:`astrea.ops.router_topk`."""
    x = logits.to(_compute_dtype(logits))
    lse = _row_lse(x)
    scores = _scores(x, lse, scoring)
    key = selection_keys(x.detach(), scores.detach(), scoring, bias, bias_on, num_groups > 1)
    indices = select_experts(key, k, num_groups, topk_groups, group_score)
    if scoring == "topk_softmax":
        weights = torch.softmax(x.gather(1, indices), dim=1)
    else:
        weights = scores.gather(1, indices)
        if renormalize:
            weights = renormalized_weights(weights, x.gather(1, indices))
    weights = weights * scaling_factor
    weights = torch.where(torch.isnan(lse)[:, None], float("nan"), weights)
    counts = torch.bincount(indices.flatten(), minlength=x.shape[1]).to(torch.int32)
    return weights, indices.to(torch.int32), counts, scores.sum(dim=0), lse


def router_topk_backward(logits, indices, lse, grad_weights, grad_prob_sums, grad_lse, scoring: str,
                         renormalize: bool, scaling_factor: float = 1.0) -> torch.Tensor:
    """grad_logits (logits' dtype) of :func:`router_topk`, by the closed form the kernel uses.
    topk_softmax weights are the renormalised softmax weights (the same function of the
    logits), so they take the softmax-renormalised closed form. Rows renormalised as a softmax
    over their chosen logits (:func:`renormalized_weights`) take that softmax's closed form,
    dx_j = w_j (gw_j - sum_i gw_i w_i) on the chosen experts, in place of the score Jacobian."""
    if scoring == "topk_softmax":
        scoring, renormalize = "softmax", True
    x = logits.to(_compute_dtype(logits))
    lse = lse.to(x.dtype)
    probs = torch.exp(x - lse[:, None])
    scores = probs if scoring == "softmax" else torch.sigmoid(x)
    indices = indices.long()
    grad_weights = grad_weights.to(x.dtype) * scaling_factor
    grad_rescued = torch.zeros_like(x)
    if renormalize:
        chosen = scores.gather(1, indices)
        total = chosen.sum(dim=1, keepdim=True)
        underflow = total < RENORMALIZE_MIN_TOTAL
        total = torch.where(underflow, 1.0, total)
        rescued = renormalized_weights(chosen, x.gather(1, indices))
        grad_rescued.scatter_(1, indices, torch.where(
            underflow, rescued * (grad_weights - (grad_weights * rescued).sum(dim=1, keepdim=True)), 0.0))
        grad_weights = torch.where(
            underflow, 0.0, (grad_weights - (grad_weights * chosen).sum(dim=1, keepdim=True) / total) / total)
    grad_scores = torch.zeros_like(x).scatter(1, indices, grad_weights) + grad_prob_sums.to(x.dtype)
    if scoring == "softmax":
        grad_x = probs * (grad_scores - (grad_scores * probs).sum(dim=1, keepdim=True))
    else:
        grad_x = grad_scores * scores * (1 - scores)
    grad_x = grad_x + grad_lse.to(x.dtype)[:, None] * probs + grad_rescued
    return grad_x.to(logits.dtype)
