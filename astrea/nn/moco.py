"""Momentum contrast (MoCo) with a queue of negatives, on the fused astrea ops."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from astrea.ops.moco import moco_infonce, queue_enqueue_


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """The keys of every rank stacked in rank order, ``[world_size * B, D]``; ``keys`` itself
    when no process group is initialised.

    Uses ``all_gather_into_tensor`` (one collective, no list of tensors), which NCCL and
    gloo both implement. Every rank must pass the same ``B``. No gradient flows back.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    keys = keys.detach().contiguous()
    gathered = keys.new_empty((dist.get_world_size() * keys.shape[0], keys.shape[1]))
    dist.all_gather_into_tensor(gathered, keys)
    return gathered


class _RowGradients(torch.autograd.Function):
    """Per-row losses whose gradients w.r.t. ``q`` and ``k`` were computed already: row i's
    loss depends on ``q_i``, ``k_i`` and the queue alone, so its gradient for an incoming
    ``grad_loss_i`` is ``grad_loss_i`` times the gradient for 1."""

    @staticmethod
    def forward(ctx, q, k, loss, unit_grad_q, unit_grad_k):
        ctx.save_for_backward(unit_grad_q, unit_grad_k)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        unit_grad_q, unit_grad_k = ctx.saved_tensors
        scale = grad_loss[:, None]
        grad_q = (scale * unit_grad_q).to(unit_grad_q.dtype) if ctx.needs_input_grad[0] else None
        grad_k = (scale * unit_grad_k).to(unit_grad_k.dtype) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, None, None, None


