"""Momentum-queue contrast ops of astrea._C (CPU kernels here; CUDA kernels when a GPU
is present) against the plain MoCo reference, and the MomentumContrast module."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from astrea import _extension, ops, reference
from astrea.nn import MomentumContrast
from astrea.testing import peak_cpu_memory_bytes
from tests.utils import (UNIT_ROUNDOFF, accumulation_bound, assert_identical, assert_within, assert_within_torch_error,
                         float64_leaves, strided)

pytestmark = pytest.mark.skipif(not _extension.available(), reason="astrea._C is not built")

TEMPERATURE = 0.07
# (N, K, D): odd sizes, N below and above one row block, K not a multiple of a tile,
# a queue smaller than the batch, N = K = 1. For the CUDA tensor-core tiles (fp16/bf16;
# 128 rows x 128 keys forward, 32 x 64 backward, stages of 64 features): D below one 16-wide
# fragment (19), between fragments (33), D % 8 == 0 with a partial second stage (72: 16-byte
# loads), D % 8 != 0 over two stages (100: element loads), several row blocks with a last
# one of 1 row (257), a last key tile of 1 key after one or four full ones (129, 513).
SHAPES = [(5, 37, 19), (70, 300, 128), (3, 1000, 64), (130, 7, 33), (257, 129, 72), (40, 513, 100), (1, 1, 16)]
# Tolerances are derived, not chosen: the oracles are the references run in float64 on the
# inputs already rounded to the dtype, and
# - the logits (and the gradients of sum(w * logits)) are sums of products: within
#   :func:`tests.utils.accumulation_bound` of the oracle, for D + 2 roundings per logit (q / T
#   first, then D fp32 multiply-adds; tensor-core products of 16-bit inputs are exact);
# - the InfoNCE loss and its gradients (a log-sum-exp and a softmax) within 4x the error of
#   PyTorch's own computation, the references on the same inputs (fp32 math, gradients rounded
#   to the dtype), by :func:`tests.utils.assert_within_torch_error`.
# A tile computed from the wrong rows, keys or features is off by O(1), far outside both.


def make_inputs(n, k, d, dtype, device="cpu", *, requires_grad=False):
    """L2-normalised rows, as MoCo feeds them; q and k of a row are correlated."""
    q = F.normalize(torch.randn(n, d, device=device), dim=1)
    key = F.normalize(q + 0.5 * torch.randn(n, d, device=device), dim=1)
    queue = F.normalize(torch.randn(k, d, device=device), dim=1)
    q, key, queue = q.to(dtype), key.to(dtype), queue.to(dtype)
    return q.requires_grad_(requires_grad), key.requires_grad_(requires_grad), queue


def reference_grads(fn, q, key, queue, weight, temperature=TEMPERATURE):
    """fn(q, k) and the gradients of sum(weight * fn(q, k)) through the reference, in float64
    (with |inputs| and |weight|: the sums of |terms| of the logits and their gradients)."""
    q64, k64 = float64_leaves(q, key)
    out = fn(q64, k64, queue.double(), temperature)
    (out * weight.double()).sum().backward()
    return out, q64.grad, k64.grad


def torch_grads(fn, q, key, queue, weight, temperature=TEMPERATURE):
    """PyTorch's own computation of the same: the reference on the inputs in their dtype."""
    q_own, k_own = (t.detach().clone().requires_grad_() for t in (q, key))
    out = fn(q_own, k_own, queue, temperature)
    (out * weight.to(out.dtype)).sum().backward()
    return out, q_own.grad, k_own.grad


def infonce_none(q, key, queue, temperature):
    return reference.moco_infonce(q, key, queue, temperature, reduction="none")


def assert_logits_within_bound(logits, expected, terms, dim):
    """q / T rounded to fp32, then D fp32 multiply-adds: D + 2 roundings per logit."""
    assert logits.dtype == torch.float32
    assert_within(logits, expected, accumulation_bound(terms, dim + 2, expected, torch.float32), what="logits")


