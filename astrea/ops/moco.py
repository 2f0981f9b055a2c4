"""Momentum-queue contrast ops (kernels in the compiled extension astrea._C).

Logits of a query ``q_i`` are ``[q_i . k_i, q_i . queue_0, ..., q_i . queue_{K-1}] / T``:
the positive key first, then the queue of negatives (MoCo, He et al. 2020). The queue
is a buffer: no op returns a gradient for it. Inputs share one dtype (fp32, fp16 or
bf16; float64 on CPU, for gradcheck); logits and losses are fp32 (float64 for float64).

On CUDA the dtype picks the arithmetic of the q . queue tiles (:data:`CUDA_TILE_MATH`):
fp32 inputs use fp32 FMA on the CUDA cores, so fp32 results never silently become TF32;
fp16 and bf16 inputs use tensor cores (wmma 16x16x16, fp32 accumulation, sm_80+), where
the products of the inputs are exact. In the fused loss's backward the softmax
probabilities are rounded to the input dtype before they multiply the queue on the tensor
cores (relative error <= 2^-9 for bf16, 2^-12 for fp16); sums stay fp32. The CPU kernel
computes in fp32 (float64 for float64) throughout: it streams the queue in chunks, each
scored by one GEMM of the BLAS torch links (csrc/cpu/moco.cpp).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch

from astrea import _backend, _extension, reference
from astrea._blas import single_thread_blas
from astrea._validation import (FLOAT_DTYPES, accumulation_dtype, check_choice, check_same_device, check_size,
                                check_tensor)

REDUCTIONS = ("mean", "sum", "none")
# How the CUDA kernels compute the q . queue tiles, by input dtype (csrc/cuda/moco_kernels.cuh).
CUDA_TILE_MATH = {
    torch.float32: "fp32 FMA (no TF32)",
    torch.float16: "tensor cores (wmma, fp32 accumulation)",
    torch.bfloat16: "tensor cores (wmma, fp32 accumulation)",
}
# float64 runs on the CPU kernel only; it exists so that gradcheck can test that kernel.
_CONTRAST_DTYPES = {"cpu": FLOAT_DTYPES + (torch.float64,), "cuda": FLOAT_DTYPES}
_TILES = "; ".join(f"{str(dtype).removeprefix('torch.')}: {math}" for dtype, math in CUDA_TILE_MATH.items())
LOGITS_SPEC = _backend.declare_op(
    "moco_logits", kernel="extension", cpu_kernel="moco_logits", dtypes=_CONTRAST_DTYPES,
    supports={"extension": f"CUDA tiles {_TILES}; CPU: BLAS GEMM per queue chunk"})
INFONCE_SPEC = _backend.declare_op(
    "moco_infonce", kernel="extension", cpu_kernel="moco_infonce", dtypes=_CONTRAST_DTYPES,
    supports={"extension": "streams the queue with an online log-sum-exp; memory O(N*D + K*D)"})
ENQUEUE_SPEC = _backend.declare_op(
    "queue_enqueue_", kernel="extension", cpu_kernel="queue_enqueue_",
    supports={"extension": "in place, wraps around; CUDA reads ptr on the device (no sync)"})


def _check_contrast_args(op: str, q, k, queue, temperature) -> torch.device:
    spec = _backend.OPS[op]
    for name, value in (("q", q), ("k", k), ("queue", queue)):
        spec.check_tensor(name, value, ndim=2)
    device = check_same_device(op, q=q, k=k, queue=queue)
    if q.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"{op}: q must be [N, D] with N > 0 and D > 0; got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape {tuple(q.shape)}; got shape {tuple(k.shape)}")
    check_size(op, "queue", queue, 1, q.shape[1], "q.shape[1]")
    if queue.shape[0] == 0:
        raise ValueError(f"{op}: queue must have K > 0 rows; got shape {tuple(queue.shape)}")
    if k.dtype != q.dtype or queue.dtype != q.dtype:
        raise TypeError(f"{op}: q, k and queue must share one dtype; got {q.dtype}, {k.dtype}, {queue.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{op}: temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0; got {temperature}")
    return device


def moco_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo logits ``[N, 1 + K]`` in fp32: column 0 is ``q.k / T``, column ``1 + j`` is ``q.queue[j] / T``.

    Args:
        q: ``[N, D]`` queries. k: ``[N, D]`` positive keys. queue: ``[K, D]`` negatives.
        temperature: ``T > 0``.

    Differentiable with respect to ``q`` and ``k``. Materialises ``N x (1 + K)`` fp32
    values; for the loss use :func:`moco_infonce`, which never does.
    """
    device = _check_contrast_args("moco_logits", q, k, queue, temperature)
    if LOGITS_SPEC.choose(device) == "reference":
        return reference.moco_logits(q, k, queue, temperature)
    return torch.ops.astrea.moco_logits(q, k, queue, float(temperature))


