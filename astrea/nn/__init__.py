"""nn.Modules built on :mod:`astrea.ops`."""

from astrea.nn.router import RouterResult, TopKRouter

__all__ = ["RouterResult", "TopKRouter"]
