"""The public functional API of astrea: torch.library ops with validation, fake (meta)
implementations, autograd and per-device dispatch (see :mod:`astrea._backend`)."""

from astrea.ops.moco import queue_enqueue_
from astrea.ops.router import RouterOutput, load_balancing_loss, router_topk, router_z_loss

__all__ = ["RouterOutput", "load_balancing_loss", "queue_enqueue_", "router_topk", "router_z_loss"]