def infonce_grad_bounds(q, key, queue, weight, temperature, grad_q, grad_k):
    """A-priori bounds of the gradients of sum(w * loss) around their float64 values ``grad_q``
    and ``grad_k``, for a kernel that rounds the softmax probabilities to the inputs' dtype
    before its products (the CUDA tensor-core path; the CPU kernel keeps them in fp32).
    grad q_i = w_i / T (sum_j p_ij c_j - k_i) over c = [k_i, queue], grad k_i = w_i / T (p_i0 - 1) q_i.
    A p_ij is off by u (its rounding) plus the fp32 errors of its logit and of the row's
    log-sum-exp: (D + 2) u32 of the logit's |terms| each, (K + 3) u32 for the sum of exps, and
    u32 of |lse| and of |l - lse|. The products and sums then add their accumulation bound."""
    q64, k64, queue64 = q.detach().double(), key.detach().double(), queue.double()
    logits = torch.cat([(q64 * k64).sum(1, keepdim=True), q64 @ queue64.T], 1) / temperature
    logit_terms = torch.cat([(q64.abs() * k64.abs()).sum(1, keepdim=True), q64.abs() @ queue64.abs().T], 1)
    lse = logits.logsumexp(1, keepdim=True)
    probs = (logits - lse).exp()
    (dim, num_keys), u32 = (q.shape[1], queue.shape[0]), UNIT_ROUNDOFF[torch.float32]
    logit_error = 2 * (dim + 2) * logit_terms.amax(1, keepdim=True) / temperature
    prob_error = UNIT_ROUNDOFF[q.dtype] + u32 * (logit_error + num_keys + 3 + lse.abs()
                                                 + (logits - lse).abs().amax(1, keepdim=True))
    scale = weight.double().abs()[:, None] / temperature
    mixed = probs[:, :1] * k64.abs() + probs[:, 1:] @ queue64.abs()  # sum_j p_ij |c_j|
    q_bound = prob_error * scale * mixed + accumulation_bound(scale * (mixed + k64.abs()), num_keys + 3, grad_q,
                                                              q.dtype)
    k_bound = prob_error * scale * probs[:, :1] * q64.abs() + accumulation_bound(
        scale * (probs[:, :1] + 1) * q64.abs(), 3, grad_k, q.dtype)
    return q_bound, k_bound


