"""nn.Modules built on :mod:`astrea.ops`."""

from astrea.nn.allocator import AdaptiveWeightAllocator
from astrea.nn.residual import StochasticResidual

__all__ = ["AdaptiveWeightAllocator", "StochasticResidual"]
