"""Reference of the grouped expert FFNs: every routing slot through its expert, one by one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from astrea._validation import accumulation_dtype

# The activations of the experts, applied to the gate half of a gated FFN (or to the whole
# up projection of a plain one). relu2 is Nemotron-H's squared ReLU (transformers' ACT2FN["relu2"]).
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
}
# Activations of gated FFNs only, combining gate and up otherwise than ``act(gate) * up``:
# gpt-oss's SwiGLU, with both halves clamped and ``up + 1`` gated.
GATED_ACTIVATIONS = ("clamped_swiglu",)
# Where a gated gate_up keeps its halves: gate rows 0..I-1 then up rows I..2I-1 (transformers'
# fused experts), or gate row i at 2i and up row i at 2i + 1 (gpt-oss).
GATE_UP_LAYOUTS = ("concatenated", "interleaved")
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


def split_gate_up(pre: torch.Tensor, layout: str = "concatenated") -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) columns of gated pre-activations in ``layout``."""
    if layout == "interleaved":
        return pre[..., 0::2], pre[..., 1::2]
    return pre.chunk(2, dim=-1)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float = SWIGLU_ALPHA,
                   limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """gpt-oss's gate: ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``."""
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def gated_hidden(gate: torch.Tensor, up: torch.Tensor, activation: str, alpha: float = SWIGLU_ALPHA,
                 limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """The hidden rows of a gated FFN from its gate and up halves."""
    if activation == "clamped_swiglu":
        return clamped_swiglu(gate, up, alpha, limit)
    return ACTIVATIONS[activation](gate) * up


def expert_ffn(h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, activation: str, gated: bool,
               gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
               gate_up_layout: str = "concatenated", swiglu_alpha: float = SWIGLU_ALPHA,
               swiglu_limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """``down @ act(gate) * up + down_bias`` (gated: gate and up rows of ``gate_up`` in
    ``gate_up_layout``) or ``down @ act(up @ h) + down_bias`` for rows ``h``, ``gate_up_bias``
    added to ``gate_up @ h`` before the activation."""
    pre = h @ gate_up.t()
    if gate_up_bias is not None:
        pre = pre + gate_up_bias
    if gated:
        gate, up = split_gate_up(pre, gate_up_layout)
        hidden = gated_hidden(gate, up, activation, swiglu_alpha, swiglu_limit)
    else:
        hidden = ACTIVATIONS[activation](pre)
    out = hidden @ down.t()
    return out if down_bias is None else out + down_bias


def moe_experts(x: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                weights: torch.Tensor, activation: str = "silu", gated: bool = True,
                expert_scale: torch.Tensor | None = None, gate_up_bias: torch.Tensor | None = None,
                down_bias: torch.Tensor | None = None, gate_up_layout: str = "concatenated",
                swiglu_alpha: float = SWIGLU_ALPHA, swiglu_limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * s[e] * FFN_e(x[t])`` with ``e = indices[t, j]`` (the FFN of
    :func:`expert_ffn`, its biases included), in fp32 (float64 for float64 inputs), rounded to
    x's dtype; differentiable through autograd. Slots whose expert is out of range contribute nothing."""
    dtype = accumulation_dtype(x, gate_up, down, weights, expert_scale, gate_up_bias, down_bias)
    out = torch.zeros(x.shape, dtype=dtype, device=x.device)
    num_experts = gate_up.shape[0]
    for e in range(num_experts):
        tokens, slots = (indices == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        y = expert_ffn(x[tokens].to(dtype), gate_up[e].to(dtype), down[e].to(dtype), activation, gated,
                       None if gate_up_bias is None else gate_up_bias[e].to(dtype),
                       None if down_bias is None else down_bias[e].to(dtype), gate_up_layout, swiglu_alpha,
                       swiglu_limit)
        coef = weights[tokens, slots].to(dtype)
        if expert_scale is not None:
            coef = coef * expert_scale[e].to(dtype)
        out = out.index_add(0, tokens, coef[:, None] * y)
    return out.to(x.dtype)
