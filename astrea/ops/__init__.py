"""The public functional API of astrea: torch.library ops with validation, fake (meta)
implementations, autograd and per-device dispatch (see :mod:`astrea._backend`)."""

from astrea.ops.moco import moco_infonce, moco_logits, queue_enqueue_

__all__ = ["moco_infonce", "moco_logits", "queue_enqueue_"]
