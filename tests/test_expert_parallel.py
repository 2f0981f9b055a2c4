"""Expert parallelism: an ExpertParallelMoE on 2 and 4 gloo processes (spawned by the tests on the
loopback interface, as in tests/test_distributed.py) must compute what one process holding all
experts computes over the union of the ranks' tokens, train like it under DP x EP, and resume
exactly from its checkpoint, in the same layout or re-sharded.

The ranks are spawned once per world size (a spawn costs seconds on 2 cores): each module-level
``*_rank`` function below runs on every rank of one spawn and returns what the tests compare.

Tolerances are derived: one forward and backward within the accumulation bound of both
computations (:func:`_check_layer_equals_one_process`); training runs against a float64
1-process run, within 4x the error of the 1-process fp32 run (flash-attention's rule).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from astrea import distributed
from astrea.distributed import ExpertParallelMoE
from astrea.nn import AdaptiveWeightAllocator, GroupedExperts, SparseMoE, TopKRouter
from tests.test_distributed import run_ranks
from tests.utils import (UNIT_ROUNDOFF, assert_each_within_torch_error, assert_within, assert_within_torch_error,
                         route_float64)

EXPERTS, HIDDEN, INTERMEDIATE, TOP_K = 8, 16, 12, 2
TOKENS_PER_RANK = 6


class _RouteDetached(nn.Module):
    """The router on a detached copy of the tokens: the layer's input gradient is then the
    expert path alone (the one that crosses the exchanges), whose error the bound below models;
    the router's own path is local to each rank and is covered by the training test."""

    def __init__(self, router: nn.Module):
        super().__init__()
        self.router = router

    def forward(self, x):
        return self.router(x.detach())


def _moe(num_experts: int = EXPERTS, *, detached_router: bool = False, skip_experts: int = 0) -> SparseMoE:
    """The unsharded layer, identical on every rank (seed 0). ``skip_experts`` > 0: a large negative
    selection bias keeps every token away from the last ``skip_experts`` experts."""
    torch.manual_seed(0)
    router = TopKRouter(HIDDEN, num_experts, TOP_K, bias_update_rate=0.01)
    if skip_experts:
        router.expert_bias[-skip_experts:] = -1e4
    allocator = AdaptiveWeightAllocator(num_experts)
    allocator.log_temperature.requires_grad_(False)  # SparseMoE uses the allocator's scale only
    with torch.no_grad():
        allocator.log_scale.uniform_(-0.4, 0.4)
    experts = GroupedExperts(num_experts, HIDDEN, INTERMEDIATE)
    return SparseMoE(experts, _RouteDetached(router) if detached_router else router, allocator)