def assert_infonce_within_torch_error(loss, q, key, queue, weight, temperature=TEMPERATURE):
    """The kernel's loss and its gradients (``q.grad``, ``key.grad``, after ``loss.backward(weight)``)
    within 4x PyTorch's own error against the float64 oracle, and the gradients within
    :func:`infonce_grad_bounds` (on CUDA with fp16/bf16, whose rounded probabilities put the
    gradients' error above PyTorch's fp32 one, only there). A row's loss is lse - l_0, two
    values up to max |logit| = 1/T (unit rows): where it cancels to nearly 0 (a dominant
    positive) its rounding floor is that of 1/T, not of the small result."""
    expected = reference_grads(infonce_none, q, key, queue, weight, temperature)
    own = torch_grads(infonce_none, q, key, queue, weight, temperature)
    rounds_probabilities = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    scales = (1 / temperature, None, None)
    for name, got, want, torch_value, scale in zip(("loss", "grad q", "grad k"), (loss, q.grad, key.grad), expected,
                                                   own, scales):
        assert got.dtype == torch_value.dtype, f"{name}: {got.dtype} != {torch_value.dtype}"
        if name == "loss" or not rounds_probabilities:
            assert_within_torch_error(got, want, torch_value, what=name, scale=scale)
    bounds = infonce_grad_bounds(q, key, queue, weight, temperature, *expected[1:])
    for name, got, want, bound in zip(("grad q", "grad k"), (q.grad, key.grad), expected[1:], bounds):
        assert_within(got, want, bound, what=f"{name} (a-priori bound)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_logits_forward_backward(kernels, device, shape, dtype):
    q, key, queue = make_inputs(*shape, dtype, device, requires_grad=True)
    logits = ops.moco_logits(q, key, queue, TEMPERATURE)
    assert logits.dtype == torch.float32 and logits.shape == (shape[0], 1 + shape[1])
    weight = torch.randn_like(logits)
    expected, grad_q, grad_k = reference_grads(reference.moco_logits, q, key, queue, weight)
    terms, q_terms, k_terms = reference_grads(reference.moco_logits, q.detach().abs(), key.detach().abs(),
                                              queue.abs(), weight.abs())
    assert_logits_within_bound(logits, expected, terms, shape[2])
    logits.backward(weight)
    assert q.grad.dtype == dtype and key.grad.dtype == dtype
    # grad q = (w_0 k + w_{1:} @ queue) / T: K + 1 products summed in fp32 (and w / T rounded
    # first), rounded to the dtype; grad k = w_0 q / T. Bounds from the accumulation length:
    # the sum cancels to values far below its terms, where a relative tolerance cannot hold.
    assert_within(q.grad, grad_q, accumulation_bound(q_terms, shape[1] + 3, grad_q, dtype), what="grad q")
    assert_within(key.grad, grad_k, accumulation_bound(k_terms, 3, grad_k, dtype), what="grad k")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_infonce_forward_backward(kernels, device, shape, dtype):
    q, key, queue = make_inputs(*shape, dtype, device, requires_grad=True)
    loss = ops.moco_infonce(q, key, queue, TEMPERATURE, reduction="none")
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    weight = torch.rand_like(loss)
    loss.backward(weight)
    assert_infonce_within_torch_error(loss, q, key, queue, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matching_key_in_every_tile_position(kernels, device, dtype):
    """Row i's queue holds a copy of q_i at key 7i + 3 (mod K), so that one key carries most
    of the row's softmax mass; the copies fall in every key tile, fragment and column,
    including the last, partial tile. A probability or queue row taken from the wrong place
    in backward then moves the gradient by O(1) instead of O(1/K)."""
    n, num_keys, dim = 150, 301, 40
    q, key, queue = make_inputs(n, num_keys, dim, dtype, device)
    queue[(7 * torch.arange(n, device=device) + 3) % num_keys] = q
    q.requires_grad_()
    key.requires_grad_()
    temperature = 0.1
    loss = ops.moco_infonce(q, key, queue, temperature, reduction="none")
    weight = torch.rand_like(loss)
    loss.backward(weight)
    assert_infonce_within_torch_error(loss, q, key, queue, weight, temperature)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inputs_not_16_byte_aligned(kernels, device, dtype):
    """D % 8 == 0 but every operand starts one element into its storage: the CUDA tiles must
    fall back from 16-byte loads to element loads."""
    n, num_keys, dim = 9, 70, 24

    def shifted(x):
        storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        view = storage[1:].view(x.shape)
        view.copy_(x)
        return view

    q, key, queue = (shifted(x) for x in make_inputs(n, num_keys, dim, dtype, device))
    assert q.is_contiguous() and q.data_ptr() % 16 != 0
    ones = torch.ones(n, 1 + num_keys)
    expected, _, _ = reference_grads(reference.moco_logits, q, key, queue, ones)
    terms, _, _ = reference_grads(reference.moco_logits, q.abs(), key.abs(), queue.abs(), ones)
    assert_logits_within_bound(ops.moco_logits(q, key, queue, TEMPERATURE), expected, terms, dim)
    q.requires_grad_()
    key.requires_grad_()
    loss = ops.moco_infonce(q, key, queue, TEMPERATURE, reduction="none")
    weight = torch.ones_like(loss)
    loss.backward(weight)
    assert_infonce_within_torch_error(loss, q, key, queue, weight)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_infonce_reductions_match_cross_entropy(kernels, device, reduction):
    """Against MoCo's loss written with F.cross_entropy: in float64 (the oracle) and in fp32
    (PyTorch's own error, which the kernel's may exceed at most 4x)."""

    def cross_entropy(q, key):
        logits = torch.cat([(q * key).sum(1, keepdim=True), q @ queue.to(q.dtype).T], dim=1) / TEMPERATURE
        return F.cross_entropy(logits, torch.zeros(9, dtype=torch.long, device=device), reduction=reduction)

    q, key, queue = make_inputs(9, 200, 32, torch.float32, device, requires_grad=True)
    loss = ops.moco_infonce(q, key, queue, TEMPERATURE, reduction=reduction)
    leaves64 = float64_leaves(q, key)
    expected, own = cross_entropy(*leaves64), cross_entropy(q, key)
    assert_within_torch_error(loss, expected, own, what=reduction)
    grads = torch.autograd.grad(loss.sum(), (q, key))
    expected_grads = torch.autograd.grad(expected.sum(), leaves64)
    own_grads = torch.autograd.grad(own.sum(), (q, key))
    for got, want, torch_value, name in zip(grads, expected_grads, own_grads, ("q", "k")):
        assert_within_torch_error(got, want, torch_value, what=f"{reduction} grad {name}")


def test_strided_inputs(kernels, device):
    q, key, queue = make_inputs(11, 150, 24, torch.float32, device)
    logits = ops.moco_logits(strided(q), strided(key), strided(queue), TEMPERATURE)
    ones = torch.ones_like(logits)
    expected, _, _ = reference_grads(reference.moco_logits, q, key, queue, ones)
    terms, _, _ = reference_grads(reference.moco_logits, q.abs(), key.abs(), queue.abs(), ones)
    assert_logits_within_bound(logits, expected, terms, 24)
    qs, ks = strided(q).requires_grad_(), strided(key).t().contiguous().t().requires_grad_()
    loss = ops.moco_infonce(qs, ks, queue, TEMPERATURE, reduction="none")
    weight = torch.rand_like(loss)
    loss.backward(weight)
    assert_infonce_within_torch_error(loss, qs, ks, queue, weight)


def test_queue_gets_no_gradient(kernels):
    q, key, queue = make_inputs(4, 20, 8, torch.float32, requires_grad=True)
    queue.requires_grad_()
    ops.moco_infonce(q, key, queue, TEMPERATURE).backward()
    ops.moco_logits(q, key, queue, TEMPERATURE).sum().backward()
    assert queue.grad is None and q.grad is not None


def test_large_logits_are_stable(kernels):
    """An online log-sum-exp must not overflow where exp(logit) does."""
    q, key, queue = make_inputs(6, 300, 16, torch.float32)
    loss = ops.moco_infonce(q, key, queue, 1e-3, reduction="none")
    assert torch.isfinite(loss).all()
    # Logits up to 1/T = 1000: fp32 rounds them to ~6e-5, and the loss with them.
    expected = reference.moco_infonce(q.double(), key.double(), queue.double(), 1e-3, reduction="none")
    assert_within_torch_error(loss, expected, reference.moco_infonce(q, key, queue, 1e-3, reduction="none"),
                              what="loss at T = 1e-3")


@pytest.mark.parametrize("op", ["moco_logits", "moco_infonce"])
def test_gradcheck_cpu_kernel_float64(kernels, op):
    q, key, queue = make_inputs(5, 70, 7, torch.float64, requires_grad=True)
    fn = {"moco_logits": lambda a, b: ops.moco_logits(a, b, queue, 0.5),
          "moco_infonce": lambda a, b: ops.moco_infonce(a, b, queue, 0.5, reduction="none")}[op]
    assert torch.autograd.gradcheck(fn, (q, key))


@pytest.mark.parametrize("op", ["moco_logits", "moco_infonce"])
def test_gradcheck_reference(op):
    q, key, queue = make_inputs(4, 30, 6, torch.float64, requires_grad=True)
    fn = getattr(reference, op)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, queue, 0.5), (q, key))


