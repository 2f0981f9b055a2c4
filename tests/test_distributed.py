"""Data-parallel training: 2 gloo processes on the loopback interface must train exactly like
1 process over the same global batch.

Each multi-process test spawns its ranks itself (``torch.multiprocessing``, a free port on
127.0.0.1, the torchrun environment variables), runs a module-level function on every rank,
and gets each rank's result back through a file; a rank that fails or hangs fails the test.

Tolerances are derived: what is exact by construction (counts, dyadic means, bias updates from
exact counts, a single process's fallbacks) is compared bit for bit; one router step within
the rounding bound of both computations (:func:`_router_step_bounds`); training runs against a
float64 copy of the 1-process run, within 4x the error of that run in fp32
(:func:`tests.utils.assert_within_torch_error`, flash-attention's rule).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import astrea.nn.moco
from astrea import distributed, ops, reference
from astrea.nn import AdaptiveWeightAllocator, MomentumContrast, SparseMoE, TopKRouter
from tests.utils import (UNIT_ROUNDOFF, assert_each_within_torch_error, assert_within, assert_within_torch_error,
                         route_float64)

WORLD = 2
# A hang detector, not a time limit: a loaded 2-core host under MKL's SSE4.2 path needs minutes.
RANK_TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(local_rank: int, world: int, port: int, out_dir: str, fn) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    distributed.init_from_env("cpu", timeout_s=RANK_TIMEOUT_S)
    try:
        torch.save(fn(), Path(out_dir) / f"rank{local_rank}.pt")
    finally:
        distributed.shutdown()


def run_ranks(fn, tmp_path: Path, world: int = WORLD) -> list:
    """Runs ``fn()`` on ``world`` gloo ranks; returns what each rank returned, by rank."""
    context = mp.start_processes(_rank_main, args=(world, _free_port(), str(tmp_path), fn), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + RANK_TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within {RANK_TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _every_check_rank() -> dict:
    """What each 2-rank check below returns, from one spawn of the ranks (a spawn costs seconds)."""
    return {fn.__name__: fn() for fn in (_shards_and_streams_rank, _router_rank, _moe_rank, _contrast_rank,
                                         _moco_rank, _conv_net_rank)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_every_check_rank, tmp_path_factory.mktemp("ranks"))


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous part of a global batch (rows split as evenly as possible)."""
    return batch.tensor_split(world)[rank]


def this_ranks_steps(*steps: torch.Tensor) -> list[torch.Tensor]:
    """This rank's part of every step's global batch, for inputs stacked ``[steps, batch, ...]``."""
    rank, world = distributed.rank(), distributed.world_size()
    return [s.tensor_split(world, dim=1)[rank] for s in steps]


# ---------------------------------------------------------------- single process


def test_single_process_defaults():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert not distributed.is_distributed()
    assert distributed.distributed_sampler(list(range(10))) is None
    model = nn.Linear(2, 2)
    assert distributed.wrap_ddp(model) is model and distributed.unwrap(model) is model
    assert distributed.main_only(lambda: 7)() == 7
    distributed.barrier()


def test_init_from_env_without_torchrun_initialises_nothing(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_env("cpu") == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="init_from_env: device must be a CUDA device or the CPU; got meta"):
        distributed.init_from_env("meta")


def test_rank_seed():
    seeds = [distributed.rank_seed(1234, r) for r in range(64)]
    assert seeds[0] == 1234 and len(set(seeds)) == 64
    assert distributed.rank_seed(1234, 3) == distributed.rank_seed(1234, 3)
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="rank_seed: seed must be >= 0; got -1"):
        distributed.rank_seed(-1, 0)
    with pytest.raises(TypeError, match="rank_seed: seed must be an int; got float"):
        distributed.rank_seed(1.5, 0)


def test_router_stats_single_process_are_local():
    router = TopKRouter(8, 5, 2)
    result = router(torch.randn(7, 8))
    stats = distributed.global_router_stats(result)
    assert torch.equal(stats.counts, result.counts.long()) and int(stats.num_tokens) == 7
    assert torch.equal(stats.prob_sums, result.prob_sums)
    # the same formula on the same counts and sums: exact
    assert torch.equal(distributed.global_load_balancing_loss(result), result.aux_loss)


