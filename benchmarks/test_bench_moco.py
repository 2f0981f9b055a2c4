"""Momentum-queue contrast: astrea's fused ops against eager PyTorch (einsum + cat +
cross_entropy, the MoCo reference code) and its torch.compile, forward and
forward+backward; time and peak memory.

    pytest benchmarks/test_bench_moco.py --benchmark-only

On the GPU the inputs are bf16, which astrea's CUDA kernels compute on tensor cores; each
result records its FLOPs (2 N K D forward, twice that forward+backward: the useful work,
not counting the backward's recompute of the logits) and their rate as % of the measured
bf16 matmul peak (an 8192^3 torch matmul on the same GPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from astrea import _extension, ops
from benchmarks.harness import DEVICE, ON_GPU, PROVIDERS, provider_fn, run

pytestmark = pytest.mark.skipif(not _extension.available(), reason="astrea._C is not built")

TEMPERATURE = 0.07
if ON_GPU:
    SHAPES = [(n, k, d) for n in (256, 4096) for k in (16384, 65536) for d in (128, 256)]
    DTYPE = torch.bfloat16
else:
    SHAPES = [(256, 8192, 128), (512, 16384, 128)]
    DTYPE = torch.float32


def eager_logits(q, k, queue):
    positive = torch.einsum("nd,nd->n", q, k).unsqueeze(1)
    negative = torch.einsum("nd,kd->nk", q, queue)
    return torch.cat([positive, negative], dim=1).float() / TEMPERATURE


def eager_infonce(q, k, queue):
    logits = eager_logits(q, k, queue)
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def astrea_logits(q, k, queue):
    return ops.moco_logits(q, k, queue, TEMPERATURE)


def astrea_infonce(q, k, queue):
    return ops.moco_infonce(q, k, queue, TEMPERATURE)


OPS = {"moco_logits": (astrea_logits, eager_logits), "moco_infonce": (astrea_infonce, eager_infonce)}


def forward_backward(fn):
    def step(q, k, queue):
        out = fn(q, k, queue)
        out.sum().backward()
        return out

    return step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-K{}-D{}".format(*s))
def test_moco(benchmark, shape, op, backward, provider):
    n, num_keys, dim = shape
    astrea_fn, eager_fn = OPS[op]
    if backward:
        astrea_fn, eager_fn = forward_backward(astrea_fn), forward_backward(eager_fn)
    fn = provider_fn(provider, astrea_fn, eager_fn)
    if not backward:
        fn = torch.no_grad()(fn)

    def make_inputs():
        q = F.normalize(torch.randn(n, dim, device=DEVICE), dim=1).to(DTYPE).requires_grad_(backward)
        k = F.normalize(torch.randn(n, dim, device=DEVICE), dim=1).to(DTYPE).requires_grad_(backward)
        queue = F.normalize(torch.randn(num_keys, dim, device=DEVICE), dim=1).to(DTYPE)
        return q, k, queue

    element = torch.tensor([], dtype=DTYPE).element_size()
    output_bytes = 4 * n * (1 + num_keys) if op == "moco_logits" else 4
    bytes_moved = (2 * n * dim + num_keys * dim) * element + output_bytes
    if backward:  # the gradients of q and k are written
        bytes_moved += 2 * n * dim * element
    flops = 2 * n * num_keys * dim * (2 if backward else 1)
    run(benchmark, fn, make_inputs, bytes_moved=bytes_moved, flops=flops,
        info={"op": op, "pass": "forward_backward" if backward else "forward", "provider": provider,
              "N": n, "K": num_keys, "D": dim, "dtype": str(DTYPE).removeprefix("torch."),
              "logits_fp32_bytes": 4 * n * (1 + num_keys)})
