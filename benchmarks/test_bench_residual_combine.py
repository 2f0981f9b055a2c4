"""Stochastic residual, dense weighted combine and the fused combine + residual (dense and
sparse layouts): astrea against eager PyTorch (a torch.bernoulli mask, an einsum over the
stacked experts, the index_add_ combine of benchmarks/test_bench_dispatch_combine.py) and
its torch.compile, forward and forward+backward. GPU sizes on a GPU (Astrea's four vision
experts, B=64 images of T=1024 tokens = 65536 rows, D=2048, bf16: the performance target's
size; sparse: N=65536 tokens, k=8 of E=64 experts, D=2048, bf16), small sizes on the CPU.
The fused op is also timed against astrea's two ops in sequence (provider ``astrea-two-ops``)."""

from __future__ import annotations

import pytest
import torch

from astrea import ops
from benchmarks import test_bench_dispatch_combine as sparse
from benchmarks.harness import DEVICE, ON_GPU, PROVIDERS, provider_fn, run

if ON_GPU:
    CASES = [dict(batch=64, tokens=1024, dim=2048, experts=4, dtype=torch.bfloat16)]
    SPARSE_CASES = [dict(tokens=65536, top_k=8, dim=2048, experts=64, dtype=torch.bfloat16)]
else:
    CASES = [dict(batch=4, tokens=16, dim=256, experts=4, dtype=torch.float32)]
    SPARSE_CASES = [dict(tokens=512, top_k=2, dim=256, experts=8, dtype=torch.float32)]
MODES = ("forward", "forward_backward")
KEEP_P = 0.8
SEED = 1234


def case_id(case: dict) -> str:
    return f"B{case['batch']}-T{case['tokens']}-D{case['dim']}-E{case['experts']}-{str(case['dtype'])[6:]}"


def eager_residual(y, r):
    keep = torch.bernoulli(torch.full((*y.shape[:-1], 1), KEEP_P, device=y.device, dtype=y.dtype))
    return y + r * keep / KEEP_P


def astrea_residual(y, r):
    return ops.stochastic_residual(y, r, KEEP_P, seed=SEED)


def eager_combine(stacked, weights, scale):
    return torch.einsum("be,ebtd->btd", (weights * scale).to(stacked.dtype), stacked)


def astrea_combine(stacked, weights, scale):
    return ops.dense_weighted_combine(stacked, weights, scale)


def eager_combine_residual(stacked, weights, scale, residual):
    return eager_residual(eager_combine(stacked, weights, scale), residual)


def astrea_combine_residual(stacked, weights, scale, residual):
    return ops.combine_residual(stacked, weights, residual, KEEP_P, seed=SEED, expert_scale=scale)


def astrea_two_ops(stacked, weights, scale, residual):
    return astrea_residual(astrea_combine(stacked, weights, scale), residual)


def eager_sparse_combine_residual(y, weights, scale, residual, *dispatch):
    return eager_residual(sparse.eager_combine(y, weights, scale, *dispatch), residual)


def astrea_sparse_combine_residual(y, weights, scale, residual, *dispatch):
    return ops.combine_residual(y, weights, residual, KEEP_P, seed=SEED, expert_scale=scale,
                                dispatch=ops.Dispatch(*dispatch))


def astrea_sparse_two_ops(y, weights, scale, residual, *dispatch):
    return astrea_residual(sparse.astrea_combine(y, weights, scale, *dispatch), residual)


def with_backward(forward):
    """Forward, then the gradients of every input but the last (the output gradient)."""

    def step(*args):
        *inputs, grad = args
        return torch.autograd.grad(forward(*inputs), inputs, grad)

    return step


def _inputs(case: dict, backward: bool, *, stacked: bool, residual: bool):
    batch, tokens, dim, experts, dtype = (case[k] for k in ("batch", "tokens", "dim", "experts", "dtype"))
    features = (batch, tokens, dim)

    def make_inputs():
        args = []
        if stacked:
            weights = torch.rand(batch, experts, device=DEVICE)
            args += [torch.randn(experts, *features, device=DEVICE, dtype=dtype),
                     weights / weights.sum(1, keepdim=True), torch.rand(experts, device=DEVICE) + 0.5]
        else:
            args.append(torch.randn(features, device=DEVICE, dtype=dtype))
        if residual:
            args.append(torch.randn(features, device=DEVICE, dtype=dtype))
        args = [a.requires_grad_(backward) for a in args]
        return (*args, torch.randn(features, device=DEVICE, dtype=dtype)) if backward else tuple(args)

    return make_inputs


