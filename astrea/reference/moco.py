"""References of the momentum-queue contrast ops."""

from __future__ import annotations

import torch


def queue_enqueue_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Writes ``keys`` into ``queue`` from row ``ptr[0]`` on, wrapping around, and advances ``ptr``."""
    capacity = queue.shape[0]
    start = int(ptr[0])
    rows = (torch.arange(keys.shape[0], device=queue.device) + start) % capacity
    queue[rows] = keys.to(queue.dtype)
    ptr.fill_((start + keys.shape[0]) % capacity)
