"""Scaled dot-product attention through the fastest library installed.

One place chooses: flash-attn, then xformers, for half-precision CUDA tensors when they are
installed; PyTorch's ``scaled_dot_product_attention`` otherwise (CPU, fp32, or neither
library present). ``python -m astrea.info`` reports the choice.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch
import torch.nn.functional as F

from astrea._validation import check_same_device, check_tensor

BACKENDS = ("flash-attn", "xformers", "sdpa")
_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _installed(module: str) -> bool:
    """True when ``module`` imports (an installed but broken build counts as absent)."""
    if importlib.util.find_spec(module) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def attention_backend(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16) -> str:
    """The library :func:`attention` uses for tensors of ``device`` and ``dtype``."""
    device = torch.device(device)
    if device.type == "cuda" and dtype in _HALF:
        if _installed("flash_attn"):
            return "flash-attn"
        if _installed("xformers"):
            return "xformers"
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` per head.

    Args:
        q: ``[B, H, Lq, d]``.
        k, v: ``[B, H, Lk, d]``, same dtype and device as ``q``.
        causal: query ``i`` sees keys ``j <= i + (Lk - Lq)`` (bottom-right aligned, which is
            the usual mask when ``Lq == Lk``).

    Returns ``[B, H, Lq, d]``.
    """
    op = "attention"
    check_tensor(op, "q", q, ndim=4)
    check_tensor(op, "k", k, ndim=4, dtypes=(q.dtype,))
    check_tensor(op, "v", v, ndim=4, dtypes=(q.dtype,))
    check_same_device(op, q=q, k=k, v=v)
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: expected q [B,H,Lq,d] and k, v [B,H,Lk,d]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"{op}: causal attention needs Lq <= Lk; got Lq={q.shape[2]}, Lk={k.shape[2]}")
    backend = attention_backend(q.device, q.dtype)
    if backend == "flash-attn":
        from flash_attn import flash_attn_func

        # flash-attn aligns the causal mask bottom-right, as documented above.
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)
    if backend == "xformers":
        from xformers.ops import fmha

        bias = fmha.attn_bias.LowerTriangularFromBottomRightMask() if causal else None
        out = fmha.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)
    if causal and q.shape[2] != k.shape[2]:
        lq, lk = q.shape[2], k.shape[2]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