def _features_bytes(case: dict) -> int:
    return case["batch"] * case["tokens"] * case["dim"] * torch.finfo(case["dtype"]).bits // 8


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_stochastic_residual(benchmark, provider, mode, case):
    backward = mode == "forward_backward"
    fn = provider_fn(provider, astrea_residual, eager_residual)
    # Read y and r, write out; backward: read grad, write d r (d y is grad itself).
    moved = (5 if backward else 3) * _features_bytes(case)
    run(benchmark, with_backward(fn) if backward else fn,
        _inputs(case, backward, stacked=False, residual=True), bytes_moved=moved,
        info=dict(op="stochastic_residual", mode=mode, provider=provider, p=KEEP_P, **case))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_dense_weighted_combine(benchmark, provider, mode, case):
    backward = mode == "forward_backward"
    experts = case["experts"]
    fn = provider_fn(provider, astrea_combine, eager_combine)
    # Read E experts, write out; backward: read grad and E experts, write E gradients.
    moved = ((3 * experts + 2) if backward else (experts + 1)) * _features_bytes(case)
    elements = case["batch"] * case["tokens"] * case["dim"]
    run(benchmark, with_backward(fn) if backward else fn,
        _inputs(case, backward, stacked=True, residual=False), bytes_moved=moved,
        flops=(4 if backward else 2) * experts * elements,
        info=dict(op="dense_weighted_combine", mode=mode, provider=provider, **case))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", (*PROVIDERS, "astrea-two-ops"))
def test_combine_residual(benchmark, provider, mode, case):
    backward = mode == "forward_backward"
    experts = case["experts"]
    if provider == "astrea-two-ops":
        fn = astrea_two_ops
    else:
        fn = provider_fn(provider, astrea_combine_residual, eager_combine_residual)
    # The combine's traffic plus the residual read (and, backward, its gradient write).
    moved = ((3 * experts + 4) if backward else (experts + 2)) * _features_bytes(case)
    elements = case["batch"] * case["tokens"] * case["dim"]
    run(benchmark, with_backward(fn) if backward else fn,
        _inputs(case, backward, stacked=True, residual=True), bytes_moved=moved,
        flops=(4 if backward else 2) * experts * elements,
        info=dict(op="combine_residual", mode=mode, provider=provider, p=KEEP_P, **case))


@pytest.mark.parametrize("case", SPARSE_CASES, ids=sparse.case_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", (*PROVIDERS, "astrea-two-ops"))
def test_combine_residual_sparse(benchmark, provider, mode, case):
    tokens, top_k, dim, dtype, experts = case["tokens"], case["top_k"], case["dim"], case["dtype"], case["experts"]
    backward = mode == "forward_backward"
    if provider == "astrea-two-ops":
        fn = astrea_sparse_two_ops
    else:
        fn = provider_fn(provider, astrea_sparse_combine_residual, eager_sparse_combine_residual)
    if backward:
        fn = sparse.with_backward(fn, 4)  # expert outputs, weights, scale, residual

    def make_inputs():
        y = torch.randn(tokens * top_k, dim, device=DEVICE, dtype=dtype, requires_grad=backward)
        weights = torch.rand(tokens, top_k, device=DEVICE, requires_grad=backward)
        scale = torch.rand(experts, device=DEVICE, requires_grad=backward)
        residual = torch.randn(tokens, dim, device=DEVICE, dtype=dtype, requires_grad=backward)
        grad = (torch.randn(tokens, dim, device=DEVICE, dtype=dtype),) if backward else ()
        return (y, weights, scale, residual, *sparse.dispatch_tensors(case), *grad)

    row_bytes = dim * torch.finfo(dtype).bits // 8
    slots = tokens * top_k
    # weighted_combine's traffic (see test_bench_dispatch_combine.py) plus the residual read
    # and, backward, the residual gradient's write.
    moved = (slots + 2 * tokens) * row_bytes + slots * 16
    flops = 2 * slots * dim
    if backward:
        moved += (2 * tokens + 2 * slots) * row_bytes + slots * 8
        flops += 3 * slots * dim
    run(benchmark, fn, make_inputs, bytes_moved=moved, flops=flops,
        info=dict(op="combine_residual_sparse", mode=mode, provider=provider, p=KEEP_P, **case))
