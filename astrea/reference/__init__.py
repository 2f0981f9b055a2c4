"""Plain-PyTorch oracles of every op: the truth the kernels are tested against, and the
CPU path of ops with no CPU kernel. Written for clarity, in fp32 (or the input's
precision where the contract says so), never for speed."""

from astrea.reference.combine import sparse_combine_residual, weighted_combine, weighted_combine_backward
from astrea.reference.dense_combine import combine_residual, dense_weighted_combine
from astrea.reference.experts import moe_experts
from astrea.reference.dispatch import moe_dispatch, permute, permute_backward
from astrea.reference.moco import moco_infonce, moco_logits, queue_enqueue_
from astrea.reference.residual import stochastic_residual
from astrea.reference.router import router_topk, router_topk_backward

__all__ = [
    "combine_residual",
    "dense_weighted_combine",
    "moco_infonce",
    "moco_logits",
    "moe_dispatch",
    "moe_experts",
    "permute",
    "permute_backward",
    "queue_enqueue_",
    "router_topk",
    "router_topk_backward",
    "sparse_combine_residual",
    "stochastic_residual",
    "weighted_combine",
    "weighted_combine_backward",
]
