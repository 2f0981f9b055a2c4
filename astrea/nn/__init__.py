"""nn.Modules built on :mod:`astrea.ops`."""

from astrea.nn.moco import MomentumContrast

__all__ = ["MomentumContrast"]