def _loss_before_enqueue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE loss of ``q``, ``k`` against ``queue``, differentiable w.r.t. ``q`` and ``k``
    without keeping ``queue`` for the backward.

    The backward of :func:`moco_infonce` reads the queue again (it recomputes ``q . queue``),
    and the enqueue after the loss overwrites rows of the queue in place. Instead of a copy
    of the whole ``[K, D]`` queue, the gradients of each row's loss are computed here, while
    the queue is intact, and saved: ``[B, D]`` each, what the backward needs. The work is
    the same (the backward's pass over the queue runs now instead of later); the gradients
    are the op's, scaled by the incoming gradient of each row (exactly so for the mean over
    a power-of-two batch, else within a rounding)."""
    q_in = q.detach().requires_grad_(q.requires_grad)
    k_in = k.detach().requires_grad_(k.requires_grad)
    inputs = [t for t in (q_in, k_in) if t.requires_grad]
    with torch.enable_grad():
        rows = moco_infonce(q_in, k_in, queue, temperature, reduction="none")
        grads = torch.autograd.grad(rows.sum(), inputs)
    grads = dict(zip((id(t) for t in inputs), grads))
    unit_grad_q, unit_grad_k = grads.get(id(q_in)), grads.get(id(k_in))  # None: no gradient wanted
    return _RowGradients.apply(q, k, rows.detach(), unit_grad_q, unit_grad_k).mean()


class MomentumContrast(nn.Module):
    """InfoNCE against a momentum queue of negatives, and the EMA of the key encoder.

    One training step::

        moco = MomentumContrast(dim=256)
        q = online_encoder(x_query)                 # [B, dim], requires grad
        with torch.no_grad():
            moco.momentum_update(online_encoder, key_encoder)
            k = key_encoder(x_key)                  # [B, dim]
        loss = moco(q, k)                           # scalar; enqueues the keys
        loss.backward()

    ``forward(q, k)`` L2-normalises ``q`` and ``k`` (pass ``normalize=False`` when the
    encoders already do), computes the loss of ``q`` against its positive ``k`` and the
    queue with :func:`astrea.ops.moco_infonce` (fused: nothing of size ``B x K`` is
    allocated), then gathers the keys of all ranks (``torch.distributed``, when a
    process group is initialised) and writes them into the queue in rank order. The
    loss always uses the queue as it was before this call's keys went in, its backward
    included: the gradients w.r.t. ``q`` and ``k`` are computed in ``forward``, before the
    enqueue, and kept (``[B, D]`` each), so no copy of the queue is made. ``k`` gets a
    gradient only if it requires one (MoCo's key encoder does not). The loss supports one
    backward (no double backward).

    Args:
        dim: feature width ``D``.
        queue_size: ``K``, the number of negatives; must be at least
            ``world_size * batch`` (one step's gathered keys).
        momentum: EMA factor ``m`` of :meth:`momentum_update` (``target = m * target + (1 - m) * online``).
        temperature: ``T`` of the logits ``q.key / T``; the initial value when learnable.
        learnable_temperature: learn ``log T`` as a parameter (CLIP style).
        normalize: L2-normalise ``q`` and ``k`` in ``forward``.

    State: the buffers ``queue`` (``[K, D]`` fp32, L2-normalised random rows at init) and
    ``ptr`` (1-element int64, the next row to write) are in ``state_dict``. ``q`` and
    ``k`` are cast to the queue's dtype (fp32) for the loss.
    """

    def __init__(self, dim: int, queue_size: int = 65536, momentum: float = 0.999, temperature: float = 0.07,
                 learnable_temperature: bool = False, normalize: bool = True):
        super().__init__()
        if dim <= 0 or queue_size <= 0:
            raise ValueError(f"MomentumContrast: dim and queue_size must be > 0; got dim={dim}, queue_size={queue_size}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"MomentumContrast: momentum must be in [0, 1]; got {momentum}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"MomentumContrast: temperature must be a finite number > 0; got {temperature}")
        self.dim = dim
        self.queue_size = queue_size
        self.momentum = momentum
        self.normalize = normalize
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))
        if learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self.register_parameter("log_temperature", None)
            self.fixed_temperature = temperature

    @property
    def temperature(self) -> float:
        if self.log_temperature is None:
            return self.fixed_temperature
        return float(self.log_temperature.detach().exp())

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Mean InfoNCE loss of ``q`` ``[B, dim]`` against ``k`` ``[B, dim]`` and the queue; then enqueues ``k``."""
        if q.dim() != 2 or q.shape[1] != self.dim or k.shape != q.shape:
            raise ValueError(f"MomentumContrast: q and k must both be [B, {self.dim}]; "
                             f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
        q = q.to(self.queue.dtype)
        k = k.to(self.queue.dtype)
        if self.normalize:
            q = F.normalize(q, dim=1)
            k = F.normalize(k, dim=1)
        if self.log_temperature is None:
            temperature = self.fixed_temperature
        else:
            # q / T is differentiable in T; the op then runs at temperature 1.
            q = q / self.log_temperature.exp()
            temperature = 1.0
        needs_backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        if needs_backward:
            loss = _loss_before_enqueue(q, k, self.queue, temperature)
        else:
            loss = moco_infonce(q, k, self.queue, temperature)
        with torch.no_grad():
            queue_enqueue_(self.queue, self.ptr, gather_keys(k.detach()))
        return loss

    @torch.no_grad()
    def momentum_update(self, online: nn.Module, target: nn.Module) -> None:
        """EMA of the key encoder: ``target_p = m * target_p + (1 - m) * online_p`` for every parameter pair."""
        online_params = list(online.parameters())
        target_params = list(target.parameters())
        if len(online_params) != len(target_params):
            raise ValueError(f"MomentumContrast.momentum_update: online has {len(online_params)} parameters, "
                             f"target has {len(target_params)}; they must be the same architecture")
        for index, (o, t) in enumerate(zip(online_params, target_params)):
            if o.shape != t.shape or o.dtype != t.dtype or o.device != t.device:
                raise ValueError(f"MomentumContrast.momentum_update: parameter {index} differs: online "
                                 f"{tuple(o.shape)} {o.dtype} on {o.device}, target {tuple(t.shape)} {t.dtype} on {t.device}")
        if target_params:
            torch._foreach_lerp_(target_params, online_params, 1.0 - self.momentum)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, queue_size={self.queue_size}, momentum={self.momentum}, "
                f"temperature={self.temperature:.4g}, learnable_temperature={self.log_temperature is not None}")