def _batch(world: int, steps: int = 1, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Global inputs and targets ``[steps, world * TOKENS_PER_RANK, HIDDEN]``."""
    generator = torch.Generator().manual_seed(seed)
    shape = (steps, world * TOKENS_PER_RANK, HIDDEN)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def _this_ranks(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of a global batch (dim 0)."""
    return batch.tensor_split(distributed.world_size())[distributed.rank()]


# ---------------------------------------------------------------- one forward and backward


def _forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict:
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(grad)
    experts = layer.experts
    return {"out": out.detach(), "grad_x": x.grad, "grad_gate_up": experts.gate_up.grad,
            "grad_down": experts.down.grad, "grad_log_scale": layer.allocator.log_scale.grad}


def _layer_rank(ep_size: int, skip_experts: int = 0) -> dict:
    """One forward and backward of the EP layer on this rank's tokens, with a random upstream gradient."""
    layout = distributed.expert_parallel_layout(ep_size)
    layer = ExpertParallelMoE.from_sparse_moe(_moe(detached_router=True, skip_experts=skip_experts), layout.ep_group)
    x, grad = (_this_ranks(t[0]) for t in _batch(distributed.world_size()))
    got = _forward_backward(layer, x, grad)
    for parameter in layer.parameters():
        parameter.grad = None
    again = _forward_backward(layer, x, grad)
    return {**got, "first_expert": layer.first_expert, "rows_sent": layer.rows_sent,
            "deterministic": all(torch.equal(again[name], value) for name, value in got.items())}


def _magnitudes(moe: SparseMoE, x: torch.Tensor, grad: torch.Tensor) -> dict:
    """float64 magnitudes of the terms of the layer's forward and backward sums: the layer on
    |x|, |weights| and |coefficients| with the gated silu ``silu(g) * u`` replaced by ``|g| * |u|``
    (|silu(g)| <= |g|; its derivatives, |silu'| <= 1.1 and |silu''| <= 0.5, enter the bound
    below as a factor). Every partial sum of either computation is bounded by these."""
    routing = moe.router(x)
    experts = routing.indices.long()
    scale = moe.allocator.scale.detach().double()
    leaves = [t.detach().double().abs().requires_grad_() for t in (x, moe.experts.gate_up, moe.experts.down, scale)]
    tokens, gate_up, down, abs_scale = leaves
    pre = torch.einsum("nh,nkrh->nkr", tokens, gate_up[experts])
    gate, up = pre.chunk(2, dim=-1)
    y = torch.einsum("nki,nkhi->nkh", gate * up, down[experts])
    out = ((routing.weights.detach().double().abs() * abs_scale[experts])[..., None] * y).sum(1)
    grads = torch.autograd.grad(out, leaves, grad.double().abs())
    return {"out": out.detach(), "grad_x": grads[0], "grad_gate_up": grads[1], "grad_down": grads[2],
            "grad_log_scale": grads[3] * scale, "largest_gate": gate.max().item()}


def _check_layer_equals_one_process(ranks: list[dict], skip_experts: int = 0) -> dict:
    """Each rank's outputs, input gradients and expert-weight gradients against one process
    holding all experts over the union of the ranks' tokens; returns the 1-process result."""
    world = len(ranks)
    moe = _moe(detached_router=True, skip_experts=skip_experts)
    x, grad = (t[0] for t in _batch(world))
    expected = _forward_backward(moe, x, grad)
    terms = _magnitudes(moe, x, grad)
    # Both computations sum the same terms in different orders (grouped GEMMs over other row
    # sets, the k slots in the combine rather than in the experts op), each within the Higham
    # bound of its longest chain of roundings: H and I in the GEMMs, k in the weighted sum, one
    # row per routing slot of the global batch in the weight gradients, a few single roundings;
    # doubled for two computations, scaled by the activation's derivative factor.
    length = 2 * (HIDDEN + INTERMEDIATE + x.shape[0] * TOP_K + TOP_K + 8)
    length = int(length * (1.1 + 0.5 * terms["largest_gate"])) + 1
    local = EXPERTS // world
    for r, got in enumerate(ranks):
        tokens = slice(r * TOKENS_PER_RANK, (r + 1) * TOKENS_PER_RANK)
        experts = slice(got["first_expert"], got["first_expert"] + local)
        assert got["first_expert"] == r * local
        assert got["deterministic"], f"rank {r}: a second forward and backward differ from the first"
        for name, rows in (("out", tokens), ("grad_x", tokens), ("grad_gate_up", experts), ("grad_down", experts)):
            bound = _bound(terms[name][rows], length, expected[name][rows])
            assert_within(got[name], expected[name][rows], bound, what=f"rank {r} of {world}: {name}")
    # the allocator is replicated: its gradient is each rank's tokens' share, summing to the whole
    bound = _bound(terms["grad_log_scale"], length + world, expected["grad_log_scale"])
    assert_within(sum(got["grad_log_scale"] for got in ranks), expected["grad_log_scale"], bound,
                  what="allocator gradient summed over the ranks")
    return expected


def _bound(terms: torch.Tensor, length: int, expected: torch.Tensor) -> torch.Tensor:
    return length * UNIT_ROUNDOFF[torch.float32] * terms + UNIT_ROUNDOFF[torch.float32] * expected.abs().double()


# ---------------------------------------------------------------- training steps under DP x EP

STEPS, RESUME_AFTER = 4, 2


def _train(model: nn.Module, layout, optimizer, inputs, targets) -> list[torch.Tensor]:
    """Adam steps of MSE + 0.1 * the global balancing loss, the aux-loss-free bias moved by the
    global load; each step's batch is this rank's part of the global batch. Returns the global
    losses (task, aux) of each step."""
    router = model.router
    routings = []
    hook = router.register_forward_hook(lambda module, args, result: routings.append(result))
    losses = []
    for x, y in zip(inputs, targets):
        routings.clear()
        task = nn.functional.mse_loss(model(_this_ranks(x)), _this_ranks(y))
        aux = distributed.global_load_balancing_loss(routings[0])
        (task + 0.1 * aux).backward()
        distributed.reduce_gradients(model, layout)
        optimizer.step()
        optimizer.zero_grad()
        router.update_expert_bias(distributed.global_router_stats(routings[0]).counts)
        losses.append(torch.stack([distributed.mean_over_ranks(task), aux.detach()]))
    hook.remove()
    return losses


def _ep_model(layout) -> ExpertParallelMoE:
    return ExpertParallelMoE.from_sparse_moe(_moe(), layout.ep_group)


def _adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _training_rank(dp_size: int, ep_size: int, world: int) -> dict:
    """STEPS training steps in the DP x EP layout; the full state (every expert) at the end."""
    layout = distributed.expert_parallel_layout(ep_size)
    assert (layout.dp_size, layout.ep_size) == (dp_size, ep_size)
    model = _ep_model(layout)
    optimizer = _adam(model)
    losses = _train(model, layout, optimizer, *_batch(world, STEPS))
    return {"losses": torch.stack(losses), "state": distributed.full_state_dict(model),
            "layout": tuple(layout[:4])}


@functools.cache
def _one_process_training(world: int, dtype: torch.dtype = torch.float32) -> dict:
    """STEPS training steps of the unsharded layer in one process over the global batches of
    ``world`` ranks, in fp32 or, as the oracle, in float64."""
    with pytest.MonkeyPatch.context() as patch:
        if dtype == torch.float64:
            route_float64(patch)
        moe = _moe().to(dtype)
        optimizer = _adam(moe)
        inputs, targets = (t.to(dtype) for t in _batch(world, STEPS))
        losses = _train(moe, distributed.expert_parallel_layout(1), optimizer, inputs, targets)
    return {"losses": torch.stack(losses), "state": {f"model.{k}": v for k, v in moe.state_dict().items()}}


def _check_training_equals_one_process(got: dict, world: int, what: str, first_step: int = 0) -> None:
    """The losses (of steps ``first_step`` on) and final state of a DP x EP run over the global
    batches of ``world`` ranks against the float64 1-process run, within 4x the error of the
    1-process run in fp32. Adam divides by sqrt(v) + eps, so a rounding difference of a small
    gradient can move a weight by up to lr per step: no a-priori bound is tight, but the ranks
    round no worse than another fp32 summation order, which that fp32 run's error measures
    (as long as float64 chooses the same experts: checked through the bias updates)."""
    own, expected = _one_process_training(world), _one_process_training(world, torch.float64)
    bias = "model.router.expert_bias"
    assert (own["state"][bias].double() - expected["state"][bias]).abs().max() < 0.01, \
        "float64 routes differently from fp32: a differing sign of a bias update moves it by 2 x 0.01"
    assert_within_torch_error(got["losses"], expected["losses"][first_step:], own["losses"][first_step:],
                              what=f"{what}: losses")
    assert_each_within_torch_error(got["state"], expected["state"], own["state"], what=what)


# ---------------------------------------------------------------- checkpoints


def _resume_rank(checkpoint: str, ep_size: int) -> dict:
    """Loads ``checkpoint`` (saved by the 2-rank run after RESUME_AFTER steps) into an EP layer of
    ``ep_size`` and trains the remaining steps on that run's global batches, split over this
    world; the full state at the end."""
    layout = distributed.expert_parallel_layout(ep_size)
    model = _ep_model(layout)
    optimizer = _adam(model)
    metadata = distributed.load_expert_parallel(checkpoint, model, optimizer)
    loaded = {name: value.detach().clone() for name, value in model.experts.state_dict().items()}
    inputs, targets = _batch(2, STEPS)
    losses = _train(model, layout, optimizer, inputs[RESUME_AFTER:], targets[RESUME_AFTER:])
    return {"losses": torch.stack(losses), "state": distributed.full_state_dict(model), "loaded_experts": loaded,
            "first_expert": model.first_expert, "saved_layout": (metadata["dp_size"], metadata["ep_size"])}


def _save_and_resume_rank(checkpoint: str) -> dict:
    """An uninterrupted EP=2 run; then one saved after RESUME_AFTER steps and resumed by a new
    model and optimizer from the file."""
    uninterrupted = _training_rank(1, 2, 2)
    layout = distributed.expert_parallel_layout(2)
    model = _ep_model(layout)
    optimizer = _adam(model)
    inputs, targets = _batch(2, STEPS)
    _train(model, layout, optimizer, inputs[:RESUME_AFTER], targets[:RESUME_AFTER])
    distributed.save_expert_parallel(checkpoint, model, layout, optimizer)
    return {"uninterrupted": uninterrupted, "resumed": _resume_rank(checkpoint, 2)}


# ---------------------------------------------------------------- the spawns


def _two_rank_checks(checkpoint: str) -> dict:
    return {"layer": _layer_rank(2), "empty_rank": _layer_rank(2, skip_experts=EXPERTS // 2),
            "checkpoint": _save_and_resume_rank(checkpoint)}


def _refusals_rank() -> dict:
    layout = distributed.expert_parallel_layout(4)
    with pytest.raises(ValueError, match=r"from_sparse_moe: 6 experts cannot be sharded over an expert-parallel "
                                         r"group of 4 ranks \(num_experts % ep_size must be 0\)"):
        ExpertParallelMoE.from_sparse_moe(_moe(6), layout.ep_group)
    with pytest.raises(ValueError, match=r"ExpertParallelMoE: experts must hold num_experts / ep_size = 8 / 4 = 2 "
                                         r"experts; got 8"):
        ExpertParallelMoE(GroupedExperts(EXPERTS, HIDDEN, INTERMEDIATE), _moe().router, EXPERTS, group=layout.ep_group)
    with pytest.raises(ValueError, match=r"expert_parallel_layout: the world of 4 ranks must split into groups of "
                                         r"ep_size=3 ranks"):
        distributed.expert_parallel_layout(3)
    return {"refused": True}


def _four_rank_checks(checkpoint: str) -> dict:
    return {"layer": _layer_rank(4), "training": _training_rank(2, 2, 4), "refusals": _refusals_rank(),
            "resharded": _resume_rank(checkpoint, 4)}


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoint") / "moe.safetensors"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, checkpoint_path) -> list[dict]:
    return run_ranks(functools.partial(_two_rank_checks, str(checkpoint_path)), tmp_path_factory.mktemp("two"), 2)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, checkpoint_path, two_ranks) -> list[dict]:
    """Four ranks; they re-shard the checkpoint the two-rank run wrote."""
    return run_ranks(functools.partial(_four_rank_checks, str(checkpoint_path)), tmp_path_factory.mktemp("four"), 4)


# ---------------------------------------------------------------- the tests


def test_two_ranks_layer_equals_one_process_with_all_experts(two_ranks):
    expected = _check_layer_equals_one_process([got["layer"] for got in two_ranks])
    assert expected["grad_gate_up"].abs().amax(dim=(1, 2)).min() > 0  # every expert received tokens
    assert all(got["layer"]["rows_sent"] > 0 for got in two_ranks)


def test_four_ranks_layer_equals_one_process_with_all_experts(four_ranks):
    _check_layer_equals_one_process([got["layer"] for got in four_ranks])


def test_a_rank_whose_experts_receive_no_token(two_ranks):
    ranks = [got["empty_rank"] for got in two_ranks]
    _check_layer_equals_one_process(ranks, skip_experts=EXPERTS // 2)
    # rank 1 holds experts 4-7, which no token chose: its tokens all went to rank 0, whose
    # tokens stayed home, and its expert gradients are exactly zero
    assert ranks[0]["rows_sent"] == 0 and ranks[1]["rows_sent"] == TOKENS_PER_RANK * TOP_K
    assert not ranks[1]["grad_gate_up"].any() and not ranks[1]["grad_down"].any()
    assert ranks[0]["grad_gate_up"].abs().amax(dim=(1, 2)).min() > 0


def test_dp2_x_ep2_training_steps_equal_one_process(four_ranks):
    expected = _one_process_training(4)
    initial = _moe().state_dict()
    moved = [name for name, value in expected["state"].items()
             if not torch.equal(value, initial[name.removeprefix("model.")])]
    assert {"model.experts.gate_up", "model.router.gate.weight", "model.router.expert_bias"} <= set(moved)
    layouts = [got["training"]["layout"] for got in four_ranks]
    assert layouts == [(2, 2, 0, 0), (2, 2, 0, 1), (2, 2, 1, 0), (2, 2, 1, 1)]  # (dp, ep, dp rank, ep rank)
    for r, got in enumerate(four_ranks):
        _check_training_equals_one_process(got["training"], 4, f"rank {r} of DP 2 x EP 2")


def test_checkpoint_resumes_exactly_in_the_same_layout(two_ranks):
    for r, got in enumerate(two_ranks):
        resumed, uninterrupted = got["checkpoint"]["resumed"], got["checkpoint"]["uninterrupted"]
        assert resumed["saved_layout"] == ("1", "2")
        assert torch.equal(resumed["losses"], uninterrupted["losses"][RESUME_AFTER:]), f"rank {r} losses"
        for name, value in uninterrupted["state"].items():
            assert torch.equal(resumed["state"][name], value), f"rank {r} {name}"
    _check_training_equals_one_process(two_ranks[0]["checkpoint"]["uninterrupted"], 2, "EP 2")


def test_checkpoint_reshards_into_another_ep_size(two_ranks, four_ranks, checkpoint_path):
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint_path))
    assert saved["model.experts.gate_up"].shape == (EXPERTS, 2 * INTERMEDIATE, HIDDEN)
    for r, got in enumerate(four_ranks):
        resharded = got["resharded"]
        first = resharded["first_expert"]
        assert first == r * EXPERTS // 4
        for name, value in resharded["loaded_experts"].items():
            assert torch.equal(value, saved[f"model.experts.{name}"][first:first + EXPERTS // 4]), name
        # the same global batches on 4 ranks instead of 2: equal up to the reduction order (the
        # 2-rank run before the checkpoint and the resumed one equal the uninterrupted run exactly)
        _check_training_equals_one_process(resharded, 2, f"EP 4 rank {r}", first_step=RESUME_AFTER)


def test_the_checkpoint_loads_into_one_process(two_ranks, checkpoint_path):
    from safetensors.torch import load_file

    plain = _moe()
    distributed.load_expert_parallel(checkpoint_path, plain)
    for name, value in load_file(str(checkpoint_path)).items():
        if name.startswith("model."):
            assert torch.equal(plain.state_dict()[name.removeprefix("model.")], value), name
    single = ExpertParallelMoE.from_sparse_moe(_moe())  # EP size 1 holds every expert
    optimizer = _adam(single)
    metadata = distributed.load_expert_parallel(checkpoint_path, single, optimizer)
    assert (metadata["dp_size"], metadata["ep_size"]) == ("1", "2")
    inputs, targets = _batch(2, STEPS)
    losses = _train(single, distributed.expert_parallel_layout(1), optimizer, inputs[RESUME_AFTER:],
                    targets[RESUME_AFTER:])
    _check_training_equals_one_process({"losses": torch.stack(losses), "state": distributed.full_state_dict(single)},
                                       2, "EP 1 from the EP 2 checkpoint", first_step=RESUME_AFTER)


def test_checkpoint_refusals(tmp_path, four_ranks):
    assert all(got["refusals"]["refused"] for got in four_ranks)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "something else"})
    with pytest.raises(ValueError, match=r"load_expert_parallel: .*other.safetensors is not a "
                                         r"astrea-expert-parallel-1 checkpoint \(format 'something else'\)"):
        distributed.load_expert_parallel(tmp_path / "other.safetensors", _moe())
    distributed.save_expert_parallel(tmp_path / "eight.safetensors", ExpertParallelMoE.from_sparse_moe(_moe()),
                                     distributed.expert_parallel_layout(1))
    with pytest.raises(ValueError, match=r"load_expert_parallel: experts\.(gate_up|down) holds 8 experts; the layer "
                                         r"has 6"):
        distributed.load_expert_parallel(tmp_path / "eight.safetensors", ExpertParallelMoE.from_sparse_moe(_moe(6)))
    with pytest.raises(ValueError, match=r"load_expert_parallel: .*eight.safetensors holds no optimizer state"):
        layer = ExpertParallelMoE.from_sparse_moe(_moe())
        distributed.load_expert_parallel(tmp_path / "eight.safetensors", layer, _adam(layer))