def moco_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
                 reduction: str = "mean") -> torch.Tensor:
    """InfoNCE loss of :func:`moco_logits` with label 0 (the positive), fused.

    Equal to ``cross_entropy(moco_logits(q, k, queue, T), zeros(N), reduction=reduction)``,
    but computed by streaming over tiles of the queue with an online log-sum-exp: only
    the row log-sum-exp ``[N]`` is kept for backward, which recomputes the tiles. Memory
    is O(N*D + K*D); nothing of size N x K is allocated. Returns an fp32 scalar
    (``"mean"``, ``"sum"``) or ``[N]`` (``"none"``); differentiable w.r.t. ``q`` and ``k``
    (once: no double backward).
    """
    op = "moco_infonce"
    check_choice(op, "reduction", reduction, REDUCTIONS)
    device = _check_contrast_args(op, q, k, queue, temperature)
    if INFONCE_SPEC.choose(device) == "reference":
        return reference.moco_infonce(q, k, queue, temperature, reduction)
    loss, _ = torch.ops.astrea.moco_infonce(q, k, queue, float(temperature))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` that tensor ``t`` spans in memory (empty for no elements)."""
    if t.numel() == 0:
        return 0, 0
    item = t.element_size()
    extents = [(size - 1) * stride * item for size, stride in zip(t.shape, t.stride())]
    start = t.data_ptr()
    return start + sum(e for e in extents if e < 0), start + sum(e for e in extents if e > 0) + item


def _check_no_overlap(op: str, **tensors: torch.Tensor) -> None:
    """No two of ``tensors`` share memory: in-place writes through one would change another
    while it is read. Judged on the byte ranges they span (views of one storage that only
    interleave count as overlapping)."""
    if torch.compiler.is_compiling():  # fake tensors have no memory
        return
    items = list(tensors.items())
    for i, (name_a, a) in enumerate(items):
        for name_b, b in items[i + 1:]:
            if a.device != b.device:
                continue
            (start_a, end_a), (start_b, end_b) = _byte_range(a), _byte_range(b)
            if start_a < end_b and start_b < end_a:
                raise ValueError(f"{op}: {name_b} overlaps the memory of {name_a}; pass a tensor of its own "
                                 f"(e.g. {name_b}.clone())")


def queue_enqueue_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Ring-buffer write: ``queue[(ptr + i) % K] = keys[i]`` for every key, then ``ptr += B (mod K)``.

    Args:
        queue: ``[K, D]`` contiguous floating buffer, written in place.
        ptr: 1-element int64 tensor on the queue's device (a buffer, so it lives in
            ``state_dict``), advanced in place. On CUDA it is read on the device: no sync.
        keys: ``[B, D]`` with ``B <= K``, fp32, fp16 or bf16 (cast to the queue's dtype).

    Raises:
        ValueError: among the shape checks, when ``ptr`` or ``keys`` shares memory with the
            queue (or with each other): the write would read what it overwrites.
    """
    op = "queue_enqueue_"
    ENQUEUE_SPEC.check_tensor("queue", queue, ndim=2)
    check_tensor(op, "ptr", ptr, dtypes=(torch.int64,))
    ENQUEUE_SPEC.check_tensor("keys", keys, ndim=2)
    device = check_same_device(op, queue=queue, ptr=ptr, keys=keys)
    if ptr.numel() != 1:
        raise ValueError(f"{op}: ptr must hold exactly 1 element; got shape {tuple(ptr.shape)}")
    if queue.shape[0] == 0:
        raise ValueError(f"{op}: queue must have at least one row; got shape {tuple(queue.shape)}")
    if not queue.is_contiguous():
        raise ValueError(f"{op}: queue must be contiguous (it is written in place)")
    check_size(op, "keys", keys, 1, queue.shape[1], "queue.shape[1]")
    if keys.shape[0] > queue.shape[0]:
        raise ValueError(f"{op}: keys has {keys.shape[0]} rows, more than the queue's {queue.shape[0]}")
    _check_no_overlap(op, queue=queue, ptr=ptr, keys=keys)
    if ENQUEUE_SPEC.choose(device) == "reference":
        reference.queue_enqueue_(queue, ptr, keys)
    else:
        torch.ops.astrea.queue_enqueue_(queue, ptr, keys)


if _extension.available():

    @torch.library.register_fake("astrea::queue_enqueue_")
    def _queue_enqueue_fake(queue, ptr, keys):
        return None

    @torch.library.register_fake("astrea::moco_logits")
    def _moco_logits_fake(q, k, queue, temperature):
        return q.new_empty((q.shape[0], 1 + queue.shape[0]), dtype=accumulation_dtype(q))

    @torch.library.register_fake("astrea::moco_infonce")
    def _moco_infonce_fake(q, k, queue, temperature):
        acc = accumulation_dtype(q)
        return q.new_empty(q.shape[0], dtype=acc), q.new_empty(q.shape[0], dtype=acc)

    @torch.library.register_fake("astrea::moco_infonce_backward")
    def _moco_infonce_backward_fake(grad_loss, q, k, queue, lse, temperature):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    def _setup_contrast(ctx, inputs, output):
        q, k, queue, temperature = inputs
        ctx.temperature = temperature
        ctx.save_for_backward(q, k, queue)

    def _moco_logits_backward(ctx, grad):
        q, k, queue = ctx.saved_tensors
        inv_t = 1.0 / ctx.temperature
        positive = grad[:, :1] * inv_t
        grad_q = grad_k = None
        if ctx.needs_input_grad[0]:
            # The product sums over the K queue keys: on one BLAS thread it sums in one order.
            with single_thread_blas() if grad.device.type == "cpu" else contextlib.nullcontext():
                negatives = (grad[:, 1:] * inv_t) @ queue.to(grad.dtype)
            grad_q = (positive * k.to(grad.dtype) + negatives).to(q.dtype)
        if ctx.needs_input_grad[1]:
            grad_k = (positive * q.to(grad.dtype)).to(k.dtype)
        return grad_q, grad_k, None, None

    torch.library.register_autograd("astrea::moco_logits", _moco_logits_backward, setup_context=_setup_contrast)

    def _setup_infonce(ctx, inputs, output):
        q, k, queue, temperature = inputs
        ctx.temperature = temperature
        ctx.save_for_backward(q, k, queue, output[1])

    def _moco_infonce_backward(ctx, grad_loss, grad_lse):
        # lse is an internal statistic, never returned by astrea.ops.moco_infonce: grad_lse is ignored.
        q, k, queue, lse = ctx.saved_tensors
        grad_q, grad_k = torch.ops.astrea.moco_infonce_backward(
            grad_loss.contiguous(), q, k, queue, lse, ctx.temperature)
        return (grad_q if ctx.needs_input_grad[0] else None,
                grad_k if ctx.needs_input_grad[1] else None, None, None)

    torch.library.register_autograd("astrea::moco_infonce", _moco_infonce_backward, setup_context=_setup_infonce)