def test_opcheck_every_op(kernels, device):
    q, key, queue = make_inputs(7, 90, 16, torch.float32, device, requires_grad=True)
    torch.library.opcheck(torch.ops.astrea.moco_logits.default, (q, key, queue, TEMPERATURE))
    torch.library.opcheck(torch.ops.astrea.moco_infonce.default, (q, key, queue, TEMPERATURE))
    _, lse = torch.ops.astrea.moco_infonce(q, key, queue, TEMPERATURE)
    grad = torch.rand(7, device=device)
    torch.library.opcheck(torch.ops.astrea.moco_infonce_backward.default,
                          (grad, q.detach(), key.detach(), queue, lse.detach(), TEMPERATURE))
    ring = torch.zeros(10, 16, device=device)
    ptr = torch.tensor([8], device=device)
    torch.library.opcheck(torch.ops.astrea.queue_enqueue_.default, (ring, ptr, key.detach()))


def test_torch_compile_fullgraph(kernels):
    q, key, queue = make_inputs(6, 50, 12, torch.float32, requires_grad=True)
    ring = queue.clone()
    ptr = torch.zeros(1, dtype=torch.long)

    def step(q, key, ring, ptr):
        loss = ops.moco_infonce(q, key, ring, TEMPERATURE) + ops.moco_logits(q, key, ring, TEMPERATURE).mean()
        return loss

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(q, key, ring, ptr)
    (grad_q,) = torch.autograd.grad(loss, q)
    # Inductor may sum the logits' mean in another order than eager: the compiled step's error
    # against float64 within 4x the eager step's (the kernels' own error is tested above).
    eager = step(q, key, ring, ptr)
    (eager_grad_q,) = torch.autograd.grad(eager, q)
    q64, k64 = float64_leaves(q, key)
    expected = step(q64, k64, ring.double(), ptr)
    (expected_grad_q,) = torch.autograd.grad(expected, q64)
    assert_within_torch_error(loss, expected, eager, what="compiled loss")
    assert_within_torch_error(grad_q, expected_grad_q, eager_grad_q, what="compiled grad q")

    enqueue = torch.compile(lambda r, p, k: ops.queue_enqueue_(r, p, k), fullgraph=True)
    enqueue(ring, ptr, key.detach())
    assert int(ptr) == 6
    assert_identical(ring[:6], key.detach())


