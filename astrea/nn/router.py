"""Top-k gate of a Mixture-of-Experts layer: linear gate + fused routing + auxiliary losses."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from astrea.nn.allocator import update_selection_bias_
from astrea.ops.router import SCORINGS, RouterOutput, load_balancing_loss, router_topk, router_z_loss


@dataclasses.dataclass
class RouterResult:
    """What :class:`TopKRouter` returns for T tokens (all leading dims of the input flattened)."""

    logits: torch.Tensor  # [T, E] gate logits (softmax/sigmoid of them = the full scores)
    weights: torch.Tensor  # [T, k] fp32 routing weights
    indices: torch.Tensor  # [T, k] int32 chosen experts
    counts: torch.Tensor  # [E] int32 tokens routed to each expert
    prob_sums: torch.Tensor  # [E] fp32 per-expert sum of scores over the tokens
    aux_loss: torch.Tensor  # scalar Switch load-balancing loss (1 when balanced)
    z_loss: torch.Tensor  # scalar router z-loss, mean of lse**2


class TopKRouter(nn.Module):
    """Routes tokens of width ``dim`` to ``k`` of ``num_experts`` experts.

    Args:
        dim: token width.
        num_experts: E.
        k: experts per token.
        scoring: ``"softmax"`` or ``"sigmoid"`` (see :func:`astrea.ops.router_topk`).
        renormalize: make each token's k weights add to 1.
        jitter: in training, multiply the gate input by noise drawn uniformly from
            ``[1 - jitter, 1 + jitter]`` (Switch Transformer); 0 disables it.
        bias_update_rate: > 0 enables aux-loss-free balancing (DeepSeek-V3): a buffer
            ``expert_bias`` shifts which experts are chosen (never the weights), and
            :meth:`update_expert_bias` moves it by this rate towards balance.

    ``forward`` has no side effects (so activation-checkpoint recomputation routes the
    same way); call :meth:`update_expert_bias` once per optimiser step, with counts
    all-reduced across ranks when training data-parallel.
    """

    def __init__(self, dim: int, num_experts: int, k: int, *, scoring: str = "softmax", renormalize: bool = True,
                 jitter: float = 0.0, bias_update_rate: float = 0.0):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"TopKRouter: k must be in [1, num_experts={num_experts}]; got {k}")
        if scoring not in SCORINGS:
            raise ValueError(f"TopKRouter: scoring must be one of {SCORINGS}; got {scoring!r}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"TopKRouter: jitter must be in [0, 1); got {jitter}")
        if bias_update_rate < 0:
            raise ValueError(f"TopKRouter: bias_update_rate must be >= 0; got {bias_update_rate}")
        self.dim, self.num_experts, self.k = dim, num_experts, k
        self.scoring, self.renormalize = scoring, renormalize
        self.jitter, self.bias_update_rate = jitter, bias_update_rate
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts) if bias_update_rate > 0 else None)

    def forward(self, x: torch.Tensor) -> RouterResult:
        if x.shape[-1] != self.dim:
            raise ValueError(f"TopKRouter: x.shape[-1] must equal dim = {self.dim}; got shape {tuple(x.shape)}")
        tokens = x.reshape(-1, self.dim)
        if self.training and self.jitter > 0:
            noise = torch.empty_like(tokens).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            tokens = tokens * noise
        logits = self.gate(tokens)
        out: RouterOutput = router_topk(logits, self.k, scoring=self.scoring, renormalize=self.renormalize,
                                        bias=self.expert_bias)
        return RouterResult(logits=logits, weights=out.weights, indices=out.indices, counts=out.counts,
                            prob_sums=out.prob_sums, aux_loss=load_balancing_loss(out), z_loss=router_z_loss(out))

    @torch.no_grad()
    def update_expert_bias(self, counts: torch.Tensor) -> None:
        """``expert_bias += rate * sign(mean(counts) - counts)``: under-loaded experts become
        likelier to be chosen. ``counts`` is ``RouterResult.counts`` (summed over steps or ranks)."""
        if self.expert_bias is None:
            raise RuntimeError("TopKRouter.update_expert_bias: construct the router with bias_update_rate > 0")
        update_selection_bias_(self.expert_bias, counts, self.bias_update_rate)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}, scoring={self.scoring!r}, "
                f"renormalize={self.renormalize}, jitter={self.jitter}, bias_update_rate={self.bias_update_rate}")
