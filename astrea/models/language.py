"""The small language side: a text encoder (the text space the experts are aligned to) and a
tiny causal decoder that reads Astrea's visual tokens followed by text tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astrea.models.layers import TransformerBlock, masked_mean


class TextEncoder(nn.Module):
    """Token embedding + one transformer block, mean-pooled over non-pad tokens: ``[B, L] -> [B, dim]``."""

    def __init__(self, vocab_size: int, dim: int, max_len: int, pad_id: int, heads: int = 4):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.block = TransformerBlock(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.block(self.embed(tokens) + self.position[: tokens.shape[1]])
        return self.norm(masked_mean(x, tokens != self.pad_id))


class TinyDecoder(nn.Module):
    """Causal transformer over ``[visual tokens; text tokens]``, predicting the next text token."""

    def __init__(self, vocab_size: int, dim: int, max_len: int, pad_id: int, depth: int = 2, heads: int = 4):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, causal=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size)

    def instruction_embedding(self, instruction: torch.Tensor) -> torch.Tensor:
        """Mean token embedding of an instruction ``[B, L]`` (the router's text input)."""
        return masked_mean(self.embed(instruction), instruction != self.pad_id)

    def forward(self, visual: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, L, vocab]`` at the text positions: row ``i`` predicts ``tokens[:, i + 1]``."""
        x = torch.cat([visual, self.embed(tokens)], dim=1)
        if x.shape[1] > self.position.shape[0]:
            raise ValueError(f"TinyDecoder: {x.shape[1]} positions exceed max_len={self.position.shape[0]}")
        x = self.norm(self.blocks(x + self.position[: x.shape[1]]))
        return self.lm_head(x[:, visual.shape[1]:])

    def loss_and_accuracy(self, visual: torch.Tensor, prompts: torch.Tensor,
                          answer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced cross-entropy on the answer tokens, the per-token hits, and the
        per-sample exact-match of the whole answer."""
        logits = self(visual, prompts[:, :-1])
        target, scored = prompts[:, 1:], answer_mask[:, 1:]
        loss = F.cross_entropy(logits[scored], target[scored])
        hits = (logits.argmax(-1) == target) | ~scored
        return loss, (logits.argmax(-1) == target)[scored], hits.all(dim=1)
