"""The public functional API of astrea: torch.library ops with validation, fake (meta)
implementations, autograd and per-device dispatch (see :mod:`astrea._backend`)."""

from astrea.ops.dense_combine import dense_weighted_combine
from astrea.ops.moco import queue_enqueue_
from astrea.ops.residual import combine_residual, stochastic_residual

__all__ = ["combine_residual", "dense_weighted_combine", "queue_enqueue_", "stochastic_residual"]
