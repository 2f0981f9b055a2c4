"""Expert parallelism: the experts of a MoE layer sharded over a process group, token rows
moved to the rank that holds their expert by ``all_to_all_single`` and back.

Process-group layout (:func:`expert_parallel_layout`): the world of ``W = DP x EP`` ranks is a
``(dp, ep)`` device mesh (``init_device_mesh``), the EP dimension inner, so global rank
``r = dp_rank * EP + ep_rank`` and the ranks of one EP group are neighbours (one node, when EP
divides the GPUs per node). Along ``ep`` the ranks hold different experts: EP rank p holds experts
``[p * E/EP, (p + 1) * E/EP)`` of every :class:`ExpertParallelMoE`. Along ``dp`` the ranks hold
replicas of the same experts. Every other parameter (router, allocator, attention, embeddings)
is replicated on all W ranks. Each rank trains on its own shard of the global batch.

Gradients (:func:`reduce_gradients`, after ``backward``, before ``optimizer.step``): with each
rank's loss the mean over its own tokens, the global loss is the mean of the W ranks' losses.
A replicated parameter's gradient is then the sum of the W local gradients over the world,
divided by W (DDP's average). An expert's local gradient already holds the contributions of
every token of its EP group (the backward of the exchange brings them back), so it is summed
over its DP replicas only and divided by W too, not by DP.

What stays global: the router statistics for the balancing loss and the aux-loss-free bias
updates (``astrea.distributed.global_router_stats`` sums over the whole world, so every rank
applies the same update); checkpoints (:func:`save_expert_parallel`, one file holding every
expert, in the key layout of the unsharded :class:`~astrea.nn.SparseMoE`, loadable into any EP
size that divides E).
"""

from __future__ import annotations

import json
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from astrea import ops
from astrea.nn import GroupedExperts, SparseMoE
from astrea.nn.moe import route_tokens

CHECKPOINT_FORMAT = "astrea-expert-parallel-1"


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


class ExpertParallelLayout(NamedTuple):
    """Where this rank sits in a ``DP x EP`` world (see the module docstring).

    ``ep_group`` / ``dp_group`` are None in a single process (no exchange, no reduction).
    """

    dp_size: int
    ep_size: int
    dp_rank: int
    ep_rank: int
    ep_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None

    @property
    def world_size(self) -> int:
        return self.dp_size * self.ep_size