# ---------------------------------------------------------------- single process


def test_ep_size_one_is_the_unsharded_layer():
    moe = _moe()
    layer = ExpertParallelMoE.from_sparse_moe(moe)
    assert (layer.ep_size, layer.ep_rank, layer.first_expert, layer.num_experts) == (1, 0, 0, EXPERTS)
    assert layer.router is moe.router and layer.experts is not moe.experts
    x = _batch(1)[0][0]
    assert torch.equal(layer(x), moe(x))
    assert layer(x.reshape(2, 3, HIDDEN)).shape == (2, 3, HIDDEN)
    layout = distributed.expert_parallel_layout(1)
    assert layout == (1, 1, 0, 0, None, None) and layout.world_size == 1
    distributed.reduce_gradients(layer, layout)  # a no-op
    assert layer.experts.gate_up.grad is None


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match=r"expert_parallel_layout: the world of 1 ranks must split into groups of "
                                         r"ep_size=2 ranks"):
        distributed.expert_parallel_layout(2)
    with pytest.raises(ValueError, match=r"expert_parallel_layout: ep_size must be a positive int; got 0"):
        distributed.expert_parallel_layout(0)
    with pytest.raises(TypeError, match=r"ExpertParallelMoE: experts must be a GroupedExperts; got ModuleList"):
        ExpertParallelMoE(nn.ModuleList([nn.Linear(2, 2)]), _moe().router, 1)
    with pytest.raises(TypeError, match=r"from_sparse_moe: moe must be a SparseMoE on GroupedExperts; got SparseMoE "
                                        r"with experts ModuleList"):
        ExpertParallelMoE.from_sparse_moe(SparseMoE(nn.ModuleList([nn.Linear(2, 2)]), _moe().router))
    with pytest.raises(ValueError, match=r"ExpertParallelMoE: num_experts must be a positive int; got 0"):
        ExpertParallelMoE(GroupedExperts(1, 4, 4), _moe().router, 0)
