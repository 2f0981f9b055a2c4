"""Data-parallel training on PyTorch's own distributed stack (``torchrun`` + DDP).

astrea has no launcher of its own: ``torchrun`` starts one process per device and sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_from_env` joins that process group (gloo on CPU, nccl on CUDA). Without those
variables every helper here answers for a single process, so the same training code
runs unchanged with and without ``torchrun``.

What is global and what is per rank:

* global: the parameters (DDP averages the gradients); the router's token counts and
  probability sums (:func:`all_reduce_router_stats`, before the balancing loss and the
  selection-bias update); in-batch contrastive negatives (:func:`gather_batch`); batch-norm
  statistics (:func:`global_batchnorm`); the MoCo queue (``MomentumContrast`` gathers the keys
  of every rank before the enqueue); checkpoints (one file, written by rank 0, holding every
  rank's RNG state: :func:`rng_states`);
* per rank: the data shard (:func:`shard_batch`, :func:`distributed_sampler`), the random
  stream (:func:`seed_rank`), the activations and the per-sample losses.

Expert parallelism (:mod:`astrea.distributed.expert_parallel`): :class:`ExpertParallelMoE`
shards a MoE layer's experts over the EP dimension of a ``DP x EP`` world
(:func:`expert_parallel_layout`), :func:`reduce_gradients` replaces DDP for such a model, and
:func:`save_expert_parallel` / :func:`load_expert_parallel` keep one checkpoint with every expert.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import os
from typing import Callable, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from astrea.distributed.expert_parallel import (  # noqa: F401  (re-exported)
    ExpertParallelLayout, ExpertParallelMoE, expert_parallel_layout, full_state_dict, load_expert_parallel,
    reduce_gradients, save_expert_parallel)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that logs, draws progress bars and plots, and writes checkpoints."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when the environment carries a torchrun (or equivalent) rendezvous."""
    return all(name in os.environ for name in _TORCHRUN_VARS)


def init_from_env(device: str | torch.device | None = None, *, timeout_s: float = 600.0) -> torch.device:
    """Joins the process group that ``torchrun`` describes in the environment; returns this rank's device.

    ``device`` None picks ``cuda:$LOCAL_RANK`` when CUDA is available, else the CPU. The
    backend follows the device: nccl for CUDA, gloo for the CPU. Outside torchrun (no
    rendezvous variables) nothing is initialised and the device is returned as is, so a
    single-process run needs no special case. Calling it again is harmless.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"init_from_env: device must be a CUDA device or the CPU; got {device}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not launched_by_torchrun() or dist.is_initialized():
        return device
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return device


def shutdown() -> None:
    """Leaves the process group (a no-op without one); call it at the end of a torchrun job."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Waits for every rank (a no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def rank_seed(seed: int, for_rank: int | None = None) -> int:
    """The seed of rank ``for_rank`` (default: this rank), derived from the run's one ``seed``:
    distinct per rank, reproducible, and equal to ``seed`` on rank 0 (so a 1-process run draws
    what rank 0 of a larger run draws). Use it for per-sample randomness (augmentation, dropout);
    the parameters must instead be initialised from ``seed`` itself, identically on every rank."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"rank_seed: seed must be an int; got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"rank_seed: seed must be >= 0; got {seed}")
    for_rank = rank() if for_rank is None else for_rank
    # a large odd multiplier (golden ratio, 64 bits) spreads neighbouring ranks far apart
    return (seed + for_rank * 0x9E3779B97F4A7C15) % (2**63)


def seed_rank(seed: int) -> int:
    """Seeds torch's generators (CPU and CUDA) for this rank with :func:`rank_seed`; returns the seed."""
    seed = rank_seed(seed)
    torch.manual_seed(seed)
    return seed


