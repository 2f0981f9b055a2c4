"""The grouped experts, forward and forward+backward, GPU sizes on a GPU (the issue's shapes:
Qwen3-30B-A3B and Mixtral, bf16) and scaled-down ones on the CPU.

``test_moe_block``: a transformers MoE block (Qwen3-MoE: router + fused experts) patched with
astrea against the same block on transformers' own experts implementations: ``eager`` is its
``grouped_mm`` experts (its fastest path here), ``compile`` their ``torch.compile``,
``hf_batched_mm`` and ``hf_eager`` (the per-expert loop) its other two. All providers run the
same weights. On the CPU astrea and ``eager`` (the comparison) run every case and the slower
comparators only the cases where they say something (see :func:`runs`), so that the
file finishes in minutes.

``test_moe_experts``: the op alone on one dispatch, ``astrea.ops.moe_experts`` (the Triton
kernels on CUDA tensors, F.grouped_mm on CPU ones) against the composite it replaces
(``permute`` + two ``F.grouped_mm`` + ``weighted_combine``), that composite's ``torch.compile``
and a per-expert loop; TFLOP/s and % of the measured matmul peak recorded.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from astrea import ops
from astrea.ops import experts as experts_op
from astrea.reference.experts import expert_ffn
from benchmarks.harness import DEVICE, ON_GPU, compiled, run

transformers = pytest.importorskip("transformers")
from astrea.integrations.transformers import apply_astrea  # noqa: E402

if ON_GPU:
    CASES = [dict(tokens=tokens, hidden=2048, intermediate=768, experts=128, top_k=8, dtype=torch.bfloat16)
             for tokens in (8192, 32768)]
    CASES.append(dict(tokens=4096, hidden=4096, intermediate=14336, experts=8, top_k=2, dtype=torch.bfloat16))
else:
    CASES = [dict(tokens=1024, hidden=512, intermediate=1024, experts=8, top_k=2, dtype=dtype)
             for dtype in (torch.float32, torch.bfloat16)]
    CASES += [dict(tokens=1024, hidden=512, intermediate=256, experts=64, top_k=8, dtype=dtype)
              for dtype in (torch.float32, torch.bfloat16)]
MODES = ("forward", "forward_backward")
PROVIDERS = ("astrea", "eager", "compile", "hf_batched_mm", "hf_eager")
# transformers' experts implementation each provider runs (astrea replaces the experts forward).
IMPLEMENTATION = {"astrea": "grouped_mm", "eager": "grouped_mm", "compile": "grouped_mm",
                  "hf_batched_mm": "batched_mm", "hf_eager": "eager"}
# torch.compile traces F.grouped_mm only in bf16: in fp32 transformers' compiled experts fall
# back to a per-expert loop, and the composite does not trace.
BF16_ONLY = frozenset({"compile", "composite_compile"})
# The CPU runs the per-expert loops on the bf16 cases only (one dtype per shape shows the loop's
# cost), and their backward at the few-expert shape only: each expert's w[e] sends the backward
# a zero gradient of the whole stack, E**2 * 3*H*I elements a step (6-7 s a call at E = 64).
# transformers' batched_mm gathers one weight matrix per routing slot, N*k*3*H*I elements
# (13 GB in fp32 at the CPU shapes): a decoding path, not run on the CPU.
CPU_LOOPS = frozenset({"hf_eager", "loop"})
CPU_LOOP_BACKWARD_MAX_EXPERTS = 8
CPU_NEVER = frozenset({"hf_batched_mm"})


def case_id(case: dict) -> str:
    return (f"N{case['tokens']}-H{case['hidden']}-I{case['intermediate']}-E{case['experts']}-k{case['top_k']}-"
            f"{str(case['dtype'])[6:]}")


def runs(provider: str, mode: str, case: dict) -> bool:
    """Whether ``provider`` times ``case`` in ``mode`` here: astrea and its comparison
    (transformers' grouped_mm experts, the composite) always; the other comparators where they
    trace and, on the CPU, where they finish in seconds."""
    bf16 = case["dtype"] == torch.bfloat16
    if provider in BF16_ONLY and not bf16:
        return False
    if ON_GPU or provider not in CPU_LOOPS | CPU_NEVER:
        return True
    if provider in CPU_NEVER or not bf16:
        return False
    return mode == "forward" or case["experts"] <= CPU_LOOP_BACKWARD_MAX_EXPERTS


def parameters(providers: tuple[str, ...]) -> list:
    """(provider, mode, case) of every provider, mode and case that :func:`runs`."""
    return [pytest.param(provider, mode, case, id=f"{provider}-{mode}-{case_id(case)}")
            for provider in providers for mode in MODES for case in CASES if runs(provider, mode, case)]


_BLOCKS: dict = {}


def block(case: dict, provider: str) -> torch.nn.Module:
    """One randomly initialised Qwen3-MoE block per case (every provider gets a copy of it)."""
    key = case_id(case)
    if key not in _BLOCKS:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        config = transformers.Qwen3MoeConfig(hidden_size=case["hidden"], moe_intermediate_size=case["intermediate"],
                                             num_experts=case["experts"], num_experts_per_tok=case["top_k"],
                                             norm_topk_prob=True)
        torch.manual_seed(0)
        original = Qwen3MoeSparseMoeBlock(config)
        # The router's weight is created as zeros (a checkpoint fills it): every token would tie
        # on every expert and go to the same k. Unit-scale logits spread the tokens as a trained
        # router does.
        torch.nn.init.normal_(original.gate.weight, std=case["hidden"] ** -0.5)
        torch.nn.init.normal_(original.experts.gate_up_proj, std=case["hidden"] ** -0.5)
        torch.nn.init.normal_(original.experts.down_proj, std=case["intermediate"] ** -0.5)
        _BLOCKS[key] = original.to(DEVICE, case["dtype"])
    copied = copy.deepcopy(_BLOCKS[key])
    copied.experts.config = copy.copy(copied.experts.config)
    copied.experts.config._experts_implementation = IMPLEMENTATION[provider]
    if provider == "astrea":
        wrapper = torch.nn.Sequential(copied)  # apply_astrea patches the blocks of a model
        apply_astrea(wrapper)
    return compiled(copied) if provider == "compile" else copied


@pytest.mark.parametrize("provider, mode, case", parameters(PROVIDERS))
def test_moe_block(benchmark, provider, mode, case):
    tokens, hidden, intermediate = case["tokens"], case["hidden"], case["intermediate"]
    experts, top_k, dtype = case["experts"], case["top_k"], case["dtype"]
    backward = mode == "forward_backward"
    module = block(case, provider)
    params = [p for p in module.parameters() if p.requires_grad]

    def forward(x):
        return module(x)

    def step(x, grad):
        return torch.autograd.grad(module(x), [x, *params], grad)

    def make_inputs():
        x = torch.randn(1, tokens, hidden, device=DEVICE, dtype=dtype, requires_grad=backward)
        return (x, torch.randn_like(x)) if backward else (x,)

    element = torch.finfo(dtype).bits // 8
    weight_bytes = experts * 3 * hidden * intermediate * element
    slots = tokens * top_k
    moved = weight_bytes + 2 * tokens * hidden * element + slots * (2 * intermediate + hidden) * element
    flops = 2 * slots * 3 * hidden * intermediate
    if backward:
        moved *= 3
        flops *= 3
    with torch.no_grad() if not backward else torch.enable_grad():
        run(benchmark, step if backward else forward, make_inputs, bytes_moved=moved, flops=flops,
            info=dict(op="moe_block", mode=mode, provider=provider, **case))


OP_PROVIDERS = ("astrea", "composite", "composite_compile", "loop")


def composite(x, dispatch, gate_up, down, weights):
    """The layer as astrea's own ops and torch's grouped GEMMs compose it: the permuted copy of x,
    the activation between two F.grouped_mm, the weighted combine."""
    rows = ops.permute(x, dispatch)
    group_ends = dispatch.expert_offsets[1:].to(torch.int32)
    gate, up = F.grouped_mm(rows, gate_up.transpose(-2, -1), offs=group_ends).chunk(2, dim=-1)
    y = F.grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=group_ends)
    return ops.weighted_combine(y, weights, dispatch)


def per_expert_loop(x, dispatch, gate_up, down, weights):
    """One matmul pair per expert after reading the offsets on the host."""
    rows = ops.permute(x, dispatch)
    bounds = dispatch.expert_offsets.tolist()
    y = torch.cat([expert_ffn(rows[lo:hi], gate_up[e], down[e], "silu", True)
                   for e, (lo, hi) in enumerate(zip(bounds, bounds[1:]))])
    return ops.weighted_combine(y, weights, dispatch)


def grouped_experts(x, dispatch, gate_up, down, weights):
    return ops.moe_experts(x, dispatch, gate_up, down, weights)


_COMPOSITE_COMPILED = compiled(composite)
OP_FN = {"astrea": grouped_experts, "composite": composite, "composite_compile": _COMPOSITE_COMPILED,
         "loop": per_expert_loop}


@pytest.mark.parametrize("provider, mode, case", parameters(OP_PROVIDERS))
def test_moe_experts(benchmark, provider, mode, case):
    tokens, hidden, intermediate = case["tokens"], case["hidden"], case["intermediate"]
    experts, top_k, dtype = case["experts"], case["top_k"], case["dtype"]
    backward = mode == "forward_backward"
    torch.manual_seed(0)
    weights, indices = torch.randn(tokens, experts, device=DEVICE).softmax(-1).topk(top_k)
    dispatch = ops.moe_dispatch(indices.to(torch.int32), experts)
    gate_up = (torch.randn(experts, 2 * intermediate, hidden, device=DEVICE) * hidden**-0.5).to(dtype)
    down = (torch.randn(experts, hidden, intermediate, device=DEVICE) * intermediate**-0.5).to(dtype)
    leaves = [t.requires_grad_(backward) for t in (gate_up, down, weights)]
    fn = OP_FN[provider]

    def forward(x):
        return fn(x, dispatch, *leaves)

    def step(x, grad):
        return torch.autograd.grad(fn(x, dispatch, *leaves), [x, *leaves], grad)

    def make_inputs():
        x = torch.randn(tokens, hidden, device=DEVICE, dtype=dtype, requires_grad=backward)
        return (x, torch.randn_like(x)) if backward else (x,)

    element = torch.finfo(dtype).bits // 8
    slots = tokens * top_k
    moved = experts * 3 * hidden * intermediate * element + 2 * tokens * hidden * element
    flops = 2 * slots * 3 * hidden * intermediate
    if backward:
        moved *= 3
        flops *= 3
    with torch.no_grad() if not backward else torch.enable_grad():
        run(benchmark, step if backward else forward, make_inputs, bytes_moved=moved, flops=flops,
            info=dict(op="moe_experts", mode=mode, provider=provider,
                      implementation=experts_op.SPEC.describe(DEVICE.type) if provider == "astrea" else provider,
                      **case))


@pytest.mark.skipif(not ON_GPU, reason="the Triton experts kernels at the issue's GPU shapes need a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_moe_experts_triton_qwen3_30b_a3b(benchmark, mode):
    """The issue's headline: Qwen3-30B-A3B experts (E=128, H=2048, I=768, k=8), T=32768, bf16,
    on the Triton kernels (targets: 450 TFLOP/s forward, 380 forward+backward)."""
    assert experts_op.SPEC.choose(DEVICE) == "triton"
    test_moe_experts(benchmark, "astrea", mode, dict(tokens=32768, hidden=2048, intermediate=768, experts=128,
                                                      top_k=8, dtype=torch.bfloat16))