def expert_parallel_layout(ep_size: int) -> ExpertParallelLayout:
    """Splits the default process group into ``world / ep_size`` data-parallel replicas of
    ``ep_size`` expert-parallel ranks each, as the ``(dp, ep)`` mesh of ``init_device_mesh``
    (device type cuda under nccl, else cpu). Every rank must call it, in the same order as
    any other group creation. Without a process group only ``ep_size=1`` is valid."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"expert_parallel_layout: ep_size must be a positive int; got {ep_size!r}")
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else 1
    if world % ep_size:
        raise ValueError(f"expert_parallel_layout: the world of {world} ranks must split into groups of "
                         f"ep_size={ep_size} ranks (world % ep_size == 0)")
    if world == 1:
        return ExpertParallelLayout(1, 1, 0, 0, None, None)
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (world // ep_size, ep_size), mesh_dim_names=("dp", "ep"))
    ep_group, dp_group = mesh["ep"].get_group(), mesh["dp"].get_group()
    return ExpertParallelLayout(world // ep_size, ep_size, _group_rank(dp_group), _group_rank(ep_group),
                                ep_group, dp_group)


def _check_shardable(where: str, num_experts: int, ep_size: int) -> int:
    if num_experts % ep_size:
        raise ValueError(f"{where}: {num_experts} experts cannot be sharded over an expert-parallel group of "
                         f"{ep_size} ranks (num_experts % ep_size must be 0)")
    return num_experts // ep_size


def _all_to_all(rows: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    out = rows.new_empty(sum(output_splits), *rows.shape[1:])
    dist.all_to_all_single(out, rows.contiguous(), output_splits, input_splits, group=group)
    return out


class _ExchangeRows(torch.autograd.Function):
    """``all_to_all_single`` of token rows with uneven splits; the backward is the reverse
    exchange of the gradient rows (the splits swapped)."""

    @staticmethod
    def forward(ctx, rows, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return _all_to_all(rows, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _all_to_all(grad, input_splits, output_splits, ctx.group), None, None, None


class ExpertParallelMoE(nn.Module):
    """A :class:`~astrea.nn.SparseMoE` whose E stacked-weight experts are sharded over the
    expert-parallel group ``group`` of P ranks: this rank holds ``experts``, the E/P experts
    ``[p * E/P, (p + 1) * E/P)`` of its group rank p.

    Per forward, on every rank of the group at once: route this rank's tokens (the router is
    replicated), ``moe_dispatch`` over all E experts (the rows of the experts of rank q are then
    contiguous), exchange the per-expert row counts (``all_to_all_single`` of a ``[P, E/P]`` int64
    tensor; its values are read on the host, the one sync of the layer), send each rank the rows
    of its experts (``all_to_all_single`` with uneven splits, no padding to a capacity), run the
    local experts on :func:`~astrea.ops.moe_experts` (each received row is a token with one slot
    of weight 1), send the outputs back by the reverse exchange and sum each token's k outputs
    with its routing weights and the allocator's scale (:func:`~astrea.ops.weighted_combine`).
    Both exchanges are differentiable (their backward is the reverse exchange), so every rank
    must run the backward too. The result equals the unsharded layer's over the union of the
    group's tokens, up to rounding (the expert outputs are rounded to x's dtype before the
    weighted sum, which the fused single-process op does in fp32), and is deterministic.

    With P = 1 (``group`` None or of one rank) it runs as the unsharded layer, with no exchange.

    Args:
        experts: this rank's :class:`~astrea.nn.GroupedExperts`, ``num_experts / P`` of them.
        router: as for :class:`~astrea.nn.SparseMoE` (``.weights``, ``.indices`` over all E experts).
        num_experts: E, the experts of the whole layer (a multiple of P).
        allocator: optional module with a ``.scale [E]`` calibration over all E experts.
        group: the expert-parallel process group (``layout.ep_group``), None for no sharding.

    Attributes:
        rows_sent: after a forward, the number of token rows this rank sent to other ranks
            (each travels there and back in the forward, and again in the backward).
    """

    def __init__(self, experts: GroupedExperts, router: nn.Module, num_experts: int,
                 allocator: nn.Module | None = None, group: dist.ProcessGroup | None = None):
        super().__init__()
        if not isinstance(experts, GroupedExperts):
            raise TypeError(f"ExpertParallelMoE: experts must be a GroupedExperts; got {type(experts).__name__}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"ExpertParallelMoE: num_experts must be a positive int; got {num_experts!r}")
        ep_size = _group_size(group)
        local = _check_shardable("ExpertParallelMoE", num_experts, ep_size)
        if experts.num_experts != local:
            raise ValueError(f"ExpertParallelMoE: experts must hold num_experts / ep_size = {num_experts} / "
                             f"{ep_size} = {local} experts; got {experts.num_experts}")
        self.experts = experts
        self.router = router
        self.allocator = allocator
        self.num_experts = num_experts
        self.group = group
        self.ep_size = ep_size
        self.ep_rank = _group_rank(group)
        self.aux_loss: torch.Tensor | None = None
        self.rows_sent = 0

    @classmethod
    def from_sparse_moe(cls, moe: SparseMoE, group: dist.ProcessGroup | None = None) -> "ExpertParallelMoE":
        """This rank's shard of ``moe``, a :class:`~astrea.nn.SparseMoE` on :class:`~astrea.nn.GroupedExperts`
        built identically on every rank (same seed): copies of its experts ``[p * E/P, (p + 1) * E/P)``
        as new parameters; the router and the allocator are shared with ``moe``, not copied."""
        if not (isinstance(moe, SparseMoE) and isinstance(moe.experts, GroupedExperts)):
            experts = type(getattr(moe, "experts", None)).__name__
            raise TypeError(f"ExpertParallelMoE.from_sparse_moe: moe must be a SparseMoE on GroupedExperts; got "
                            f"{type(moe).__name__} with experts {experts}")
        full = moe.experts
        local = _check_shardable("ExpertParallelMoE.from_sparse_moe", full.num_experts, _group_size(group))
        first = _group_rank(group) * local
        shard = GroupedExperts(local, full.down.shape[1], full.down.shape[2], full.activation, full.gated)
        shard.to(device=full.down.device, dtype=full.down.dtype)
        with torch.no_grad():
            shard.gate_up.copy_(full.gate_up[first:first + local])
            shard.down.copy_(full.down[first:first + local])
        shard.gate_up.requires_grad_(full.gate_up.requires_grad)
        shard.down.requires_grad_(full.down.requires_grad)
        return cls(shard, moe.router, full.num_experts, moe.allocator, group)

    @property
    def first_expert(self) -> int:
        """The global index of this rank's first expert."""
        return self.ep_rank * self.experts.num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, routing, dispatch, scale = route_tokens(x, self.router, self.allocator, self.num_experts)
        self.aux_loss = getattr(routing, "aux_loss", None)
        if self.ep_size == 1:
            return self.experts(tokens, dispatch, routing.weights, scale).reshape(x.shape)
        local_experts = self.experts.num_experts
        send_counts = dispatch.expert_offsets.diff().view(self.ep_size, local_experts)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # [source rank, local expert]
        splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # the host sync
        send_splits, recv_splits = splits
        if sum(send_splits) != dispatch.sorted_token_ids.shape[0]:  # CUDA dispatch sets them apart, see moe_dispatch
            raise ValueError(f"ExpertParallelMoE: router indices must lie in [0, {self.num_experts}); "
                             f"{dispatch.sorted_token_ids.shape[0] - sum(send_splits)} routing slots are out of range")
        self.rows_sent = sum(send_splits) - send_splits[self.ep_rank]
        received = _ExchangeRows.apply(ops.permute(tokens, dispatch), recv_splits, send_splits, self.group)
        # The received rows come by source rank, then local expert: each is a token with one slot.
        row_experts = torch.arange(local_experts, device=x.device, dtype=torch.int32).repeat(self.ep_size)
        row_experts = row_experts.repeat_interleave(recv_counts.reshape(-1), output_size=received.shape[0])
        local_dispatch = ops.moe_dispatch(row_experts[:, None], local_experts)
        ones = torch.ones(received.shape[0], 1, device=x.device)
        expert_out = self.experts(received, local_dispatch, ones)
        returned = _ExchangeRows.apply(expert_out, send_splits, recv_splits, self.group)  # dispatch order
        return ops.weighted_combine(returned, routing.weights, dispatch, scale).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, ep_size={self.ep_size}, ep_rank={self.ep_rank}"


