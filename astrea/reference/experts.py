"""Reference of the grouped expert FFNs: every routing slot through its expert, one by one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from astrea._validation import accumulation_dtype

# The activations of the experts, applied to the gate half of a gated FFN (or to the whole
# up projection of a plain one).
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def expert_ffn(h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, activation: str, gated: bool):
    """``down @ act(gate) * up`` (gated: ``gate_up`` = [gate; up] rows) or ``down @ act(up @ h)`` for rows ``h``."""
    pre = h @ gate_up.t()
    if gated:
        gate, up = pre.chunk(2, dim=-1)
        hidden = ACTIVATIONS[activation](gate) * up
    else:
        hidden = ACTIVATIONS[activation](pre)
    return hidden @ down.t()


def moe_experts(x: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                weights: torch.Tensor, activation: str = "silu", gated: bool = True,
                expert_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * s[e] * FFN_e(x[t])`` with ``e = indices[t, j]``, in fp32
    (float64 for float64 inputs), rounded to x's dtype; differentiable through autograd.
    Slots whose expert is out of range contribute nothing."""
    dtype = accumulation_dtype(x, gate_up, down, weights, expert_scale)
    out = torch.zeros(x.shape, dtype=dtype, device=x.device)
    num_experts = gate_up.shape[0]
    for e in range(num_experts):
        tokens, slots = (indices == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        y = expert_ffn(x[tokens].to(dtype), gate_up[e].to(dtype), down[e].to(dtype), activation, gated)
        coef = weights[tokens, slots].to(dtype)
        if expert_scale is not None:
            coef = coef * expert_scale[e].to(dtype)
        out = out.index_add(0, tokens, coef[:, None] * y)
    return out.to(x.dtype)
