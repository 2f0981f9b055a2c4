"""Stochastic residual module: fresh Philox key per training call, ``y + r`` in eval."""

from __future__ import annotations

import torch
from torch import nn

from astrea._residual_draw import GRANULARITIES, ResidualDraw
from astrea.ops.residual import stochastic_residual

# Seeds are drawn below 2**62 so that seed and counters stay clear of the int64 limit.
_SEED_BOUND = 2**62


class StochasticResidual(nn.Module):
    """``y + m * r / p`` in training (``m ~ Bernoulli(p)`` per token row or per sample), ``y + r`` in eval.

    Each training call draws a fresh Philox seed from torch's default CPU generator (so
    ``torch.manual_seed`` reproduces a run) and passes an offset that advances by the number
    of mask units drawn, so no two calls of one module share a stream. The mask is never
    stored: backward regenerates it. Drawing the seed reads a CPU tensor (``.item()``), a graph
    break under ``torch.compile``; compile the surrounding blocks, or call
    :func:`astrea.ops.stochastic_residual` with your own seed for a break-free graph.

    Args:
        p: keep probability in (0, 1].
        granularity: ``"token"`` (one draw per ``[..., D]`` row) or ``"sample"`` (per index of dim 0).
    """

    def __init__(self, p: float, granularity: str = "token"):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"StochasticResidual: p (the keep probability) must be a number in (0, 1]; got {p!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"StochasticResidual: granularity must be one of {GRANULARITIES}; got {granularity!r}")
        self.p = float(p)
        self.granularity = granularity
        self.offset = 0

    def forward(self, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return stochastic_residual(y, r, self.p, seed=0, training=False)
        seed = int(torch.randint(_SEED_BOUND, (), dtype=torch.int64))
        out = stochastic_residual(y, r, self.p, seed=seed, offset=self.offset, granularity=self.granularity)
        units, _ = ResidualDraw(granularity=self.granularity).units(y.shape)
        self.offset = (self.offset + units) % _SEED_BOUND
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}, granularity={self.granularity!r}"