def _expert_parallel_modules(model: nn.Module) -> dict[str, ExpertParallelMoE]:
    return {name: module for name, module in model.named_modules() if isinstance(module, ExpertParallelMoE)}


def _expert_parameter_names(model: nn.Module) -> dict[str, ExpertParallelMoE]:
    """The name of every expert parameter of ``model``, with the layer that holds it."""
    names = {}
    for prefix, module in _expert_parallel_modules(model).items():
        for name, _ in module.experts.named_parameters():
            names[f"{prefix}.experts.{name}" if prefix else f"experts.{name}"] = module
    return names


def reduce_gradients(model: nn.Module, layout: ExpertParallelLayout) -> None:
    """Turns every rank's local gradients into those of the mean of the W ranks' losses; call
    it after ``backward`` and before ``optimizer.step`` (it replaces DDP for such a model).

    Expert parameters (those of the :class:`ExpertParallelMoE` layers) are summed over their DP
    replicas (``layout.dp_group``), every other parameter over the whole world; both are then
    divided by the world size W (the module docstring says why W for both). Each set travels
    as one flattened all-reduce. A trainable parameter without a gradient counts as zero, so
    that every rank reduces the same buffers. A no-op in a single process."""
    world = layout.world_size
    if world == 1:
        return
    expert_names = _expert_parameter_names(model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for group, selected in ((None, [p for name, p in trainable if name not in expert_names]),
                            (layout.dp_group, [p for name, p in trainable if name in expert_names])):
        if not selected:
            continue
        for p in selected:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in selected])
        if group is None or _group_size(group) > 1:
            dist.all_reduce(flat, group=group)
        flat /= world
        for p, reduced in zip(selected, flat.split([p.numel() for p in selected])):
            p.grad.copy_(reduced.view_as(p))


def _gather_experts(shard: torch.Tensor, group) -> torch.Tensor:
    """The full ``[E, ...]`` stack from every EP rank's ``[E/P, ...]`` shard, in rank order."""
    if _group_size(group) == 1:
        return shard.detach().clone()
    parts = [torch.empty_like(shard) for _ in range(_group_size(group))]
    dist.all_gather(parts, shard.detach().contiguous(), group=group)
    return torch.cat(parts)


