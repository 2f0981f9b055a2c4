"""Sparse Mixture-of-Experts layer on the dispatch / permute / weighted-combine ops."""

from __future__ import annotations

import torch
from torch import nn

from astrea import ops


class SparseMoE(nn.Module):
    """Routes each token to k experts and sums their outputs with the routing weights.

    ``router(x)`` → ``moe_dispatch`` → ``permute`` → each expert on its contiguous slice of
    rows → ``weighted_combine``. Slicing needs the expert offsets on the host: reading them is
    the one device-to-host sync of the forward (and a graph break under ``torch.compile``).

    Args:
        experts: the E experts; each maps ``[n, D]`` to ``[n, D_out]`` (the same D_out for all).
        router: a module whose ``router(x)`` for ``x[N, D]`` returns an object with
            ``.weights`` ``[N, k]`` float, ``.indices`` ``[N, k]`` int32 and optionally
            ``.aux_loss`` (kept in :attr:`aux_loss` after each forward, else None).
        allocator: optional module with a ``.scale`` ``[E]`` tensor, the per-expert
            calibration passed to ``weighted_combine`` as ``expert_scale``.

    Input ``[..., D]``, output ``[..., D_out]``. Every expert runs, on an empty slice when no
    token chose it, so all parameters take part in every step (as DDP expects).
    """

    def __init__(self, experts: nn.ModuleList, router: nn.Module, allocator: nn.Module | None = None):
        super().__init__()
        if not isinstance(experts, nn.ModuleList) or len(experts) == 0:
            raise TypeError(f"SparseMoE: experts must be a non-empty nn.ModuleList; got {type(experts).__name__}"
                            + (" of length 0" if isinstance(experts, nn.ModuleList) else ""))
        self.experts = experts
        self.router = router
        self.allocator = allocator
        self.aux_loss: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        routing = self.router(tokens)
        self.aux_loss = getattr(routing, "aux_loss", None)
        dispatch = ops.moe_dispatch(routing.indices, self.num_experts)
        permuted = ops.permute(tokens, dispatch)
        offsets = dispatch.expert_offsets.tolist()  # the host sync
        if offsets[-1] != permuted.shape[0]:
            raise ValueError(f"SparseMoE: router indices must lie in [0, {self.num_experts}); "
                             f"{permuted.shape[0] - offsets[-1]} routing slots are out of range")
        outputs = [expert(permuted[start:end]) for expert, start, end in zip(self.experts, offsets, offsets[1:])]
        widths = {out.shape[-1] for out in outputs}
        if len(widths) != 1:
            raise ValueError(f"SparseMoE: every expert must return the same feature size; got {sorted(widths)}")
        scale = self.allocator.scale if self.allocator is not None else None
        combined = ops.weighted_combine(torch.cat(outputs), routing.weights, dispatch, expert_scale=scale)
        return combined.reshape(*x.shape[:-1], combined.shape[-1])
