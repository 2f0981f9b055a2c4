"""The four default vision experts of Astrea and the task heads of their alignment stages.

The experts are deliberately heterogeneous (small, randomly initialised, so nothing is
downloaded): a conv-patch ViT for detection, a small CNN with FPN-style top-down
features for segmentation, an MLP-mixer for classification and a conv-stem transformer
for captioning. Each maps images ``[B, 3, S, S]`` to tokens ``[B, T_e, D_e]``; any module
with that contract (a timm or transformers backbone) can replace them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from astrea.models.layers import Resampler, TransformerBlock, feed_forward

EXPERTS = ("detection", "segmentation", "classification", "caption")


class PatchViT(nn.Module):
    """Non-overlapping conv patch embedding + transformer blocks (the detection expert)."""

    def __init__(self, image_size: int = 32, patch: int = 4, dim: int = 48, depth: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.randn((image_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images).flatten(2).transpose(1, 2) + self.position
        return self.norm(self.blocks(x))


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class FPNConvNet(nn.Module):
    """Three conv stages (strides 1, 2, 4) merged top-down at stride 2 (the segmentation expert).

    Tokens are the stride-2 feature map, row-major: ``[B, (S/2)^2, width]``.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        self.stage1 = _conv(3, width // 2, 1)
        self.stage2 = _conv(width // 2, width, 2)
        self.stage3 = nn.Sequential(_conv(width, 2 * width, 2), _conv(2 * width, 2 * width, 1))
        self.lateral2 = nn.Conv2d(width, width, 1)
        self.lateral3 = nn.Conv2d(2 * width, width, 1)
        self.smooth = _conv(width, width, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c2 = self.stage2(self.stage1(images))
        c3 = self.stage3(c2)
        p2 = self.lateral2(c2) + F.interpolate(self.lateral3(c3), size=c2.shape[-2:], mode="nearest")
        return self.smooth(p2).flatten(2).transpose(1, 2)


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        self.token_mlp = feed_forward(tokens, 2 * tokens)
        self.norm_channels = nn.LayerNorm(dim)
        self.channel_mlp = feed_forward(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm_tokens(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm_channels(x))


class MLPMixer(nn.Module):
    """Patch embedding + token-mixing / channel-mixing MLP blocks (the classification expert)."""

    def __init__(self, image_size: int = 32, patch: int = 4, dim: int = 48, depth: int = 2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*(MixerBlock((image_size // patch) ** 2, dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(images).flatten(2).transpose(1, 2)))


class ConvStemTransformer(nn.Module):
    """Two stride-2 convolutions, then transformer blocks (the caption expert)."""

    def __init__(self, image_size: int = 32, dim: int = 64, depth: int = 2, heads: int = 4):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, dim // 2, 2), nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1))
        self.position = nn.Parameter(torch.randn((image_size // 4) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images).flatten(2).transpose(1, 2) + self.position
        return self.norm(self.blocks(x))


def default_experts(image_size: int = 32) -> dict[str, nn.Module]:
    return {
        "detection": PatchViT(image_size),
        "segmentation": FPNConvNet(),
        "classification": MLPMixer(image_size),
        "caption": ConvStemTransformer(image_size),
    }


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching ``(x0, y0, x1, y1)`` boxes ``[..., 4]``."""
    lo = torch.maximum(a[..., :2], b[..., :2])
    hi = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp_min(0).prod(-1)
    area = lambda box: (box[..., 2:] - box[..., :2]).clamp_min(0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp_min(1e-6)


class BoxHead(nn.Module):
    """One learned query per object (left, right) attends to the tokens and regresses its box."""

    def __init__(self, in_dim: int, num_boxes: int = 2, dim: int = 48):
        super().__init__()
        self.pool = Resampler(in_dim, dim, num_boxes, heads=4)
        self.regress = nn.Linear(dim, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        centre_size = self.regress(self.pool(tokens)).sigmoid()
        centre, half = centre_size[..., :2], centre_size[..., 2:] / 2
        return torch.cat([centre - half, centre + half], dim=-1)

    @staticmethod
    def loss(boxes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(boxes, target) + (1 - box_iou(boxes, target)).mean()


class MaskHead(nn.Module):
    """Per-token foreground logit on the square token grid, upsampled to the image."""

    def __init__(self, in_dim: int, image_size: int):
        super().__init__()
        self.image_size = image_size
        self.classify = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"MaskHead: tokens must form a square grid; got {tokens.shape[1]} tokens")
        logits = self.classify(tokens).transpose(1, 2).unflatten(-1, (side, side))
        size = (self.image_size, self.image_size)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[:, 0]

    @staticmethod
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, target)


class LabelHead(nn.Module):
    """Mean-pooled tokens to class logits."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.classify = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, num_classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classify(tokens.mean(1))

    @staticmethod
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target)


class CaptionHead(nn.Module):
    """Mean-pooled tokens to the caption's bag of words (which words the caption holds)."""

    def __init__(self, in_dim: int, vocab_size: int, pad_id: int):
        super().__init__()
        self.vocab_size, self.pad_id = vocab_size, pad_id
        self.classify = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, vocab_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classify(tokens.mean(1))

    def loss(self, logits: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        words = torch.zeros_like(logits).scatter_(1, captions, 1.0)
        words[:, self.pad_id] = 0.0
        return F.binary_cross_entropy_with_logits(logits, words)
