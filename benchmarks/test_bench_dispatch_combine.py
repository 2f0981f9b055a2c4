"""MoE dispatch, permute and weighted combine: astrea against eager PyTorch (argsort
dispatch, index_select permute, index_add_ combine) and its torch.compile, forward and
forward+backward. GPU sizes on a GPU, small sizes on the CPU."""

from __future__ import annotations

import pytest
import torch

from astrea import ops
from benchmarks.harness import DEVICE, ON_GPU, PROVIDERS, provider_fn, run

if ON_GPU:
    CASES = [dict(tokens=65536, top_k=top_k, dim=2048, experts=64, dtype=torch.bfloat16) for top_k in (2, 8)]
else:
    CASES = [dict(tokens=512, top_k=2, dim=256, experts=8, dtype=torch.float32)]
MODES = ("forward", "forward_backward")


def case_id(case: dict) -> str:
    return f"N{case['tokens']}-k{case['top_k']}-D{case['dim']}-E{case['experts']}-{str(case['dtype'])[6:]}"


def random_indices(case: dict) -> torch.Tensor:
    scores = torch.rand(case["tokens"], case["experts"], device=DEVICE)
    return scores.topk(case["top_k"], dim=-1).indices.int()


def dispatch_tensors(case: dict) -> tuple[torch.Tensor, ...]:
    """sorted_token_ids, expert_offsets, inverse_positions, indices of a random routing."""
    return tuple(ops.moe_dispatch(random_indices(case), case["experts"]))


def eager_dispatch(indices: torch.Tensor, num_experts: int):
    flat = indices.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=indices.device)
    offsets[1:] = torch.bincount(flat, minlength=num_experts).cumsum(0)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return (order // indices.shape[1]).int(), offsets, inverse.view(indices.shape).int()


def eager_permute(x, sorted_token_ids, expert_offsets, inverse_positions, indices):
    return x.index_select(0, sorted_token_ids.long())


def astrea_permute(x, *dispatch):
    return ops.permute(x, ops.Dispatch(*dispatch))


def eager_combine(y, weights, scale, sorted_token_ids, expert_offsets, inverse_positions, indices):
    coefficient = (weights * scale[indices.long()]).reshape(-1)
    # Row p of y belongs to the slot r with inverse_positions[r] = p.
    row_coefficient = torch.zeros_like(coefficient).scatter(0, inverse_positions.reshape(-1).long(), coefficient)
    out = torch.zeros(indices.shape[0], y.shape[1], dtype=torch.float32, device=y.device)
    return out.index_add(0, sorted_token_ids.long(), y.float() * row_coefficient[:, None]).to(y.dtype)


def astrea_combine(y, weights, scale, *dispatch):
    return ops.weighted_combine(y, weights, ops.Dispatch(*dispatch), expert_scale=scale)


def with_backward(forward, num_differentiable: int):
    """Forward, then the gradients of the first ``num_differentiable`` inputs (the last input is the output grad)."""

    def step(*args):
        *inputs, grad = args
        return torch.autograd.grad(forward(*inputs), inputs[:num_differentiable], grad)

    return step


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_moe_dispatch(benchmark, provider, case):
    num_experts = case["experts"]
    fn = provider_fn(provider, lambda indices: ops.moe_dispatch(indices, num_experts),
                     lambda indices: eager_dispatch(indices, num_experts))
    slots = case["tokens"] * case["top_k"]
    run(benchmark, fn, lambda: (random_indices(case),), bytes_moved=3 * slots * 4 + (num_experts + 1) * 8,
        info=dict(op="moe_dispatch", provider=provider, **case, dtype_name="int32"))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_permute(benchmark, provider, mode, case):
    tokens, top_k, dim, dtype = case["tokens"], case["top_k"], case["dim"], case["dtype"]
    backward = mode == "forward_backward"
    fn = provider_fn(provider, astrea_permute, eager_permute)
    if backward:
        fn = with_backward(fn, 1)

    def make_inputs():
        x = torch.randn(tokens, dim, device=DEVICE, dtype=dtype, requires_grad=backward)
        grad = (torch.randn(tokens * top_k, dim, device=DEVICE, dtype=dtype),) if backward else ()
        return (x, *dispatch_tensors(case), *grad)

    row_bytes = dim * torch.finfo(dtype).bits // 8
    moved = (tokens + tokens * top_k) * row_bytes * (2 if backward else 1) + tokens * top_k * 8
    run(benchmark, fn, make_inputs, bytes_moved=moved,
        info=dict(op="permute", mode=mode, provider=provider, **case))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_weighted_combine(benchmark, provider, mode, case):
    tokens, top_k, dim, dtype, experts = case["tokens"], case["top_k"], case["dim"], case["dtype"], case["experts"]
    backward = mode == "forward_backward"
    fn = provider_fn(provider, astrea_combine, eager_combine)
    if backward:
        fn = with_backward(fn, 3)

    def make_inputs():
        y = torch.randn(tokens * top_k, dim, device=DEVICE, dtype=dtype, requires_grad=backward)
        weights = torch.rand(tokens, top_k, device=DEVICE, requires_grad=backward)
        scale = torch.rand(experts, device=DEVICE, requires_grad=backward)
        grad = (torch.randn(tokens, dim, device=DEVICE, dtype=dtype),) if backward else ()
        return (y, weights, scale, *dispatch_tensors(case), *grad)

    row_bytes = dim * torch.finfo(dtype).bits // 8
    slots = tokens * top_k
    # Forward: read y, write out. Backward: read grad and y again, write grad y.
    moved = (slots + tokens) * row_bytes + slots * 16
    flops = 2 * slots * dim
    if backward:
        moved += (tokens + 2 * slots) * row_bytes + slots * 8
        flops += 3 * slots * dim
    run(benchmark, fn, make_inputs, bytes_moved=moved, flops=flops,
        info=dict(op="weighted_combine", mode=mode, provider=provider, **case))
