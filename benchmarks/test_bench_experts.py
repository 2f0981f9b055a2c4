"""A transformers MoE block (Qwen3-MoE: router + fused experts) patched with astrea against the
same block on transformers' own experts implementations, forward and forward+backward.

``eager`` is transformers' fastest path here, its ``grouped_mm`` experts, and ``compile`` its
``torch.compile``; ``hf_eager`` (transformers' per-expert loop) is recorded beside them. All
providers run the same weights. GPU sizes on a GPU, scaled-down ones on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

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
PROVIDERS = ("astrea", "eager", "compile", "hf_eager")
# transformers' experts implementation each provider runs (astrea replaces the experts forward).
IMPLEMENTATION = {"astrea": "grouped_mm", "eager": "grouped_mm", "compile": "grouped_mm", "hf_eager": "eager"}


def case_id(case: dict) -> str:
    return (f"N{case['tokens']}-H{case['hidden']}-I{case['intermediate']}-E{case['experts']}-k{case['top_k']}-"
            f"{str(case['dtype'])[6:]}")


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


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
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
