"""The public functional API of astrea: torch.library ops with validation, fake (meta)
implementations, autograd and per-device dispatch (see :mod:`astrea._backend`)."""

from astrea.ops.combine import weighted_combine
from astrea.ops.combine_residual import combine_residual
from astrea.ops.dense_combine import dense_weighted_combine
from astrea.ops.dispatch import Dispatch, moe_dispatch, permute
from astrea.ops.experts import moe_experts
from astrea.ops.moco import moco_infonce, moco_logits, queue_enqueue_
from astrea.ops.residual import stochastic_residual
from astrea.ops.router import RouterOutput, load_balancing_loss, router_topk, router_z_loss

__all__ = [
    "combine_residual",
    "dense_weighted_combine",
    "Dispatch",
    "load_balancing_loss",
    "moco_infonce",
    "moco_logits",
    "moe_dispatch",
    "moe_experts",
    "permute",
    "queue_enqueue_",
    "router_topk",
    "router_z_loss",
    "RouterOutput",
    "stochastic_residual",
    "weighted_combine",
]
