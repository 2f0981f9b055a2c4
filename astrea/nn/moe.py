"""Sparse Mixture-of-Experts layer: stacked-weight experts on the grouped experts op, or any
experts on the dispatch / permute / weighted-combine ops."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from astrea import ops


class GroupedExperts(nn.Module):
    """E feed-forward experts with stacked weights, run by :func:`astrea.ops.moe_experts`.

    Parameters in transformers' fused layout: ``gate_up [E, 2I, H]`` (gate rows, then up rows;
    ``[E, I, H]`` when ``gated=False``) and ``down [E, H, I]``, initialised as ``nn.Linear``
    initialises each expert's projections. ``forward(x [N, H], dispatch, weights [N, k],
    expert_scale=None)`` gives ``[N, H]``, the weighted sum of each token's k experts.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, activation: str = "silu",
                 gated: bool = True):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("hidden", hidden), ("intermediate", intermediate)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GroupedExperts: {name} must be a positive int; got {value!r}")
        if activation not in ops.experts.ACTIVATIONS:
            raise ValueError(f"GroupedExperts: activation must be one of {sorted(ops.experts.ACTIVATIONS)}; "
                             f"got {activation!r}")
        self.activation = activation
        self.gated = gated
        rows = 2 * intermediate if gated else intermediate
        self.gate_up = nn.Parameter(torch.empty(num_experts, rows, hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (self.gate_up, self.down):
            bound = 1 / math.sqrt(weight.shape[-1])  # nn.Linear's default, per expert
            nn.init.uniform_(weight, -bound, bound)

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def forward(self, x: torch.Tensor, dispatch: ops.Dispatch, weights: torch.Tensor,
                expert_scale: torch.Tensor | None = None) -> torch.Tensor:
        return ops.moe_experts(x, dispatch, self.gate_up, self.down, weights, activation=self.activation,
                               gated=self.gated, expert_scale=expert_scale)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.down.shape[1]}, intermediate={self.down.shape[2]}, "
                f"activation={self.activation!r}, gated={self.gated}")


class RoutedTokens(NamedTuple):
    """The first steps of a MoE layer on ``x [..., H]``: its tokens ``[N, H]``, the router's
    output, their dispatch and the allocator's per-expert scale (None without allocator)."""

    tokens: torch.Tensor
    routing: ops.RouterOutput
    dispatch: ops.Dispatch
    scale: torch.Tensor | None


def route_tokens(x: torch.Tensor, router: nn.Module, allocator: nn.Module | None, num_experts: int) -> RoutedTokens:
    tokens = x.reshape(-1, x.shape[-1])
    routing = router(tokens)
    dispatch = ops.moe_dispatch(routing.indices, num_experts)
    return RoutedTokens(tokens, routing, dispatch, allocator.scale if allocator is not None else None)


class SparseMoE(nn.Module):
    """Routes each token to k experts and sums their outputs with the routing weights.

    With :class:`GroupedExperts`: ``router(x)`` → ``moe_dispatch`` → ``moe_experts`` (both
    grouped GEMMs and the weighted sum in one op, no host sync: ``torch.compile(fullgraph=True)``
    takes the whole layer). With an ``nn.ModuleList`` of arbitrary experts: ``router(x)`` →
    ``moe_dispatch`` → ``permute`` → each expert on its contiguous slice of rows →
    ``weighted_combine``; slicing needs the expert offsets on the host, the one device-to-host
    sync of that forward (and a graph break under ``torch.compile``).

    Args:
        experts: a :class:`GroupedExperts`, or the E experts as an ``nn.ModuleList``, each
            mapping ``[n, D]`` to ``[n, D_out]`` (the same D_out for all).
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
        listed = isinstance(experts, nn.ModuleList) and len(experts) > 0
        if not (isinstance(experts, GroupedExperts) or listed):
            empty = " of length 0" if isinstance(experts, nn.ModuleList) else ""
            raise TypeError("SparseMoE: experts must be a GroupedExperts or a non-empty nn.ModuleList; got "
                            f"{type(experts).__name__}{empty}")
        self.experts = experts
        self.router = router
        self.allocator = allocator
        self.aux_loss: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts if isinstance(self.experts, GroupedExperts) else len(self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, routing, dispatch, scale = route_tokens(x, self.router, self.allocator, self.num_experts)
        self.aux_loss = getattr(routing, "aux_loss", None)
        if isinstance(self.experts, GroupedExperts):
            return self.experts(tokens, dispatch, routing.weights, scale).reshape(x.shape)
        permuted = ops.permute(tokens, dispatch)
        offsets = dispatch.expert_offsets.tolist()  # the host sync
        if offsets[-1] != permuted.shape[0]:
            raise ValueError(f"SparseMoE: router indices must lie in [0, {self.num_experts}); "
                             f"{permuted.shape[0] - offsets[-1]} routing slots are out of range")
        outputs = [expert(permuted[start:end]) for expert, start, end in zip(self.experts, offsets, offsets[1:])]
        widths = {out.shape[-1] for out in outputs}
        if len(widths) != 1:
            raise ValueError(f"SparseMoE: every expert must return the same feature size; got {sorted(widths)}")
        combined = ops.weighted_combine(torch.cat(outputs), routing.weights, dispatch, expert_scale=scale)
        return combined.reshape(*x.shape[:-1], combined.shape[-1])
