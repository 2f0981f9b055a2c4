"""nn.Modules built on :mod:`astrea.ops`."""

from astrea.nn.allocator import AdaptiveWeightAllocator
from astrea.nn.moco import MomentumContrast
from astrea.nn.moe import GroupedExperts, SparseMoE
from astrea.nn.residual import StochasticResidual
from astrea.nn.router import RouterResult, TopKRouter

__all__ = [
    "AdaptiveWeightAllocator",
    "GroupedExperts",
    "MomentumContrast",
    "RouterResult",
    "SparseMoE",
    "StochasticResidual",
    "TopKRouter",
]
