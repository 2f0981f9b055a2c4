"""Fused router (astrea.ops.router_topk + its losses) against eager PyTorch and its
torch.compile: softmax -> topk -> renormalise -> bincount, plus the score sums and the
log-sum-exp the balancing and z losses need, forward and forward+backward."""

import pytest
import torch

from astrea.ops import load_balancing_loss, router_topk, router_z_loss
from astrea.ops.router import RouterOutput
from benchmarks.harness import DEVICE, ON_GPU, PROVIDERS, provider_fn, run

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