def test_shard_batch_and_rng_states_single_process():
    batch = torch.arange(6)
    assert torch.equal(distributed.shard_batch(batch), batch)
    mean = torch.tensor(2.5)
    assert distributed.as_global_mean(mean, 3) is mean and torch.equal(distributed.mean_over_ranks(mean), mean)
    states = distributed.rng_states()
    first = torch.rand(3)
    distributed.set_rng_states(states)
    assert torch.equal(torch.rand(3), first)
    with pytest.raises(ValueError, match=r"set_rng_states: states must hold one entry per rank \(1\); got 2"):
        distributed.set_rng_states(states * 2)


def _shards_and_streams_rank():
    """shard_batch, seed_rank, rng_states and the global means on one rank."""
    rank = distributed.rank()
    shard_rows = distributed.shard_batch(torch.arange(12).reshape(6, 2), dim=0)
    with pytest.raises(ValueError, match=r"shard_batch: the global batch must split evenly over 2 ranks; got 5"):
        distributed.shard_batch(torch.arange(5))
    seed = distributed.seed_rank(7)
    states = distributed.rng_states()
    draw = torch.rand(4)
    torch.rand(100)
    distributed.set_rng_states(states)
    tokens = 3 if rank == 0 else 1  # rank 0 averages 3 tokens, rank 1 one token
    local_mean = torch.tensor(2.0 if rank == 0 else 6.0, requires_grad=True)
    global_mean = distributed.as_global_mean(local_mean, tokens)
    global_mean.backward()
    return {"rank": rank, "rows": shard_rows, "seed": seed, "draw": draw, "redraw": torch.rand(4),
            "num_states": len(states), "mean_over_ranks": distributed.mean_over_ranks(global_mean),
            "mean_grad": local_mean.grad}


def test_shard_batch_seeds_rng_states_and_means_two_ranks(two_ranks):
    ranks = [got['_shards_and_streams_rank'] for got in two_ranks]
    assert torch.equal(torch.cat([got["rows"] for got in ranks]), torch.arange(12).reshape(6, 2))
    assert [got["seed"] for got in ranks] == [distributed.rank_seed(7, r) for r in range(WORLD)]
    assert not torch.equal(ranks[0]["draw"], ranks[1]["draw"])
    for got in ranks:
        assert got["num_states"] == WORLD and torch.equal(got["redraw"], got["draw"])
        # the mean over all 4 tokens; exact: 2 * (3 * 2 / 4) and 6 * (1 * 2 / 4) are 3, their mean 3
        assert float(got["mean_over_ranks"]) == (3 * 2.0 + 6.0) / 4
    # DDP averages the two ranks' gradients: (3/4 * 2 + 1/4 * 2) / 2 = d(global mean)/d(each token),
    # exact: the factors 3 * 2 / 4 and 1 * 2 / 4 are dyadic
    assert [float(got["mean_grad"]) for got in ranks] == [1.5, 0.5]


# ---------------------------------------------------------------- router statistics on 2 ranks

NUM_TOKENS, DIM, EXPERTS, TOP_K = 13, 8, 5, 2  # 13 tokens: ranks get 7 and 6


def _router_and_batch():
    torch.manual_seed(0)
    router = TopKRouter(DIM, EXPERTS, TOP_K, bias_update_rate=0.1)
    allocator = AdaptiveWeightAllocator(EXPERTS, bias_update_rate=0.05)
    tokens = torch.randn(NUM_TOKENS, DIM) * 3  # sharp scores: an unbalanced load
    return router, allocator, tokens