# --- queue_enqueue_ -------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3, 7, 10])
def test_enqueue_wraps_around_for_any_batch(kernels, device, batch):
    capacity = 10
    queue = torch.zeros(capacity, 4, device=device)
    ptr = torch.zeros(1, dtype=torch.long, device=device)
    expected = queue.clone()
    expected_ptr = torch.zeros(1, dtype=torch.long, device=device)
    for step in range(5):
        keys = torch.randn(batch, 4, device=device)
        ops.queue_enqueue_(queue, ptr, keys)
        reference.queue_enqueue_(expected, expected_ptr, keys)
        assert int(ptr) == (step + 1) * batch % capacity
    assert_identical(queue, expected)
    assert int(ptr) == int(expected_ptr)


def test_enqueue_casts_keys(kernels, device):
    queue = torch.zeros(5, 3, dtype=torch.bfloat16, device=device)
    ptr = torch.tensor([4], device=device)
    keys = torch.randn(2, 3, dtype=torch.float32, device=device)
    ops.queue_enqueue_(queue, ptr, keys)
    assert_identical(queue[4], keys[0].to(torch.bfloat16))
    assert_identical(queue[0], keys[1].to(torch.bfloat16))
    assert int(ptr) == 1


def test_enqueue_rejects_more_keys_than_rows(kernels):
    queue = torch.zeros(4, 3)
    ptr = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="queue_enqueue_: keys has 5 rows, more than the queue's 4"):
        ops.queue_enqueue_(queue, ptr, torch.randn(5, 3))
    with pytest.raises(ValueError, match="do not fit"):
        torch.ops.astrea.queue_enqueue_(queue, ptr, torch.randn(5, 3))


