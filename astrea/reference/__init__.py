"""Plain-PyTorch oracles of every op: the truth the kernels are tested against, and the
CPU path of ops with no CPU kernel. Written for clarity, in fp32 (or the input's
precision where the contract says so), never for speed."""

from astrea.reference.moco import queue_enqueue_
from astrea.reference.router import router_topk, router_topk_backward

__all__ = ["queue_enqueue_", "router_topk", "router_topk_backward"]
