"""The public functional API of astrea: torch.library ops with validation, fake (meta)
implementations, autograd and per-device dispatch (see :mod:`astrea._backend`)."""

from astrea.ops.combine import weighted_combine
from astrea.ops.dispatch import Dispatch, moe_dispatch, permute
from astrea.ops.moco import queue_enqueue_

__all__ = [
    "Dispatch",
    "moe_dispatch",
    "permute",
    "queue_enqueue_",
    "weighted_combine",
]