# --- bad inputs -----------------------------------------------------------------------

@pytest.mark.parametrize("op", [ops.moco_logits, ops.moco_infonce])
def test_bad_inputs_raise_clear_errors(kernels, op):
    q, key, queue = make_inputs(4, 10, 8, torch.float32)
    name = op.__name__
    with pytest.raises(ValueError, match=rf"{name}: queue.shape\[1\] must equal q.shape\[1\] = 8"):
        op(q, key, torch.randn(10, 9), TEMPERATURE)
    with pytest.raises(ValueError, match=f"{name}: k must have q's shape"):
        op(q, key[:3], queue, TEMPERATURE)
    with pytest.raises(TypeError, match=f"{name}: q must have dtype"):
        op(q.to(torch.int32), key, queue, TEMPERATURE)
    with pytest.raises(TypeError, match=f"{name}: queue must have dtype"):
        op(q, key, queue.to(torch.int64), TEMPERATURE)
    with pytest.raises(TypeError, match=f"{name}: q, k and queue must share one dtype"):
        op(q, key, queue.to(torch.bfloat16), TEMPERATURE)
    with pytest.raises(ValueError, match=f"{name}: queue must have K > 0 rows"):
        op(q, key, queue[:0], TEMPERATURE)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"{name}: temperature must be a finite number > 0"):
            op(q, key, queue, bad)
    with pytest.raises(TypeError, match=f"{name}: temperature must be a float"):
        op(q, key, queue, torch.tensor(0.1))
    with pytest.raises(ValueError, match=f"{name}: q must be 2-D"):
        op(q[0], key[0], queue, TEMPERATURE)
    with pytest.raises(ValueError, match=f"{name}: queue must be 2-D"):
        op(q, key, queue[None], TEMPERATURE)
    with pytest.raises(ValueError, match=f"{name}: q must be \\[N, D\\] with N > 0"):
        op(q[:0], key[:0], queue, TEMPERATURE)


def test_bad_reduction_and_direct_op_checks(kernels):
    q, key, queue = make_inputs(4, 10, 8, torch.float32)
    with pytest.raises(ValueError, match="moco_infonce: reduction must be one of 'mean', 'sum', 'none'; got 'max'"):
        ops.moco_infonce(q, key, queue, TEMPERATURE, reduction="max")
    # The C++ checks guard direct torch.ops calls too.
    with pytest.raises(ValueError, match="moco_logits: temperature must be > 0"):
        torch.ops.astrea.moco_logits(q, key, queue, 0.0)
    with pytest.raises(TypeError, match="moco_infonce: q, k and queue must share one floating dtype"):
        torch.ops.astrea.moco_infonce(q, key, queue.double(), TEMPERATURE)
    with pytest.raises(ValueError, match="moco_infonce_backward: lse must be \\[4\\]"):
        torch.ops.astrea.moco_infonce_backward(torch.ones(4), q, key, queue, torch.ones(3), TEMPERATURE)


# --- memory ---------------------------------------------------------------------------


def test_fused_loss_never_allocates_n_by_k():
    n, k, d = 2048, 65536, 128
    q, key, queue = make_inputs(n, k, d, torch.float32, requires_grad=True)
    logits_bytes = n * k * 4

    def step():
        ops.moco_infonce(q, key, queue, TEMPERATURE).backward()

    peak = peak_cpu_memory_bytes(step)
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert peak < 0.05 * logits_bytes, f"peak {peak / 2**20:.1f} MiB >= 5% of the {logits_bytes / 2**20:.0f} MiB logits"
    # The measurement sees allocations of this size: the eager loss's are far above the bound.
    eager_peak = peak_cpu_memory_bytes(lambda: reference.moco_infonce(q[:256], key[:256], queue, TEMPERATURE))
    assert eager_peak >= 256 * k * 4


