"""nn.Modules built on :mod:`astrea.ops`."""

__all__: list[str] = []
