"""References of the momentum-queue contrast ops: plain MoCo (He et al. 2020), logits
materialised, cross-entropy with label 0."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from astrea._validation import accumulation_dtype


def moco_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """``cat([q.k, q @ queue.T], 1) / T`` in fp32 (float64 for float64 inputs); the queue gets no gradient."""
    acc = accumulation_dtype(q)
    q, k = q.to(acc), k.to(acc)
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ queue.detach().to(acc).T
    return torch.cat([positive, negative], dim=1) / temperature


def moco_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
                 reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of :func:`moco_logits` with the positive (column 0) as the label."""
    logits = moco_logits(q, k, queue, temperature)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels, reduction=reduction)


def queue_enqueue_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Writes ``keys`` into ``queue`` from row ``ptr[0]`` on, wrapping around, and advances ``ptr``."""
    capacity = queue.shape[0]
    start = int(ptr[0])
    rows = (torch.arange(keys.shape[0], device=queue.device) + start) % capacity
    queue[rows] = keys.to(queue.dtype)
    ptr.fill_((start + keys.shape[0]) % capacity)
