"""Bitwise reproducibility of every op on the default CPU path (the C++ CPU kernels of astrea._C,
torch's kernels for moe_experts): forward and backward give identical bits on two runs and on
1 and 2 torch threads. Sizes are chosen so that the kernels really split their work over the
threads: at::parallel_for hands out rows in grains of 16 (moe.cpp, dense_combine.cpp, moco.cpp),
64 (residual.cpp) or blocks of 256 rows (router.cpp; backward tiles of 8192 / E rows), and the
MoCo kernels stream the queue in chunks of max(128, min(2^20 / N, K / 32)) keys, one BLAS GEMM
each. Every case here has several grains per thread.

tests/test_edge_cases.py already checks 1 against 2 threads for the fp32 router (softmax and
sigmoid, with and without bias, renormalised) and for the fp32 dispatch + permute + combine; the
router and sparse-combine cases here take the other settings: low precision, strided inputs,
renormalize=False, softmax over the top k, a bias on the logits, grouped selection, a scaling
factor, both router losses, zero-weight slots, a skewed dispatch histogram.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from astrea import _extension, ops
from tests.utils import assert_bitwise_reproducible, running, strided

pytestmark = pytest.mark.skipif(not _extension.available(), reason="astrea._C is not built")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf of the same values and strides, so that each run starts from its own tensor."""
    return t.detach().clone().requires_grad_()


