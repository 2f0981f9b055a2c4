"""Plain-PyTorch oracles of every op: the truth the kernels are tested against, and the
CPU path of ops with no CPU kernel. Written for clarity, in fp32 (or the input's
precision where the contract says so), never for speed."""

from astrea.reference.moco import moco_infonce, moco_logits, queue_enqueue_

__all__ = ["moco_infonce", "moco_logits", "queue_enqueue_"]
