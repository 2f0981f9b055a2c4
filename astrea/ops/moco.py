"""Momentum-queue contrast ops (kernels in the compiled extension astrea._C)."""

from __future__ import annotations

import torch

from astrea import _backend, _extension, reference
from astrea._validation import FLOAT_DTYPES, check_same_device, check_size, check_tensor

_backend.declare_op("queue_enqueue_", kernel="extension", cpu_kernel=True)


def queue_enqueue_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Ring-buffer write: ``queue[(ptr + i) % K] = keys[i]`` for every key, then ``ptr += B (mod K)``.

    Args:
        queue: ``[K, D]`` contiguous floating buffer, written in place.
        ptr: 1-element int64 tensor on the queue's device (a buffer, so it lives in
            ``state_dict``), advanced in place. On CUDA it is read on the device: no sync.
        keys: ``[B, D]`` with ``B <= K``, any floating dtype (cast to the queue's).
    """
    op = "queue_enqueue_"
    check_tensor(op, "queue", queue, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "ptr", ptr, dtypes=(torch.int64,))
    check_tensor(op, "keys", keys, ndim=2, dtypes=FLOAT_DTYPES)
    device = check_same_device(op, queue=queue, ptr=ptr, keys=keys)
    if ptr.numel() != 1:
        raise ValueError(f"{op}: ptr must hold exactly 1 element; got shape {tuple(ptr.shape)}")
    if queue.shape[0] == 0:
        raise ValueError(f"{op}: queue must have at least one row; got shape {tuple(queue.shape)}")
    if not queue.is_contiguous():
        raise ValueError(f"{op}: queue must be contiguous (it is written in place)")
    check_size(op, "keys", keys, 1, queue.shape[1], "queue.shape[1]")
    if keys.shape[0] > queue.shape[0]:
        raise ValueError(f"{op}: keys has {keys.shape[0]} rows, more than the queue's {queue.shape[0]}")
    if _backend.choose(op, device) == "reference":
        reference.queue_enqueue_(queue, ptr, keys)
    else:
        torch.ops.astrea.queue_enqueue_(queue, ptr, keys)


if _extension.available():

    @torch.library.register_fake("astrea::queue_enqueue_")
    def _queue_enqueue_fake(queue, ptr, keys):
        return None