def _grads(loss: torch.Tensor, **leaves: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient of ``loss`` for each named leaf, named ``grad <leaf>``."""
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {f"grad {name}": g for name, g in zip(leaves, grads)}


# ---- router and its losses --------------------------------------------------------------------

# (E, router options, dtype, strided logits); N = 4099 rows: 17 blocks of 256 rows forward,
# backward tiles of 8192 / E rows (31 of 134 rows at E = 61, 33 of 128 at E = 64).
ROUTER_CASES = [
    (61, {"scoring": "sigmoid", "bias": True, "renormalize": False}, torch.bfloat16, True),
    (61, {"scoring": "sigmoid", "bias": True}, torch.float16, False),
    (61, {"scoring": "softmax", "renormalize": False}, torch.float16, True),
    (61, {"scoring": "softmax", "bias": True}, torch.bfloat16, False),
    (61, {"scoring": "topk_softmax", "bias": True, "bias_on": "logits"}, torch.float32, True),
    # DeepSeek-V3's routing: 8 groups of 8 experts, the top 4 groups by their top-2 sums.
    (64, {"scoring": "sigmoid", "bias": True, "num_groups": 8, "topk_groups": 4, "scaling_factor": 2.5},
     torch.bfloat16, False),
    (64, {"scoring": "softmax", "num_groups": 8, "topk_groups": 3, "group_score": "max"}, torch.float32, True),
]
ROUTER_IDS = ["sigmoid-bias-raw-bf16-strided", "sigmoid-bias-fp16", "softmax-raw-fp16-strided",
              "softmax-bias-bf16", "topk_softmax-logit-bias-strided", "grouped-sigmoid-bias-scaled-bf16",
              "grouped-max-softmax-strided"]


@pytest.mark.parametrize("e, options, dtype, is_strided", ROUTER_CASES, ids=ROUTER_IDS)
def test_router_and_losses(e, options, dtype, is_strided):
    n, k = 4099, 6
    g = _generator(1)
    logits = (torch.randn(n, e, generator=g) * 2).to(dtype)
    options = {**options, "bias": torch.randn(e, generator=g) * 0.05 if options.get("bias") else None}
    grad_weights = torch.randn(n, k, generator=g)

    def run():
        x = _leaf(strided(logits) if is_strided else logits)
        with running("cpu", "router_topk"):
            out = ops.router_topk(x, k, **options)
        loss = ((out.weights * grad_weights).sum() + ops.load_balancing_loss(out) + 1e-3 * ops.router_z_loss(out))
        return {**out._asdict(), "loss": loss, **_grads(loss, logits=x)}

    assert_bitwise_reproducible(run)


# ---- dispatch, permute and the sparse combines --------------------------------------------------


def _skewed_indices(n: int, e: int, k: int, g: torch.Generator) -> torch.Tensor:
    """k distinct experts per token, expert 0 in most rows (a skewed histogram)."""
    keys = torch.rand(n, e, generator=g)
    keys[:, 0] += (torch.rand(n, generator=g) < 0.8).float()
    return keys.topk(k, dim=1).indices.int()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dispatch_and_permute(dtype):
    n, e, k, d = 4097, 61, 3, 40
    g = _generator(2)
    indices = _skewed_indices(n, e, k, g)
    x = torch.randn(n, d, generator=g).to(dtype)
    grad = torch.randn(n * k, d, generator=g).to(dtype)

    def run():
        xs = _leaf(strided(x))
        with running("cpu", "moe_dispatch", "permute"):
            dispatch = ops.moe_dispatch(indices, e)
            rows = ops.permute(xs, dispatch)
        return {**dispatch._asdict(), "rows": rows, **_grads((rows * grad).sum(), x=xs)}

    assert_bitwise_reproducible(run)


def _sparse_case(dtype, seed):
    n, e, k, d = 2053, 37, 4, 48
    g = _generator(seed)
    indices = _skewed_indices(n, e, k, g)
    weights = torch.rand(n, k, generator=g)
    weights[::3, 1] = 0.0  # zero-weight slots are skipped in forward, not in backward
    expert_out = torch.randn(n * k, d, generator=g).to(dtype)
    scale = torch.rand(e, generator=g) + 0.5
    grad = torch.randn(n, d, generator=g).to(dtype)
    return indices, e, weights, expert_out, scale, grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weighted_combine(dtype):
    indices, e, weights, expert_out, scale, grad = _sparse_case(dtype, 3)

    def run():
        y, w, s = _leaf(strided(expert_out)), _leaf(weights), _leaf(scale)
        with running("cpu", "moe_dispatch", "weighted_combine"):
            out = ops.weighted_combine(y, w, ops.moe_dispatch(indices, e), s)
        return {"out": out, **_grads((out * grad).sum(), expert_out=y, weights=w, expert_scale=s)}

    assert_bitwise_reproducible(run)


@pytest.mark.parametrize("granularity", ["token", "sample"])
def test_sparse_combine_residual(granularity):
    indices, e, weights, expert_out, scale, _ = _sparse_case(torch.float32, 4)
    n, d = weights.shape[0], expert_out.shape[1]
    g = _generator(5)
    # [B, T, D] whose rows flatten to the N tokens: sample units of 2053 / 1 rows, token units of 1.
    residual = torch.randn(1, n, d, generator=g) if granularity == "sample" else torch.randn(n, d, generator=g)
    grad = torch.randn(residual.shape, generator=g)

    def run():
        y, w, s, r = _leaf(expert_out), _leaf(weights), _leaf(scale), _leaf(residual)
        with running("cpu", "moe_dispatch", "weighted_combine", "combine_residual"):
            out = ops.combine_residual(y, w, r, 0.7, seed=11, offset=3, granularity=granularity, expert_scale=s,
                                       dispatch=ops.moe_dispatch(indices, e))
        return {"out": out, **_grads((out * grad).sum(), expert_out=y, weights=w, expert_scale=s, residual=r)}

    assert_bitwise_reproducible(run)


# ---- dense combine and the stochastic residual ------------------------------------------------


def _dense_case(dtype, seed):
    """E = 4 strided experts [B, T, D] = [6, 70, 40]: 420 rows of 16-row grains forward,
    24 (sample, expert) tasks backward."""
    g = _generator(seed)
    experts = [strided(torch.randn(6, 70, 40, generator=g).to(dtype)) for _ in range(4)]
    weights = torch.softmax(torch.randn(6, 4, generator=g), dim=1)
    weights[2, 1] = 0.0
    scale = torch.rand(4, generator=g) + 0.5
    residual = torch.randn(6, 70, 40, generator=g).to(dtype)
    grad = torch.randn(6, 70, 40, generator=g).to(dtype)
    return experts, weights, scale, residual, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_weighted_combine(dtype):
    experts, weights, scale, _, grad = _dense_case(dtype, 6)

    def run():
        ys, w, s = [_leaf(y) for y in experts], _leaf(weights), _leaf(scale)
        with running("cpu", "dense_weighted_combine"):
            out = ops.dense_weighted_combine(ys, w, s)
        leaves = {**{f"expert_out[{e}]": y for e, y in enumerate(ys)}, "weights": w, "expert_scale": s}
        return {"out": out, **_grads((out * grad).sum(), **leaves)}

    assert_bitwise_reproducible(run)


@pytest.mark.parametrize("granularity", ["token", "sample"])
def test_dense_combine_residual(granularity):
    experts, weights, scale, residual, grad = _dense_case(torch.float16, 7)

    def run():
        ys, w, s, r = [_leaf(y) for y in experts], _leaf(weights), _leaf(scale), _leaf(residual)
        with running("cpu", "dense_weighted_combine", "combine_residual"):
            out = ops.combine_residual(torch.stack(ys), w, r, 0.6, seed=5, offset=1, granularity=granularity,
                                       expert_scale=s)
        leaves = {**{f"expert_out[{e}]": y for e, y in enumerate(ys)}, "weights": w, "expert_scale": s,
                  "residual": r}
        return {"out": out, **_grads((out * grad).sum(), **leaves)}

    assert_bitwise_reproducible(run)


@pytest.mark.parametrize("granularity", ["token", "sample"])
def test_stochastic_residual(granularity):
    g = _generator(8)
    y, r = (torch.randn(4, 300, 33, generator=g).to(torch.bfloat16) for _ in range(2))
    grad = torch.randn(4, 300, 33, generator=g).to(torch.bfloat16)

    def run():
        ys, rs = _leaf(y), _leaf(strided(r))
        with running("cpu", "stochastic_residual"):
            out = ops.stochastic_residual(ys, rs, 0.8, seed=2**40 + 3, offset=17, granularity=granularity)
        return {"out": out, **_grads((out * grad).sum(), y=ys, r=rs)}

    assert_bitwise_reproducible(run)


# ---- momentum-queue contrast ----------------------------------------------------------------------


def _contrast_case(n, num_keys, dim, dtype, seed):
    g = _generator(seed)
    q = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    key = F.normalize(q + 0.5 * torch.randn(n, dim, generator=g), dim=1)
    queue = F.normalize(torch.randn(num_keys, dim, generator=g), dim=1)
    return q.to(dtype), key.to(dtype), queue.to(dtype)


# (N, K, D): 19 grains of 16 rows, 32 chunks of 256 keys; a batch of 64 against a 65536-key
# queue (chunks of 2048 keys); 1000 rows of fp16 against 4096 keys (chunks of 1024 = 2^20 / N).
CONTRAST_SHAPES = [(300, 8192, 64, torch.float32), (64, 65536, 128, torch.float32), (1000, 4096, 96, torch.float16)]
CONTRAST_IDS = ["300x8192x64-fp32", "64x65536x128-fp32", "1000x4096x96-fp16"]


@pytest.mark.parametrize("n, num_keys, dim, dtype", CONTRAST_SHAPES, ids=CONTRAST_IDS)
def test_moco_logits_forward(n, num_keys, dim, dtype):
    q, key, queue = _contrast_case(n, num_keys, dim, dtype, 9)
    with running("cpu", "moco_logits"):
        assert_bitwise_reproducible(lambda: {"logits": ops.moco_logits(q, key, queue, 0.07)})


@pytest.mark.parametrize("n, num_keys, dim, dtype", CONTRAST_SHAPES, ids=CONTRAST_IDS)
def test_moco_logits_backward(n, num_keys, dim, dtype):
    q, key, queue = _contrast_case(n, num_keys, dim, dtype, 10)
    weight = torch.randn(n, 1 + num_keys, generator=_generator(11))

    def run():
        qs, ks = _leaf(q), _leaf(key)
        with running("cpu", "moco_logits"):
            logits = ops.moco_logits(qs, ks, queue, 0.07)
        return _grads((logits * weight).sum(), q=qs, k=ks)

    assert_bitwise_reproducible(run)


@pytest.mark.parametrize("n, num_keys, dim, dtype", CONTRAST_SHAPES, ids=CONTRAST_IDS)
def test_moco_infonce_forward(n, num_keys, dim, dtype):
    q, key, queue = _contrast_case(n, num_keys, dim, dtype, 12)
    with running("cpu", "moco_infonce"):
        assert_bitwise_reproducible(lambda: {"loss": ops.moco_infonce(q, key, queue, 0.07, reduction="none")})


@pytest.mark.parametrize("n, num_keys, dim, dtype", CONTRAST_SHAPES, ids=CONTRAST_IDS)
def test_moco_infonce_backward(n, num_keys, dim, dtype):
    q, key, queue = _contrast_case(n, num_keys, dim, dtype, 13)
    weight = torch.rand(n, generator=_generator(14))

    def run():
        qs, ks = _leaf(q), _leaf(key)
        with running("cpu", "moco_infonce"):
            loss = ops.moco_infonce(qs, ks, queue, 0.07, reduction="none")
        return _grads((loss * weight).sum(), q=qs, k=ks)

    assert_bitwise_reproducible(run)


def test_queue_enqueue():
    g = _generator(14)
    queue = torch.randn(4096, 64, generator=g)
    keys = torch.randn(1500, 64, generator=g).to(torch.bfloat16)

    def run():
        ring, ptr = queue.clone(), torch.tensor([3000])
        with running("cpu", "queue_enqueue_"):
            ops.queue_enqueue_(ring, ptr, keys)  # wraps around: rows 3000..4095, then 0..403
            ops.queue_enqueue_(ring, ptr, keys[:700])
        return {"queue": ring, "ptr": ptr}

    assert_bitwise_reproducible(run)


# ---- grouped experts ------------------------------------------------------------------------------


def _experts_case(hidden, dtype):
    """1024 tokens, k = 2 of E = 8 experts (skewed), I = 96."""
    n, intermediate, e, k = 1024, 96, 8, 2
    g = _generator(15)
    x = torch.randn(n, hidden, generator=g).to(dtype)
    gate_up = (torch.randn(e, 2 * intermediate, hidden, generator=g) / hidden**0.5).to(dtype)
    down = (torch.randn(e, hidden, intermediate, generator=g) / intermediate**0.5).to(dtype)
    tensors = {"x": x, "gate_up": gate_up, "down": down, "weights": torch.rand(n, k, generator=g),
               "expert_scale": torch.rand(e, generator=g) + 0.5}
    return tensors, ops.moe_dispatch(_skewed_indices(n, e, k, g), e), torch.randn(n, hidden, generator=g).to(dtype)


def _experts(tensors, dispatch):
    with running("torch", "moe_experts"):
        return ops.moe_experts(tensors["x"], dispatch, tensors["gate_up"], tensors["down"], tensors["weights"],
                               expert_scale=tensors["expert_scale"])


# F.grouped_mm on 16-byte-aligned shapes, one matmul per expert otherwise (H = 33).
EXPERT_SHAPES = [(64, torch.float32), (64, torch.bfloat16), (33, torch.float32)]
EXPERT_IDS = ["grouped-mm-fp32", "grouped-mm-bf16", "per-expert-fp32"]


@pytest.mark.parametrize("hidden, dtype", EXPERT_SHAPES, ids=EXPERT_IDS)
def test_moe_experts_forward(hidden, dtype):
    tensors, dispatch, _ = _experts_case(hidden, dtype)
    assert_bitwise_reproducible(lambda: {"out": _experts(tensors, dispatch)})


# moe_experts' weight gradients reduce over each expert's tokens: on CPU tensors they run the
# C++ kernel (csrc/cpu/experts.cpp), tiles fixed by the sizes on one BLAS thread each; through
# F.grouped_mm's BLAS, 1 and 2 threads gave different last bits in fp32.


@pytest.mark.parametrize("hidden, dtype", EXPERT_SHAPES, ids=EXPERT_IDS)
def test_moe_experts_backward(hidden, dtype):
    tensors, dispatch, grad = _experts_case(hidden, dtype)

    def run():
        leaves = {name: _leaf(t) for name, t in tensors.items()}
        return _grads((_experts(leaves, dispatch) * grad).sum(), **leaves)

    assert_bitwise_reproducible(run)