def _shard_of(full: torch.Tensor, module: ExpertParallelMoE, where: str, name: str) -> torch.Tensor:
    if full.shape[0] != module.num_experts:
        raise ValueError(f"{where}: {name} holds {full.shape[0]} experts; the layer has {module.num_experts}")
    local = _check_shardable(where, full.shape[0], module.ep_size)
    return full[module.first_expert:module.first_expert + local]


def full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``model`` (and of ``optimizer``'s state) with every expert:
    each :class:`ExpertParallelMoE`'s shards gathered over its EP group into ``[E, ...]`` stacks.
    Model keys are ``model.<state-dict key>`` (the keys of the unsharded
    :class:`~astrea.nn.SparseMoE`, so the file loads into one process too); optimizer keys are
    ``optim.<parameter index>.<state key>``, an expert parameter's per-element state (Adam's
    moments) gathered like the parameter. Collective: every rank of the EP groups must call it."""
    experts = _expert_parameter_names(model)
    tensors = {}
    for name, value in model.state_dict().items():
        value = _gather_experts(value, experts[name].group) if name in experts else value.detach().clone()
        tensors[f"model.{name}"] = value.contiguous()
    if optimizer is not None:
        parameter_names = {p: name for name, p in model.named_parameters()}
        state = optimizer.state_dict()["state"]
        ordered = [p for group in optimizer.param_groups for p in group["params"]]
        for index, entry in sorted(state.items()):
            name = parameter_names.get(ordered[index])
            for key, value in entry.items():
                value = torch.as_tensor(value)
                if name in experts and value.shape == ordered[index].shape:
                    value = _gather_experts(value, experts[name].group)
                tensors[f"optim.{index}.{key}"] = value.detach().clone().contiguous()
    return tensors


def save_expert_parallel(path, model: nn.Module, layout: ExpertParallelLayout,
                         optimizer: torch.optim.Optimizer | None = None) -> None:
    """Writes one safetensors checkpoint of ``model`` (and ``optimizer``) holding every expert
    (:func:`full_state_dict`); global rank 0 writes it, then every rank waits for the write.
    Resuming with :func:`load_expert_parallel` in the same layout continues the run exactly;
    any other EP size that divides E re-shards the experts from the full stacks."""
    from safetensors.torch import save_file

    tensors = full_state_dict(model, optimizer)
    metadata = {"format": CHECKPOINT_FORMAT, "dp_size": str(layout.dp_size), "ep_size": str(layout.ep_size)}
    if optimizer is not None:
        metadata["optim_param_groups"] = json.dumps(optimizer.state_dict()["param_groups"])
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized or dist.get_rank() == 0:
        save_file(tensors, str(path), metadata=metadata)
    if initialized:
        dist.barrier()


def load_expert_parallel(path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, str]:
    """Loads a :func:`save_expert_parallel` checkpoint into ``model`` (and ``optimizer``), each
    :class:`ExpertParallelMoE` taking its own experts' rows of the full stacks: the EP size may
    differ from the saved one when it divides E (re-sharding), else a ``ValueError`` says so.
    The file also loads into a single-process :class:`~astrea.nn.SparseMoE` model. Returns the
    file's metadata (the saved ``dp_size`` and ``ep_size``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    where = "load_expert_parallel"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where}: {path} is not a {CHECKPOINT_FORMAT} checkpoint (format {metadata.get('format')!r})")
    tensors = load_file(str(path))
    experts = _expert_parameter_names(model)
    state = {}
    for key, value in tensors.items():
        if key.startswith("model."):
            name = key[len("model."):]
            state[name] = _shard_of(value, experts[name], where, name) if name in experts else value
    model.load_state_dict(state)
    if optimizer is not None:
        if "optim_param_groups" not in metadata:
            raise ValueError(f"{where}: {path} holds no optimizer state")
        parameter_names = {p: name for name, p in model.named_parameters()}
        ordered = [p for group in optimizer.param_groups for p in group["params"]]
        optim_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                parameter = parameter_names.get(ordered[int(index)])
                if parameter in experts and value.dim() > 0 and value.shape[1:] == ordered[int(index)].shape[1:]:
                    value = _shard_of(value, experts[parameter], where, f"optimizer state {key}")
                optim_state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": optim_state, "param_groups": json.loads(metadata["optim_param_groups"])})
    return metadata