def rng_states() -> list[dict[str, torch.Tensor]]:
    """Every rank's torch RNG states (``"cpu"``, and ``"cuda"`` for the current device when CUDA
    is available), indexed by rank, on every rank: what a checkpoint written by rank 0 must hold
    for each rank to resume its own random stream."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if not is_distributed():
        return [state]
    states: list = [None] * world_size()
    dist.all_gather_object(states, state)
    return [{name: value.cpu() for name, value in s.items()} for s in states]


def set_rng_states(states: list[dict[str, torch.Tensor]]) -> None:
    """Restores this rank's entry of :func:`rng_states` (a resumed run must keep the world size)."""
    if len(states) != world_size():
        raise ValueError(f"set_rng_states: states must hold one entry per rank ({world_size()}); got {len(states)} "
                         f"(resume with the world size the checkpoint was written with)")
    state = states[rank()]
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def shard_batch(batch: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """This rank's contiguous part of a global batch along ``dim`` (the whole batch in a single
    process): sharding the same global draw on every rank is a distributed sampler that needs
    no epoch state, so a resumed run draws exactly what an uninterrupted one would. The size
    must divide evenly, so that DDP's average of per-rank means is the global mean."""
    world = world_size()
    if batch.shape[dim] % world:
        raise ValueError(f"shard_batch: the global batch must split evenly over {world} ranks; got "
                         f"{batch.shape[dim]} along dim {dim} of shape {tuple(batch.shape)}")
    return batch.tensor_split(world, dim)[rank()]


def main_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: ``fn`` runs on the main rank only and returns None elsewhere (logging, plots,
    checkpoint writes). It does not synchronise: follow a write with :func:`barrier` before
    other ranks read it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main() else None

    return wrapper


def distributed_sampler(dataset, *, shuffle: bool = True, seed: int = 0, drop_last: bool = True):
    """A :class:`~torch.utils.data.DistributedSampler` giving this rank its shard of ``dataset``
    (every rank sees a different ``len(dataset) // world_size`` samples per epoch), or None in a
    single process (the DataLoader's own ``shuffle`` then applies). Call ``sampler.set_epoch(epoch)``
    at the start of each epoch so the shuffle changes from epoch to epoch.

    The global batch of step s is the union of the ranks' step-s batches: with a per-rank batch
    size B it holds the same samples as a 1-process batch of ``B * world_size`` over the same
    permutation."""
    if not is_distributed():
        return None
    return torch.utils.data.DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle,
                                               seed=seed, drop_last=drop_last)


def wrap_ddp(model: nn.Module, device: torch.device | None = None, *, sync_buffers: bool = True,
             **ddp_kwargs) -> nn.Module:
    """``model`` wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` in a process group,
    else returned as is. ``unwrap(model)`` gives back the module (for state dicts and attributes).
    Keep the wrapper referenced until ``backward`` has run (its reducer averages the gradients),
    and rebuild it whenever the set of trainable parameters changes (a new alignment stage):
    DDP fixes its gradient buckets at construction.

    ``sync_buffers=False`` skips DDP's copy of rank 0's buffers before every forward, for models
    whose buffers are updated from global quantities only (queues filled with gathered keys,
    biases moved by all-reduced loads, :class:`GlobalBatchNorm` statistics): they are equal on
    every rank already, and a MoCo queue is large."""
    if not is_distributed():
        return model
    device_ids = [device.index] if device is not None and device.type == "cuda" else None
    if not sync_buffers:  # the option's name changed in torch 2.13
        parameters = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        ddp_kwargs["forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"] = False
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the module itself when it is not wrapped)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The average over the ranks of ``x`` (a detached copy; ``x`` itself in a single process): for
    logging a global value, such as the loss of the global batch from the ranks' per-rank means."""
    x = x.detach().clone()
    if is_distributed():
        dist.all_reduce(x)
        x /= world_size()
    return x


