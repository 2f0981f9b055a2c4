"""Transformer building blocks shared by the experts, adapters and the language side."""

from __future__ import annotations

import torch
from torch import nn

from astrea.nn.attention import attention


class MultiHeadAttention(nn.Module):
    """Self-attention (``context=None``) or cross-attention through :func:`astrea.nn.attention.attention`."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"MultiHeadAttention: dim ({dim}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(context_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        k, v = self.key_value(x if context is None else context).chunk(2, dim=-1)
        out = attention(self._split(self.query(x)), self._split(k), self._split(v), causal=causal)
        return self.out(out.transpose(1, 2).flatten(2))


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention block; ``causal`` for the language decoder."""

    def __init__(self, dim: int, heads: int, causal: bool = False, mlp_ratio: int = 2):
        super().__init__()
        self.causal = causal
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = feed_forward(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), causal=self.causal)
        return x + self.mlp(self.norm_mlp(x))


class Resampler(nn.Module):
    """Learned-query cross-attention: any ``[B, T_in, in_dim]`` to ``[B, num_queries, dim]``."""

    def __init__(self, in_dim: int, dim: int, num_queries: int, heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.norm_context = nn.LayerNorm(in_dim)
        self.cross = MultiHeadAttention(dim, heads, context_dim=in_dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = feed_forward(dim, 2 * dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        x = queries + self.cross(queries, context=self.norm_context(tokens))
        return x + self.mlp(self.norm_mlp(x))


def masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B, L, D]`` over the positions where ``keep [B, L]`` is true."""
    weights = keep.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
