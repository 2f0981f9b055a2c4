"""Astrea: heterogeneous vision experts, per-expert adapters, a router with an adaptive
weight allocator, and fusion by weighted combination plus a stochastic residual of the
caption expert."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from astrea.models.coordination import ExpertCoordination
from astrea.models.experts import EXPERTS, BoxHead, CaptionHead, LabelHead, MaskHead, default_experts
from astrea.models.layers import Resampler

BASE_EXPERT = "caption"


class ExpertAdapter(nn.Module):
    """Projects an expert's tokens ``[B, T_e, D_e]`` to the model width and resamples them to
    ``num_tokens`` learned queries: ``[B, num_tokens, dim]``."""

    def __init__(self, in_dim: int, dim: int, num_tokens: int, heads: int):
        super().__init__()
        self.project = nn.Linear(in_dim, dim)
        self.resample = Resampler(dim, dim, num_tokens, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.resample(self.project(tokens)))


@dataclasses.dataclass
class AstreaOutput:
    tokens: torch.Tensor  # [B, T, D] fused visual tokens for the language model
    router_probs: torch.Tensor  # [B, E] contribution probability of each expert
    expert_weights: torch.Tensor  # [B, E] combination weights (zero for experts outside the top-k)
    counts: torch.Tensor  # [E] samples routed to each expert
    aux_loss: torch.Tensor  # Switch load-balancing loss
    z_loss: torch.Tensor  # router z-loss


def _token_width(expert: nn.Module, image_size: int) -> int:
    """The token width ``D_e`` of an expert, from one forward pass on a blank image."""
    was_training = expert.training
    expert.eval()
    with torch.no_grad():
        tokens = expert(torch.zeros(1, 3, image_size, image_size))
    expert.train(was_training)
    if tokens.dim() != 3:
        raise ValueError(f"Astrea: an expert must map images to [B, T_e, D_e] tokens; got shape {tuple(tokens.shape)}")
    return tokens.shape[-1]


class Astrea(nn.Module):
    """The Astrea visual front end.

    Args:
        vocab_size, pad_id: of the caption vocabulary (the caption expert's bag-of-words head).
        experts: ``{name: module}`` for the names in :data:`EXPERTS`, each mapping
            ``[B, 3, S, S]`` images to ``[B, T_e, D_e]``; defaults to :func:`default_experts`.
        dim: width ``D`` of the visual tokens handed to the language model.
        num_tokens: common token count ``T`` after resampling.
        top_k: experts combined per sample.
        residual_p: keep probability of the caption expert's stochastic residual.
        seed: seed of the residual's Philox mask stream; ``fuse``'s ``offset`` places a batch in it.
        coordination: couple the experts' adapted tokens through the learned E x E coordination
            matrix before routing and fusion (:class:`~astrea.models.coordination.ExpertCoordination`:
            ``Y_e = X_e + sum_j C[e, j] (X_j W)``); ``False`` is the ablation without it.
    """

    def __init__(self, vocab_size: int, pad_id: int, *, experts: dict[str, nn.Module] | None = None,
                 image_size: int = 32, num_classes: int = 13, dim: int = 64, num_tokens: int = 16,
                 top_k: int = 2, residual_p: float = 0.5, seed: int = 0, heads: int = 4,
                 coordination: bool = True):
        super().__init__()
        experts = default_experts(image_size) if experts is None else experts
        if sorted(experts) != sorted(EXPERTS):
            raise ValueError(f"Astrea: experts must be named {', '.join(EXPERTS)}; got {', '.join(experts)}")
        if not 0.0 < residual_p <= 1.0:
            raise ValueError(f"Astrea: residual_p must be in (0, 1]; got {residual_p}")
        self.names = EXPERTS
        # the constructor's arguments other than the experts: what rebuilds this model around saved weights
        self.config = dict(vocab_size=vocab_size, pad_id=pad_id, image_size=image_size, num_classes=num_classes,
                           dim=dim, num_tokens=num_tokens, top_k=top_k, residual_p=residual_p, seed=seed, heads=heads,
                           coordination=coordination)
        self.residual_p, self.seed, self.top_k = residual_p, seed, top_k
        self.experts = nn.ModuleDict({name: experts[name] for name in EXPERTS})
        widths = {name: _token_width(module, image_size) for name, module in self.experts.items()}
        self.adapters = nn.ModuleDict({name: ExpertAdapter(widths[name], dim, num_tokens, heads) for name in EXPERTS})
        self.heads = nn.ModuleDict({
            "detection": BoxHead(widths["detection"]),
            "segmentation": MaskHead(widths["segmentation"], image_size),
            "classification": LabelHead(widths["classification"], num_classes),
            "caption": CaptionHead(widths["caption"], vocab_size, pad_id),
        })
        self.instruction_proj = nn.Linear(dim, dim)
        from astrea.nn import AdaptiveWeightAllocator

        # The gate's logits pass through the allocator's per-expert temperature before the
        # top-k, so the router is this gate plus astrea.ops.router_topk (as the allocator documents).
        self.router = nn.Linear(dim, len(EXPERTS), bias=False)
        self.allocator = AdaptiveWeightAllocator(len(EXPERTS))
        # built last, so that every other parameter draws the same initial values with or without it
        self.coordination = ExpertCoordination(len(EXPERTS), dim) if coordination else None

    def fusion_modules(self) -> list[nn.Module]:
        """The modules of fusion a trainer tunes with the experts frozen (the Instruct stage):
        instruction projection, coordination matrix (when on), router gate and weight allocator."""
        modules = [self.instruction_proj, self.coordination, self.router, self.allocator]
        return [module for module in modules if module is not None]

    def encode(self, images: torch.Tensor, names=EXPERTS) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each named expert's raw tokens ``[B, T_e, D_e]`` and adapted tokens ``[B, T, D]``."""
        raw = {name: self.experts[name](images) for name in names}
        return raw, {name: self.adapters[name](tokens) for name, tokens in raw.items()}

    def fuse(self, adapted: dict[str, torch.Tensor], instruction: torch.Tensor | None = None,
             offset: int = 0) -> AstreaOutput:
        """Couples the experts' adapted tokens through the coordination matrix (when on), routes
        on their pooled features (plus the instruction embedding ``[B, D]``) and combines the
        experts, with the (coordinated) caption expert as the stochastic-residual base.

        ``offset``: Philox counter of this batch's first token row. Token row ``i`` of the
        batch draws its residual mask from counter ``offset + i``, so batches that must
        draw fresh masks need offsets at least ``B * T`` apart (one per token row)."""
        from astrea import ops

        stacked = torch.stack([adapted[name] for name in self.names])  # [E, B, T, D]
        if self.coordination is not None:
            stacked = self.coordination(stacked)
        pooled = stacked.mean(dim=(0, 2))
        if instruction is not None:
            pooled = pooled + self.instruction_proj(instruction)
        logits = self.allocator(self.router(pooled))
        routed = ops.router_topk(logits, self.top_k, bias=self.allocator.bias)
        dense = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        dense = dense.scatter(1, routed.indices.long(), routed.weights)
        base = stacked[self.names.index(BASE_EXPERT)]
        tokens = ops.combine_residual(stacked, dense, base, self.residual_p, seed=self.seed,
                                      offset=offset, training=self.training, expert_scale=self.allocator.scale)
        return AstreaOutput(tokens=tokens, router_probs=logits.float().softmax(-1), expert_weights=dense,
                            counts=routed.counts, aux_loss=ops.load_balancing_loss(routed),
                            z_loss=ops.router_z_loss(routed))

    def forward(self, images: torch.Tensor, instruction: torch.Tensor | None = None, offset: int = 0) -> AstreaOutput:
        """Visual tokens ``[B, T, D]`` for a language model, and the router's view of them."""
        _, adapted = self.encode(images)
        return self.fuse(adapted, instruction, offset)
