"""Plain-PyTorch oracles of every op: the truth the kernels are tested against, and the
CPU path of ops with no CPU kernel. Written for clarity, in fp32 (or the input's
precision where the contract says so), never for speed."""

from astrea.reference.dense_combine import combine_residual, dense_weighted_combine
from astrea.reference.moco import queue_enqueue_
from astrea.reference.residual import stochastic_residual

__all__ = ["combine_residual", "dense_weighted_combine", "queue_enqueue_", "stochastic_residual"]