def _router_step(router, allocator, tokens):
    """Global aux loss, its gate gradient (DDP-averaged when distributed), and both bias updates."""
    model = distributed.wrap_ddp(router)
    result = model(tokens)
    loss = distributed.global_load_balancing_loss(result)
    loss.backward()
    stats = distributed.global_router_stats(result)
    router.update_expert_bias(stats.counts)
    allocator.update_bias(stats.counts)
    return {"loss": loss.detach(), "grad": router.gate.weight.grad, "counts": stats.counts,
            "prob_sums": stats.prob_sums.detach(), "num_tokens": stats.num_tokens,
            "router_bias": router.expert_bias, "allocator_bias": allocator.bias}


def _router_rank():
    router, allocator, tokens = _router_and_batch()
    return _router_step(router, allocator, shard(tokens, distributed.rank(), distributed.world_size()))


def _router_step_bounds(router, tokens, expected) -> dict:
    """How far 2 ranks' loss, gate gradient and score sums may lie from 1 process's, from the
    roundings of both in fp32 (u) and magnitudes in float64. Either computation is within these
    of the exact values, so their difference within twice: the logits, DIM products, may round
    differently on a 7-row batch than on 13 rows (``dl`` = 2 DIM u sum|x||W|); a softmax score
    moves by p (2 max dl + 2 (E + 4) u); the score sums add the 13 tokens' scores in another
    order (7 + 6, then the all-reduce); the loss is sum_e a_e P_e with a_e = E counts_e / (N^2 k)
    (E + 3 roundings); the logits' gradient p_e (a_e - sum_j p_j a_j) (E + 3), and the gate's
    sums it times x over the tokens (DDP's average of 2 halves is exact)."""
    u = UNIT_ROUNDOFF[torch.float32]
    x, weight = tokens.double(), router.gate.weight.detach().double()
    probs = (x @ weight.T).softmax(-1)
    logit_error = 2 * DIM * u * (x.abs() @ weight.abs().T)
    prob_error = probs * (2 * logit_error.amax(-1, keepdim=True) + 2 * (EXPERTS + 4) * u)
    prob_sums = probs.sum(0)
    prob_sums_error = prob_error.sum(0) + 2 * (NUM_TOKENS + WORLD) * u * prob_sums
    upstream = EXPERTS * expected["counts"].double() / (NUM_TOKENS**2 * TOP_K)
    loss_error = (upstream * prob_sums_error).sum() + 2 * (EXPERTS + 3) * u * (upstream * prob_sums).sum()
    spread = upstream + (probs * upstream).sum(-1, keepdim=True)  # |a_e| + sum_j p_j |a_j|
    logit_grad_error = (spread * prob_error + probs * (prob_error @ upstream)[:, None]
                        + 2 * (EXPERTS + 3) * u * probs * spread)
    grad_error = logit_grad_error.T @ x.abs() + 2 * (NUM_TOKENS + WORLD) * u * (probs * spread).T @ x.abs()
    return {"loss": loss_error, "grad": grad_error, "prob_sums": prob_sums_error}


def test_router_stats_two_ranks_equal_one_process(two_ranks):
    ranks = [got['_router_rank'] for got in two_ranks]
    router, allocator, tokens = _router_and_batch()
    expected = _router_step(router, allocator, tokens)
    assert int(expected["counts"].min()) != int(expected["counts"].max()), "the test needs an unbalanced load"
    bounds = _router_step_bounds(router, tokens, expected)
    for r, got in enumerate(ranks):
        assert int(got["num_tokens"]) == NUM_TOKENS
        assert torch.equal(got["counts"], expected["counts"]), f"rank {r} counts"
        for name in ("loss", "grad", "prob_sums"):
            assert_within(got[name], expected[name], bounds[name], what=f"rank {r} {name}")
        # the bias updates read only the (exact) global counts
        for name in ("router_bias", "allocator_bias"):
            assert torch.equal(got[name], expected[name]), f"rank {r} {name}"


# ---------------------------------------------------------------- DDP on a SparseMoE layer

MOE_STEPS, MOE_BATCH = 3, 8  # 4 tokens per rank


