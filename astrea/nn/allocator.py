"""Adaptive weight allocator: real-time calibration of the experts' contributions."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def update_selection_bias_(bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """The aux-loss-free balancing rule (DeepSeek-V3; Megatron's ``get_updated_expert_bias``), in place:
    ``bias_e += rate * sign(mean_load - load_e)``, so under-loaded experts become likelier picks.
    ``tokens_per_expert`` [E] should count the whole global batch (all-reduced across ranks)."""
    load = tokens_per_expert.to(device=bias.device, dtype=torch.float32)
    bias += rate * torch.sign(load.mean() - load).to(bias.dtype)
    return bias


class AdaptiveWeightAllocator(nn.Module):
    """Per-expert calibration around a router: temperature, output scale and selection bias.

    Three pieces, each with one place in the MoE layer::

        allocator = AdaptiveWeightAllocator(num_experts)
        logits = allocator(router_logits)                      # 1. per-expert temperature
        weights, indices, ... = router_topk(logits, k, bias=allocator.bias)   # 3. selection only
        out = combine_residual(experts, dense_weights, residual, p, seed=...,
                               expert_scale=allocator.scale)   # 2. per-expert output scale
        allocator.update_bias(tokens_per_expert)               # after the step, no gradient

    1. ``forward(logits)`` returns ``logits / temperature`` column by column, with
       ``temperature = exp(log_temperature)`` learned ([E] parameter, positive by construction):
       a hot expert's scores are sharpened or flattened on their own.
    2. ``scale`` = ``exp(log_scale)`` [E], learned, positive: the ``expert_scale`` argument of
       :func:`astrea.ops.dense_weighted_combine` / :func:`astrea.ops.combine_residual` (and of the
       sparse ``weighted_combine``); it calibrates each expert's output magnitude after routing.
    3. ``bias`` [E] buffer (in ``state_dict``, no gradient): aux-loss-free load balancing
       (DeepSeek-V3). Pass it as the router's ``bias``: it shifts which experts are selected and
       never the returned weights. :meth:`update_bias` moves it by ``bias_update_rate`` toward
       under-loaded experts: ``bias_e += rate * sign(mean_load - load_e)``.

    Args:
        num_experts: E.
        bias_update_rate: step of the load-feedback bias update (Megatron's default 1e-3).
        init_temperature: initial temperature of every expert (> 0).
        init_scale: initial output scale of every expert (> 0).
    """

    def __init__(self, num_experts: int, *, bias_update_rate: float = 1e-3, init_temperature: float = 1.0,
                 init_scale: float = 1.0):
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"AdaptiveWeightAllocator: num_experts must be a positive int; got {num_experts!r}")
        if not bias_update_rate >= 0.0:
            raise ValueError(f"AdaptiveWeightAllocator: bias_update_rate must be >= 0; got {bias_update_rate!r}")
        for name, value in (("init_temperature", init_temperature), ("init_scale", init_scale)):
            if not value > 0.0:
                raise ValueError(f"AdaptiveWeightAllocator: {name} must be > 0; got {value!r}")
        self.num_experts = num_experts
        self.bias_update_rate = float(bias_update_rate)
        self.log_temperature = nn.Parameter(torch.full((num_experts,), math.log(init_temperature)))
        self.log_scale = nn.Parameter(torch.full((num_experts,), math.log(init_scale)))
        self.register_buffer("bias", torch.zeros(num_experts))

    @property
    def temperature(self) -> torch.Tensor:
        """[E] per-expert temperature (positive)."""
        return self.log_temperature.exp()

    @property
    def scale(self) -> torch.Tensor:
        """[E] per-expert output scale (positive): the combine ops' ``expert_scale``."""
        return self.log_scale.exp()

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """Router logits ``[..., E]`` divided by each expert's temperature (differentiable in both)."""
        if logits.shape[-1:] != (self.num_experts,):
            raise ValueError(f"AdaptiveWeightAllocator: logits must be [..., E] with E = {self.num_experts}; "
                             f"got shape {tuple(logits.shape)}")
        return logits / self.temperature.to(logits.dtype)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Load feedback: ``bias_e += rate * sign(mean_load - load_e)`` from this step's token counts.

        ``tokens_per_expert`` [E] (any numeric dtype) should count the whole batch: all-reduce it
        across data-parallel ranks first so every rank applies the same update. Returns the bias.
        """
        if not isinstance(tokens_per_expert, torch.Tensor) or tokens_per_expert.shape != (self.num_experts,):
            shape = tuple(tokens_per_expert.shape) if isinstance(tokens_per_expert, torch.Tensor) else \
                type(tokens_per_expert).__name__
            raise ValueError(f"AdaptiveWeightAllocator.update_bias: tokens_per_expert must be a tensor of shape "
                             f"({self.num_experts},); got {shape}")
        return update_selection_bias_(self.bias, tokens_per_expert, self.bias_update_rate)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, bias_update_rate={self.bias_update_rate}"