# --- the module -----------------------------------------------------------------------

def test_module_loss_uses_the_queue_before_enqueue_and_enqueues_keys():
    torch.manual_seed(0)
    moco = MomentumContrast(dim=16, queue_size=40, temperature=0.1)
    queue_before = moco.queue.clone()
    q = torch.randn(6, 16, requires_grad=True)
    key = torch.randn(6, 16)
    loss = moco(q, key)
    loss.backward()
    # MoCo's loss on the queue as it was, in float64 (the oracle) and in fp32 (PyTorch's own).
    qr, (q64,) = q.detach().clone().requires_grad_(), float64_leaves(q)
    expected = reference.moco_infonce(F.normalize(q64, dim=1), F.normalize(key.double(), dim=1),
                                      queue_before.double(), 0.1)
    own = reference.moco_infonce(F.normalize(qr, dim=1), F.normalize(key, dim=1), queue_before, 0.1)
    expected.backward()
    own.backward()
    assert_within_torch_error(loss, expected, own, what="loss")
    assert_within_torch_error(q.grad, q64.grad, qr.grad, what="grad q (queue snapshot)")
    assert_identical(moco.queue[:6], F.normalize(key, dim=1), what="enqueued keys")
    assert int(moco.ptr) == 6
    state = moco.state_dict()
    assert set(state) == {"queue", "ptr"}
    # A row y / ||y|| in fp32 has each element within (D / 2 + 2) u of its exact value, so its
    # squares sum to within (2 D + 4) u of 1 in fp32 (D more roundings), and the root closer.
    norms = state["queue"].norm(dim=1)
    assert_within(norms, torch.ones(40), accumulation_bound(torch.ones(40), 2 * 16 + 4, torch.ones(40), torch.float32),
                  what="queue rows are unit vectors")


class _LargeAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that return a new tensor of at least ``numel`` elements (outputs in
    the storage of ``exempt``, i.e. in-place writes to it, do not count)."""

    def __init__(self, numel: int, exempt: torch.Tensor):
        super().__init__()
        self.numel, self.exempt, self.seen = numel, exempt.untyped_storage().data_ptr(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.numel() >= self.numel
                    and t.untyped_storage().data_ptr() != self.exempt):
                self.seen.append(str(func))
        return out


@pytest.mark.parametrize("impl", ["cpu", "reference"])
@pytest.mark.parametrize("learnable", [False, True], ids=["fixed-T", "learnable-T"])
def test_module_step_copies_no_queue_and_keeps_the_gradients(impl, learnable):
    """A training step (forward, enqueue, backward) allocates nothing queue-sized, and its
    gradients equal those of the loss on a snapshot of the queue taken before the enqueue."""
    from tests.utils import running

    moco = MomentumContrast(dim=32, queue_size=4096, temperature=0.1, learnable_temperature=learnable)
    queue_before, queue_ptr = moco.queue.clone(), moco.queue.data_ptr()
    q = torch.randn(8, 32, requires_grad=True)
    key = torch.randn(8, 32, requires_grad=True)
    with running(impl, "moco_infonce", "queue_enqueue_"):
        with _LargeAllocations(moco.queue.numel(), moco.queue) as mode:
            loss = moco(q, key)
            loss.backward()
        assert mode.seen == [], f"queue-sized allocations: {mode.seen}"
        assert moco.queue.data_ptr() == queue_ptr
        assert not torch.equal(moco.queue, queue_before)  # the enqueue did overwrite rows
        # The unoptimised computation: the loss on a copy of the queue as it was.
        qr, kr = q.detach().clone().requires_grad_(), key.detach().clone().requires_grad_()
        log_t = torch.tensor(0.1).log().requires_grad_()
        qn = F.normalize(qr, dim=1)
        expected = ops.moco_infonce(qn / log_t.exp() if learnable else qn, F.normalize(kr, dim=1), queue_before,
                                    1.0 if learnable else 0.1)
        expected.backward()
    assert torch.equal(loss.detach(), expected.detach())
    # B = 8: the mean's 1/B scales exactly, so the gradients are the op's, bit for bit.
    assert torch.equal(q.grad, qr.grad)
    assert torch.equal(key.grad, kr.grad)
    if learnable:
        assert torch.equal(moco.log_temperature.grad, log_t.grad)


def test_module_learnable_temperature_gets_a_gradient():
    moco = MomentumContrast(dim=8, queue_size=30, temperature=0.2, learnable_temperature=True)
    queue_before = moco.queue.clone()
    q, key = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8)
    moco(q, key).backward()

    def log_t_grad(dtype):
        """d loss / d log T of MoCo's loss computed in ``dtype``."""
        log_t = torch.tensor(0.2, dtype=dtype).log().requires_grad_()
        reference.moco_infonce(F.normalize(q.detach().to(dtype), dim=1) / log_t.exp(),
                               F.normalize(key.to(dtype), dim=1), queue_before.to(dtype), 1.0).backward()
        return log_t.grad

    assert_within_torch_error(moco.log_temperature.grad, log_t_grad(torch.float64), log_t_grad(torch.float32),
                              what="d loss / d log T")
    assert "log_temperature" in moco.state_dict()