def _moe_and_data():
    torch.manual_seed(0)
    experts = nn.ModuleList(nn.Sequential(nn.Linear(DIM, 16), nn.GELU(), nn.Linear(16, DIM)) for _ in range(EXPERTS))
    router = TopKRouter(DIM, EXPERTS, TOP_K, bias_update_rate=0.01)
    moe = SparseMoE(experts, router, AdaptiveWeightAllocator(EXPERTS))
    moe.allocator.log_temperature.requires_grad_(False)  # SparseMoE uses the allocator's scale only
    inputs = torch.randn(MOE_STEPS, MOE_BATCH, DIM)
    targets = torch.randn(MOE_STEPS, MOE_BATCH, DIM)
    return moe, inputs, targets


def _train_moe(moe, inputs, targets):
    """A few Adam steps of MSE + global balancing loss, with the aux-loss-free bias update; the
    batch of each step is this rank's shard. Returns the global losses and the final state."""
    model = distributed.wrap_ddp(moe, sync_buffers=False)  # expert_bias moves by the global load on every rank
    optimizer = torch.optim.Adam(moe.parameters(), lr=1e-2)
    routings = []
    moe.router.register_forward_hook(lambda module, args, result: routings.append(result))
    losses = []
    for x, y in zip(inputs, targets):
        routings.clear()
        task = nn.functional.mse_loss(model(x), y)
        aux = distributed.global_load_balancing_loss(routings[0])
        (task + 0.1 * aux).backward()
        optimizer.step()
        optimizer.zero_grad()
        moe.router.update_expert_bias(distributed.global_router_stats(routings[0]).counts)
        global_task = task.detach().clone()
        if distributed.is_distributed():
            torch.distributed.all_reduce(global_task, op=torch.distributed.ReduceOp.AVG)
        losses.append(torch.stack([global_task, aux.detach()]))
    return {"losses": torch.stack(losses), "state": {k: v.clone() for k, v in moe.state_dict().items()}}


def _moe_rank():
    moe, inputs, targets = _moe_and_data()
    return _train_moe(moe, *this_ranks_steps(inputs, targets))


def test_ddp_sparse_moe_two_ranks_equal_one_process(two_ranks, monkeypatch):
    """The losses and final state of 3 Adam steps against a float64 copy of the 1-process run,
    within 4x the error of that run in fp32. Adam divides by sqrt(v) + eps, so a rounding
    difference of a small gradient can move a weight by up to lr per step: no a-priori bound
    is tight, but 2 ranks round no worse than another fp32 summation order, which the 1-process
    fp32 run's own error against float64 measures (the experts chosen must be the same)."""
    ranks = [got['_moe_rank'] for got in two_ranks]
    own = _train_moe(*_moe_and_data())
    route_float64(monkeypatch)
    moe, inputs, targets = _moe_and_data()
    expected = _train_moe(moe.double(), inputs.double(), targets.double())
    # the same loads at every step: a differing sign of a bias update would move it by 2 x 0.01
    bias_moved = own["state"]["router.expert_bias"].double() - expected["state"]["router.expert_bias"]
    assert bias_moved.abs().max() < 0.01, "float64 routes differently from fp32"
    for r, got in enumerate(ranks):
        assert_within_torch_error(got["losses"], expected["losses"], own["losses"], what=f"rank {r} losses")
        assert_each_within_torch_error(got["state"], expected["state"], own["state"], what=f"rank {r}")
    initial = _moe_and_data()[0].state_dict()
    moved = [name for name, value in own["state"].items() if not torch.equal(value, initial[name])]
    assert "router.expert_bias" in moved and "router.gate.weight" in moved


# ---------------------------------------------------------------- in-batch negatives over the global batch

CONTRAST_BATCH = 6


class _DualEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.image, self.text = nn.Linear(DIM, 4), nn.Linear(DIM, 4)

    def forward(self, images, texts):
        return nn.functional.normalize(self.image(images), dim=-1), nn.functional.normalize(self.text(texts), dim=-1)


def _encoder_and_pairs():
    torch.manual_seed(0)
    return _DualEncoder(), torch.randn(CONTRAST_BATCH, DIM), torch.randn(CONTRAST_BATCH, DIM)


