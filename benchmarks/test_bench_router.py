"""Fused router (astrea.ops.router_topk + its losses) against eager PyTorch and its
torch.compile: softmax -> topk -> renormalise -> bincount, plus the score sums and the
log-sum-exp the balancing and z losses need, forward and forward+backward; and the
DeepSeek-V3 grouped router against transformers' router of that family."""

import pytest
import torch

from astrea.ops import load_balancing_loss, router_topk, router_z_loss
from astrea.ops.router import RouterOutput
from benchmarks.harness import DEVICE, ON_GPU, PROVIDERS, compiled, provider_fn, run

if ON_GPU:
    TOKENS, EXPERTS, TOP_K, DTYPE = (4096, 65536, 262144), (8, 64, 256), (2, 8), torch.bfloat16
else:
    TOKENS, EXPERTS, TOP_K, DTYPE = (2048,), (64,), (2, 8), torch.float32
MODES = ("forward", "forward_backward")


def eager_router(logits: torch.Tensor, k: int) -> RouterOutput:
    x = logits.float()
    probs = torch.softmax(x, dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    counts = torch.bincount(indices.flatten(), minlength=x.shape[1])
    return RouterOutput(weights, indices, counts, probs.sum(0), torch.logsumexp(x, dim=-1))


def astrea_router(logits: torch.Tensor, k: int) -> RouterOutput:
    return router_topk(logits, k)


def _training_loss(out: RouterOutput) -> torch.Tensor:
    # Stands in for the expert outputs the weights would scale, plus both router losses.
    return out.weights.square().sum() + load_balancing_loss(out) + router_z_loss(out)


def eager_loss(logits: torch.Tensor, k: int) -> torch.Tensor:
    return _training_loss(eager_router(logits, k))


def astrea_loss(logits: torch.Tensor, k: int) -> torch.Tensor:
    return _training_loss(astrea_router(logits, k))


def _bytes_moved(mode: str, n: int, e: int, k: int) -> int:
    logits = n * e * torch.tensor([], dtype=DTYPE).element_size()
    outputs = n * k * 8 + n * 4 + e * 8  # weights + indices, lse, counts + prob_sums
    if mode == "forward":
        return logits + outputs
    # Backward: logits, indices, lse and the weight gradient in, grad_logits out.
    return logits + outputs + 2 * logits + n * k * 8 + n * 4


@pytest.mark.parametrize("k", TOP_K)
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_router(benchmark, provider, mode, num_tokens, num_experts, k):
    if k > num_experts:
        pytest.skip("k > E")
    backward = mode == "forward_backward"

    def make_inputs():
        logits = torch.randn(num_tokens, num_experts, device=DEVICE, dtype=DTYPE, requires_grad=backward)
        return logits, k

    if backward:
        loss = provider_fn(provider, astrea_loss, eager_loss)

        def fn(logits, k):
            return torch.autograd.grad(loss(logits, k), logits)
    else:
        fn = provider_fn(provider, astrea_router, eager_router)
    run(benchmark, fn, make_inputs, bytes_moved=_bytes_moved(mode, num_tokens, num_experts, k),
        info={"op": "router_topk", "provider": provider, "mode": mode, "N": num_tokens, "E": num_experts,
              "k": k, "dtype": str(DTYPE).removeprefix("torch.")})


# ---- DeepSeek-V3 grouped router -----------------------------------------------------------------
# sigmoid scores + selection bias, 8 groups ranked by their top-2 sums, top-4 groups, top-8
# experts, renormalised and scaled, against transformers' DeepseekV3TopkRouter. "routing"
# starts from the logits (the router after its F.linear); "module" is the whole router
# module from the hidden states, the F.linear (fp32, as transformers runs it) included.
V3_EXPERTS, V3_GROUPS, V3_TOPK_GROUPS, V3_TOP_K, V3_SCALE = 256, 8, 4, 8, 2.5
if ON_GPU:
    V3_TOKENS, V3_HIDDEN, V3_DTYPE = 65536, 7168, torch.bfloat16
else:
    V3_TOKENS, V3_HIDDEN, V3_DTYPE = 4096, 512, torch.float32


def _v3_router_module():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = DeepseekV3Config(hidden_size=V3_HIDDEN, n_routed_experts=V3_EXPERTS, n_group=V3_GROUPS,
                              topk_group=V3_TOPK_GROUPS, num_experts_per_tok=V3_TOP_K, norm_topk_prob=True,
                              routed_scaling_factor=V3_SCALE)
    router = DeepseekV3TopkRouter(config).to(DEVICE)
    with torch.no_grad():
        router.weight.normal_(0, V3_HIDDEN**-0.5)
        router.e_score_correction_bias.uniform_(-0.1, 0.1)
    return router


def transformers_v3_routing(router, logits: torch.Tensor):
    """The torch ops of DeepseekV3TopkRouter.forward after its F.linear, on given logits (the
    module itself only takes hidden states)."""
    x = logits.float()
    scores = x.sigmoid()
    choice = scores + router.e_score_correction_bias
    group_scores = choice.view(-1, V3_GROUPS, V3_EXPERTS // V3_GROUPS).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=V3_TOPK_GROUPS, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, V3_GROUPS, V3_EXPERTS // V3_GROUPS).reshape(-1, V3_EXPERTS)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    indices = torch.topk(choice, k=V3_TOP_K, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * V3_SCALE, indices


def astrea_v3_routing(router, logits: torch.Tensor):
    out = router_topk(logits, V3_TOP_K, scoring="sigmoid", bias=router.e_score_correction_bias,
                      num_groups=V3_GROUPS, topk_groups=V3_TOPK_GROUPS, scaling_factor=V3_SCALE)
    return out.weights, out.indices


def transformers_v3_module(router, hidden: torch.Tensor):
    _, weights, indices = router(hidden)
    return weights, indices


def astrea_v3_module(router, hidden: torch.Tensor):
    logits = torch.nn.functional.linear(hidden.float(), router.weight.float())
    return astrea_v3_routing(router, logits)


@pytest.mark.parametrize("scope", ("routing", "module"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ("astrea", "transformers", "compile"))
def test_deepseek_v3_router(benchmark, provider, mode, scope):
    pytest.importorskip("transformers")
    router = _v3_router_module()
    backward = mode == "forward_backward"
    width = V3_EXPERTS if scope == "routing" else V3_HIDDEN
    baseline = transformers_v3_routing if scope == "routing" else transformers_v3_module
    ours = astrea_v3_routing if scope == "routing" else astrea_v3_module
    forward = {"astrea": ours, "transformers": baseline, "compile": compiled(baseline)}[provider]

    def make_inputs():
        return (torch.randn(V3_TOKENS, width, device=DEVICE, dtype=V3_DTYPE, requires_grad=backward),)

    if backward:
        def fn(x):
            weights, _ = forward(router, x)
            return torch.autograd.grad(weights.square().sum(), x)
    else:
        def fn(x):
            return forward(router, x)

    logits_bytes = V3_TOKENS * V3_EXPERTS * torch.tensor([], dtype=V3_DTYPE).element_size()
    outputs = V3_TOKENS * V3_TOP_K * 8
    moved = logits_bytes + outputs + (2 * logits_bytes + V3_TOKENS * V3_TOP_K * 8 if backward else 0)
    if scope == "module":
        moved += V3_TOKENS * V3_HIDDEN * torch.tensor([], dtype=V3_DTYPE).element_size() * (2 if backward else 1)
    flops = 0 if scope == "routing" else 2 * V3_TOKENS * V3_HIDDEN * V3_EXPERTS * (3 if backward else 1)
    run(benchmark, fn, make_inputs, bytes_moved=moved, flops=flops,
        info={"op": "router_topk_deepseek_v3", "provider": provider, "mode": mode, "scope": scope, "N": V3_TOKENS,
              "E": V3_EXPERTS, "k": V3_TOP_K, "groups": f"{V3_TOPK_GROUPS}/{V3_GROUPS}", "H": V3_HIDDEN,
              "dtype": str(V3_DTYPE).removeprefix("torch.")})