def test_momentum_update_is_an_ema():
    online, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    pairs = [(o.detach().clone(), t.detach().clone()) for o, t in zip(online.parameters(), target.parameters())]
    MomentumContrast(dim=4, queue_size=8, momentum=0.9).momentum_update(online, target)
    for got, (o, t) in zip(target.parameters(), pairs):
        assert_within_torch_error(got, 0.9 * t.double() + 0.1 * o.double(), 0.9 * t + 0.1 * o, what="EMA")
    with pytest.raises(ValueError, match="momentum_update: online has 2 parameters, target has 4"):
        MomentumContrast(dim=4, queue_size=8).momentum_update(online, torch.nn.Sequential(online, target))


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="MomentumContrast: momentum must be in"):
        MomentumContrast(dim=4, momentum=1.5)
    with pytest.raises(ValueError, match="MomentumContrast: temperature must be"):
        MomentumContrast(dim=4, temperature=0.0)
    with pytest.raises(ValueError, match=r"MomentumContrast: q and k must both be \[B, 4\]"):
        MomentumContrast(dim=4, queue_size=8)(torch.randn(2, 5), torch.randn(2, 5))
    with pytest.raises(ValueError, match="more than the queue's 8"):
        MomentumContrast(dim=4, queue_size=8)(torch.randn(9, 4), torch.randn(9, 4))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial queue on every rank
        moco = MomentumContrast(dim=8, queue_size=20)
        keys = torch.zeros(3, 8)
        keys[:, rank] = 1.0  # unit keys along axis `rank`: the queue shows whose keys went where
        moco(torch.randn(3, 8, requires_grad=True), keys).backward()
        results[rank] = (moco.queue[:6].clone(), int(moco.ptr))
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_step_enqueues_both_ranks_keys_in_rank_order():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_gloo_worker, args=(2, _free_port(), results), nprocs=2, start_method="spawn")
        results = dict(results)
    expected = torch.zeros(6, 8)
    expected[:3, 0] = 1.0
    expected[3:, 1] = 1.0
    for rank in (0, 1):
        queue, ptr = results[rank]
        assert ptr == 6
        # Unit axis vectors normalise to themselves exactly.
        assert_identical(queue, expected, what=f"rank {rank} queue")


def test_sanitizer_driver_runs_every_extension_op():
    """scripts/cuda_sanitizer_check.py (run under compute-sanitizer by scripts/gpu_check.sh),
    on the CPU kernels: its calls and checks stay valid."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "cuda_sanitizer_check.py"
    result = subprocess.run([sys.executable, str(script), "--device", "cpu"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.count(": ok") == 9, result.stdout
