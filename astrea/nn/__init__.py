"""nn.Modules built on :mod:`astrea.ops`."""

from astrea.nn.moe import SparseMoE

__all__: list[str] = [
    "SparseMoE",
]