def _in_batch_contrast(encoder, images, texts):
    """Symmetric InfoNCE over the gathered global batch: its loss and DDP-averaged gradients."""
    model = distributed.wrap_ddp(encoder)  # kept alive through backward: DDP's reducer averages the gradients
    queries, keys = model(images, texts)
    queries, keys = distributed.gather_batch(queries), distributed.gather_batch(keys)
    logits = queries @ keys.T / 0.1
    target = torch.arange(logits.shape[0])
    loss = (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2
    loss.backward()
    return {"loss": loss.detach(), "global_batch": queries.shape[0],
            "grads": {name: p.grad.clone() for name, p in encoder.named_parameters()}}


def _contrast_rank():
    encoder, images, texts = _encoder_and_pairs()
    rank, world = distributed.rank(), distributed.world_size()
    return _in_batch_contrast(encoder, shard(images, rank, world), shard(texts, rank, world))


def test_gather_batch_in_batch_negatives_two_ranks_equal_one_process(two_ranks):
    """Each rank's loss and DDP-averaged gradients against a float64 copy of the 1-process run,
    within 4x the error of that run in fp32 (the 2 ranks sum the gathered batch's gradients in
    another order: no more error than another fp32 order)."""
    ranks = [got['_contrast_rank'] for got in two_ranks]
    own = _in_batch_contrast(*_encoder_and_pairs())
    encoder, images, texts = _encoder_and_pairs()
    expected = _in_batch_contrast(encoder.double(), images.double(), texts.double())
    for r, got in enumerate(ranks):
        assert got["global_batch"] == CONTRAST_BATCH
        assert_within_torch_error(got["loss"], expected["loss"], own["loss"], what=f"rank {r} loss")
        assert_each_within_torch_error(got["grads"], expected["grads"], own["grads"], what=f"rank {r} grad")


# ---------------------------------------------------------------- momentum contrast on 2 ranks

MOCO_STEPS, MOCO_BATCH, MOCO_QUEUE = 3, 4, 10  # 3 steps of 4 keys wrap the queue of 10


class _MocoStep(nn.Module):
    """Query encoder + MoCo loss in one forward (the module DDP wraps); keys from its EMA copy."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(DIM, 6)
        self.key_encoder = nn.Linear(DIM, 6).requires_grad_(False)
        self.key_encoder.load_state_dict(self.encoder.state_dict())
        self.contrast = MomentumContrast(6, queue_size=MOCO_QUEUE, momentum=0.9, temperature=0.2)

    def forward(self, queries, keys):
        with torch.no_grad():
            keys = self.key_encoder(keys)
        return self.contrast(self.encoder(queries), keys)


def _moco_and_data():
    torch.manual_seed(0)
    return _MocoStep(), torch.randn(MOCO_STEPS, MOCO_BATCH, DIM), torch.randn(MOCO_STEPS, MOCO_BATCH, DIM)


def _train_moco(step_module, queries, keys):
    model = distributed.wrap_ddp(step_module, sync_buffers=False)  # queues must agree without rank 0's copy
    optimizer = torch.optim.SGD(step_module.encoder.parameters(), lr=0.5)
    losses = []
    for q, k in zip(queries, keys):
        loss = model(q, k)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_module.contrast.momentum_update(step_module.encoder, step_module.key_encoder)
        losses.append(distributed.mean_over_ranks(loss))
    return {"losses": torch.stack(losses), "state": {k: v.clone() for k, v in step_module.state_dict().items()}}


def _moco_rank():
    step_module, queries, keys = _moco_and_data()
    return _train_moco(step_module, *this_ranks_steps(queries, keys))


def test_momentum_contrast_two_ranks_equal_one_process_and_share_the_queue(two_ranks, monkeypatch):
    """The losses and final state (encoders, queue) of 3 SGD steps against a float64 copy of the
    1-process run, within 4x the error of that run in fp32: SGD adds lr times the gradient, so a
    rounding difference in the gradients carries into the weights as it would between any two
    fp32 summation orders. (queue_enqueue_ takes no float64: the float64 copy enqueues with the
    reference, a plain copy of the keys.)"""
    ranks = [got['_moco_rank'] for got in two_ranks]
    own = _train_moco(*_moco_and_data())
    monkeypatch.setattr(astrea.nn.moco, "queue_enqueue_", reference.queue_enqueue_)
    step_module, queries, keys = _moco_and_data()
    expected = _train_moco(step_module.double(), queries.double(), keys.double())
    assert int(expected["state"]["contrast.ptr"]) == MOCO_STEPS * MOCO_BATCH % MOCO_QUEUE
    assert torch.equal(ranks[0]["state"]["contrast.queue"], ranks[1]["state"]["contrast.queue"])
    for r, got in enumerate(ranks):
        assert_within_torch_error(got["losses"], expected["losses"], own["losses"], what=f"rank {r} losses")
        assert_each_within_torch_error(got["state"], expected["state"], own["state"], what=f"rank {r}")


# ---------------------------------------------------------------- batch norm over the global batch

BN_STEPS, BN_BATCH = 2, 6


def _conv_net_and_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
                        nn.BatchNorm2d(2, momentum=None))
    return net, torch.randn(BN_STEPS, BN_BATCH, 3, 5, 5) * 2 + 1, torch.randn(BN_STEPS, BN_BATCH, 2, 5, 5)


def _train_conv_net(net, inputs, targets):
    net = distributed.global_batchnorm(net)
    model = distributed.wrap_ddp(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    losses = []
    for x, y in zip(inputs, targets):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        global_loss = loss.detach().clone()
        if distributed.is_distributed():
            torch.distributed.all_reduce(global_loss, op=torch.distributed.ReduceOp.AVG)
        losses.append(global_loss)
    return {"losses": torch.stack(losses), "state": {k: v.clone() for k, v in net.state_dict().items()},
            "kinds": sorted({type(m).__name__ for m in net.modules()})}


def _conv_net_rank():
    net, inputs, targets = _conv_net_and_data()
    return _train_conv_net(net, *this_ranks_steps(inputs, targets))


def test_global_batchnorm_two_ranks_equal_one_process_batchnorm(two_ranks):
    """2 SGD steps through global batch norm against a float64 copy of the 1-process run (plain
    batch norm), within 4x the error of that run in fp32. (The copy is converted before it is
    widened: a conversion keeps the default dtype.)"""
    ranks = [got['_conv_net_rank'] for got in two_ranks]
    own = _train_conv_net(*_conv_net_and_data())
    net, inputs, targets = _conv_net_and_data()
    expected = _train_conv_net(distributed.global_batchnorm(net).double(), inputs.double(), targets.double())
    for r, got in enumerate(ranks):
        assert "BatchNorm2d" not in got["kinds"] and "GlobalBatchNorm" in got["kinds"]
        assert_within_torch_error(got["losses"], expected["losses"], own["losses"], what=f"rank {r} losses")
        assert_each_within_torch_error(got["state"], expected["state"], own["state"], what=f"rank {r}")


def test_global_batchnorm_single_process_is_batchnorm():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3)
    plain.weight.data.uniform_()
    plain.weight.requires_grad_(False)
    converted = distributed.global_batchnorm(nn.Sequential(nn.BatchNorm2d(3)).requires_grad_(True))
    replaced = distributed.global_batchnorm(plain)
    assert isinstance(converted[0], distributed.GlobalBatchNorm) and isinstance(replaced, distributed.GlobalBatchNorm)
    assert not replaced.weight.requires_grad and replaced.bias.requires_grad
    x = torch.randn(4, 3, 2, 2)
    # outside a process group it is BatchNorm2d's own forward: exact
    assert torch.equal(replaced(x), plain(x))
    assert torch.equal(replaced.running_var, plain.running_var)
    with pytest.raises(ValueError, match=r"GlobalBatchNorm: input must be \[N, C, \.\.\.\]; got shape \(3,\)"):
        replaced(torch.randn(3))


# ---------------------------------------------------------------- progressive alignment on 2 ranks

ALIGN_STEPS = dict(steps_caption=2, steps_classification=2, steps_detection=2, steps_segmentation=2,
                   steps_instruct=2, train_scenes=32, eval_scenes=8)
RESUME_AFTER = 5  # steps: in the middle of the detection stage


class _AdamWithoutRoundingNoise(torch.optim.AdamW):
    """AdamW with ``eps`` 1e-5. Some gradients are zero up to rounding (biases that a following
    norm or softmax cancels); Adam's default eps of 1e-8 turns their rounding noise into full
    steps, which differ between any two summation orders (1 process or 2 ranks alike). 1e-5
    leaves those biases in place, as exact arithmetic would, and barely changes real steps."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **{**kwargs, "eps": 1e-5})


def _aligner(checkpoint: str | None = None):
    """A ProgressiveAligner of the test configuration (or loaded from ``checkpoint``)."""
    from astrea.train import AlignConfig, ProgressiveAligner

    torch.set_flush_denormal(True)
    torch.optim.AdamW = _AdamWithoutRoundingNoise  # patched in the test's own processes only
    if checkpoint is not None:
        return ProgressiveAligner.load(checkpoint)
    return ProgressiveAligner(AlignConfig.quick(**ALIGN_STEPS))


def _float64_aligner(monkeypatch) -> object:
    """The test configuration's aligner in float64 (its net and scenes widened), the oracle of
    the fp32 runs. The public ops that take no float64 run their references: those of
    :func:`tests.utils.route_float64`, the fused router's top-k and residual combine, and the
    MoCo enqueue (a copy). ``Astrea.fuse`` scatters the routing weights into an fp32 matrix:
    there the oracle keeps one fp32 rounding."""
    route_float64(monkeypatch)

    def router_topk(logits, k, **options):
        weights, *rest = reference.router_topk(logits, k, **options)
        return ops.RouterOutput(weights.float(), *rest)

    monkeypatch.setattr(ops, "router_topk", router_topk)
    monkeypatch.setattr(ops, "combine_residual", lambda *args, dispatch=None, **options:
                        reference.combine_residual(*args, **options))
    monkeypatch.setattr(astrea.nn.moco, "queue_enqueue_", reference.queue_enqueue_)
    aligner = _aligner()
    aligner.net.double()  # in place: the optimizer holds the same parameters
    for split in ("train_set", "eval_set"):
        scenes = getattr(aligner, split)
        values = {field.name: getattr(scenes, field.name) for field in dataclasses.fields(scenes)}
        wide = {name: value.double() for name, value in values.items()
                if isinstance(value, torch.Tensor) and value.is_floating_point()}
        setattr(aligner, split, dataclasses.replace(scenes, **wide))
    return aligner


def _cancelled_by_batchnorm(net: nn.Module) -> set[str]:
    """The bias of each layer a batch norm follows, and that norm's running mean. The norm
    cancels the bias, so its gradient is rounding noise larger than Adam's eps even at 1e-5:
    any two summation orders move it differently (nothing else in training depends on it)."""
    names = set()
    for name, module in net.named_modules():
        parent, _, index = name.rpartition(".")
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and index.isdigit() and int(index) > 0:
            names |= {f"{parent}.{int(index) - 1}.bias", f"{name}.running_mean"}
    return names


def _snapshot(aligner) -> dict:
    return {name: value.detach().clone() for name, value in aligner.net.state_dict().items()}


def _align(aligner, steps: int | None = None) -> dict:
    """Trains ``steps`` steps (to the end when None); per-step losses and a state at each stage end."""
    losses, stage_states = [], {}
    while not aligner.finished and (steps is None or len(losses) < steps):
        stage = aligner.stage
        losses.append(aligner.train_step())
        if aligner.finished or aligner.stage != stage:
            stage_states[stage] = _snapshot(aligner)
    return {"losses": losses, "stage_states": stage_states, "state": _snapshot(aligner),
            "history": [entry["train"] for entry in aligner.history]}


def _align_rank(checkpoint: str) -> dict:
    """An uninterrupted run, then a run interrupted after RESUME_AFTER steps and resumed from
    its checkpoint by a new aligner (the ranks are spawned once: it costs seconds)."""
    uninterrupted = _align(_aligner())
    interrupted = _aligner()
    _align(interrupted, RESUME_AFTER)
    interrupted.save(checkpoint)
    return {"uninterrupted": uninterrupted, "resumed": _align(_aligner(checkpoint))}


@pytest.fixture(scope="module")
def two_rank_alignment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("align")
    return run_ranks(functools.partial(_align_rank, str(folder / "checkpoint.safetensors")), folder)


def test_alignment_two_ranks_equal_one_process(two_rank_alignment, monkeypatch):
    """Every step's losses and the state after each stage against the float64 run of one
    process, within 4x the error of the fp32 run of one process. AdamW divides by sqrt(v) + eps,
    so a rounding difference of a small gradient moves that weight by up to lr per step; which
    weights get such steps changes with the summation order, so one tensor's largest error
    differs between two fp32 runs by chance (up to 12x on a 48-value bias, measured). A stage's
    whole state is judged at once: its largest error over every parameter and buffer is that of
    any fp32 run (within 1.25x of the 1-process run's, measured), and a tensor off by more than
    4x that fails."""
    monkeypatch.setattr(torch.optim, "AdamW", torch.optim.AdamW)  # undone after the test
    aligner = _aligner()
    noise = _cancelled_by_batchnorm(aligner.net)
    assert len(noise) >= 12, sorted(noise)
    own = _align(aligner)
    expected = _align(_float64_aligner(monkeypatch))
    assert list(own["stage_states"]) == ["caption", "classification", "detection", "segmentation", "instruct"]
    for r, got in enumerate(run["uninterrupted"] for run in two_rank_alignment):
        assert len(got["losses"]) == len(expected["losses"])
        for step, (got_step, own_step, expected_step) in enumerate(zip(got["losses"], own["losses"],
                                                                       expected["losses"])):
            assert got_step.keys() == own_step.keys() == expected_step.keys()
            values = [torch.tensor(list(losses.values()), dtype=torch.float64)
                      for losses in (got_step, expected_step, own_step)]
            assert_within_torch_error(*values, dtype=torch.float32, what=f"rank {r} step {step} losses")
        for stage, state in expected["stage_states"].items():
            floating = sorted(name for name in state.keys() - noise if state[name].is_floating_point())
            for name in state.keys() - noise - set(floating):  # counters and queue pointers
                assert torch.equal(got["stage_states"][stage][name], state[name]), f"rank {r} after {stage}: {name}"
            got_values, expected_values, own_values = (
                torch.cat([run["stage_states"][stage][name].double().flatten() for name in floating])
                for run in (got, expected, own))
            worst = max(floating, key=lambda name: (got["stage_states"][stage][name] - state[name]).abs().max())
            assert_within_torch_error(got_values, expected_values, own_values, dtype=torch.float32,
                                      what=f"rank {r} after {stage}: the state (worst: {worst})")


def test_alignment_two_ranks_keep_identical_queues(two_rank_alignment):
    first, second = (run["uninterrupted"]["state"] for run in two_rank_alignment)
    queues = [name for name in first if name.startswith("contrast.") and name.endswith((".queue", ".ptr"))]
    assert len(queues) == 8
    for name in queues:
        assert torch.equal(first[name], second[name]), name
    # each step enqueued the keys of both ranks, the global batch of 8, into a queue of 32:
    # the segmentation expert was aligned for 2 steps, the classification expert for 6
    assert int(first["contrast.segmentation.ptr"]) == 16 and int(first["contrast.classification.ptr"]) == 16


def test_alignment_two_ranks_resume_exactly(two_rank_alignment):
    for r, run in enumerate(two_rank_alignment):
        got, expected = run["resumed"], run["uninterrupted"]
        assert got["losses"] == expected["losses"][RESUME_AFTER:], f"rank {r} losses after the resume"
        assert got["history"] == expected["history"], f"rank {r} history"
        for name, value in expected["state"].items():
            assert torch.equal(got["state"][name], value), f"rank {r} {name}"
