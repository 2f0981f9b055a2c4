"""Evaluation measures of the alignment stages."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def in_batch_info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE where row ``i`` of ``queries`` and ``keys`` is the positive pair."""
    logits = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def retrieval_top1(queries: torch.Tensor, keys: torch.Tensor, captions: torch.Tensor) -> float:
    """Image-to-text top-1: the nearest key's caption equals the image's own caption
    (scenes that share a caption count as correct retrievals of each other)."""
    nearest = (F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T).argmax(dim=1)
    return (captions[nearest] == captions).all(dim=1).float().mean().item()


def mask_iou(logits: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean over images of the foreground IoU of ``logits > 0`` against ``masks``."""
    predicted, truth = logits > 0, masks > 0.5
    inter = (predicted & truth).flatten(1).sum(1)
    union = (predicted | truth).flatten(1).sum(1).clamp_min(1)
    return (inter / union).mean().item()


def coefficient_of_variation(counts: torch.Tensor) -> float:
    """Population std / mean of the per-expert loads (0 = perfectly balanced)."""
    counts = counts.double()
    return (counts.std(unbiased=False) / counts.mean().clamp_min(1e-12)).item()