def as_global_mean(local_mean: torch.Tensor, local_count: int | torch.Tensor) -> torch.Tensor:
    """Rescales a mean over a rank-dependent number of items (the answer tokens of a masked
    language-model loss) so that DDP's gradient average, and :func:`mean_over_ranks` of the
    result, give the mean over all ranks' items: ``local_mean * local_count * world / total_count``.
    ``local_mean`` itself in a single process."""
    if not is_distributed():
        return local_mean
    counts = torch.as_tensor(local_count, dtype=torch.float64, device=local_mean.device).reshape(1).clone()
    total = counts.clone()
    dist.all_reduce(total)
    return local_mean * (counts * world_size() / total).to(local_mean.dtype).squeeze(0)


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) whose backward sums the gradient over the ranks."""
    from torch.distributed import _functional_collectives as funcol  # collectives with autograd

    return funcol.wait_tensor(funcol.all_reduce(x, "sum", dist.group.WORLD))


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over the global batch, on any device (gloo on the CPU included, where
    :class:`torch.nn.SyncBatchNorm` refuses to run). In training the per-channel mean and variance
    are those of every rank's samples (sums all-reduced, differentiable), so a data-parallel run
    normalises exactly as one process over the global batch; outside a process group, or in eval,
    it is plain batch norm. Its state dict is a ``BatchNorm*d``'s. Made by :func:`global_batchnorm`."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm: input must be [N, C, ...]; got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1, *([1] * (x.dim() - 2)))
        local = x.float()
        count = x.numel() // x.shape[1] * world_size()
        mean = _sum_over_ranks(local.sum(dims)) / count
        centered = local - mean.reshape(shape)
        var = _sum_over_ranks(centered.square().sum(dims)) / count  # two passes: no cancellation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                unbiased = var * (count / max(count - 1, 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        out = centered * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out.to(x.dtype)


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces, in place, every ``BatchNorm1d/2d/3d`` inside ``module`` by a :class:`GlobalBatchNorm`
    with the same parameters and buffers (call it before :func:`wrap_ddp`); returns ``module``
    (or the replacement, when ``module`` itself is a batch norm)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        tensors = [*module.parameters(), *module.buffers()]
        replaced = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats, device=tensors[0].device if tensors else None)
        replaced.load_state_dict(module.state_dict())
        for name, parameter in module.named_parameters(recurse=False):
            getattr(replaced, name).requires_grad_(parameter.requires_grad)
        return replaced.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, global_batchnorm(child))
    return module


class RouterStats(NamedTuple):
    """Router statistics of the whole global batch (identical on every rank)."""

    counts: torch.Tensor  # [E] int64 routing slots per expert, summed over ranks
    prob_sums: torch.Tensor  # [E] fp32 per-expert score sums, summed over ranks; differentiable
    num_tokens: torch.Tensor  # 0-d int64 tokens over all ranks

    def load_balancing_loss(self, k: int) -> torch.Tensor:
        """The Switch balancing loss of :func:`astrea.ops.load_balancing_loss` over the global
        batch, for ``k`` experts per token: equal on every rank, and equal to the loss of a
        single process that routed the whole global batch."""
        from astrea.ops.router import RouterOutput, load_balancing_loss

        # load_balancing_loss reads only the counts, the sums, k (from the weights' shape) and
        # the token count given here, so weights, indices and lse are empty placeholders
        empty = self.prob_sums.new_empty(0, k)
        out = RouterOutput(weights=empty, indices=empty.int(), counts=self.counts, prob_sums=self.prob_sums,
                           lse=empty[:, 0])
        return load_balancing_loss(out, num_tokens=self.num_tokens)


def all_reduce_router_stats(counts: torch.Tensor, prob_sums: torch.Tensor, num_tokens: int) -> RouterStats:
    """Sums one router pass's per-expert ``counts`` [E], score sums ``prob_sums`` [E] and token
    count over the ranks.

    Use the sums for :meth:`RouterStats.load_balancing_loss` (or
    ``astrea.ops.load_balancing_loss(..., num_tokens=stats.num_tokens)``) and ``stats.counts``
    for the selection-bias updates (``TopKRouter.update_expert_bias``,
    ``AdaptiveWeightAllocator.update_bias``): every rank then sees the global load, as one
    process over the global batch would, and applies the same update.

    ``prob_sums`` stays differentiable: the all-reduce's backward sums the gradient over the
    ranks, which DDP's gradient averaging turns into exactly the 1-process gradient of the
    global loss. In a single process the local statistics come back (as int64 / fp32).
    """
    if counts.dim() != 1 or prob_sums.shape != counts.shape:
        raise ValueError(f"all_reduce_router_stats: counts and prob_sums must both be [E]; got shapes "
                         f"{tuple(counts.shape)} and {tuple(prob_sums.shape)}")
    totals = torch.cat([counts.to(torch.int64), torch.tensor([num_tokens], dtype=torch.int64, device=counts.device)])
    prob_sums = prob_sums.float()
    if is_distributed():
        dist.all_reduce(totals)
        prob_sums = _sum_over_ranks(prob_sums)
    return RouterStats(totals[:-1], prob_sums, totals[-1])


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order (the global batch, when each
    rank holds a contiguous shard), differentiable: the gradient of each rank's rows returns to
    that rank, summed over the ranks, so with DDP averaging a loss over the gathered batch
    (in-batch contrastive negatives) gets exactly its 1-process gradient. All ranks must pass
    the same shape. In a single process ``x`` itself."""
    if not is_distributed():
        return x
    from torch.distributed import _functional_collectives as funcol  # collectives with autograd

    return funcol.wait_tensor(funcol.all_gather_single(x.contiguous(), 0, dist.group.WORLD))


def global_router_stats(result) -> RouterStats:
    """:func:`all_reduce_router_stats` of a :class:`astrea.nn.RouterResult` or
    :class:`astrea.ops.RouterOutput` (this rank's tokens)."""
    return all_reduce_router_stats(result.counts, result.prob_sums, result.weights.shape[0])


def global_load_balancing_loss(result) -> torch.Tensor:
    """The global batch's Switch balancing loss from this rank's router ``result``
    (a :class:`astrea.nn.RouterResult` or :class:`astrea.ops.RouterOutput`)."""
    return global_router_stats(result).load_balancing_loss(result.weights.shape[1])
