"""Edge cases across the ops: results independent of the number of CPU threads, non-finite
logits and expert rows, degenerate loss inputs and misuse of the MoCo queue."""

from __future__ import annotations


import pytest
import torch

from astrea.ops import moe_dispatch, permute, router_topk, weighted_combine
from tests.utils import running, torch_threads


def _assert_same_across_threads(run) -> None:
    """``run()`` (a list of tensors) gives bitwise equal results on 1 and on 2 threads."""
    with torch_threads(1):
        single = run()
    with torch_threads(2):
        double = run()
    for i, (a, b) in enumerate(zip(single, double)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"output {i}"
        assert torch.equal(a, b), f"output {i} differs across thread counts: max |diff| " \
                                  f"{(a.double() - b.double()).abs().max().item():.3g}"


# ---- thread counts --------------------------------------------------------------------------


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_router_cpu_kernel_does_not_depend_on_the_thread_count(scoring, with_bias):
    n, e, k = 20000, 37, 4
    logits = torch.randn(n, e) * 2
    bias = torch.randn(e) * 0.1 if with_bias else None
    grads = torch.randn(n, k), torch.randn(e), torch.randn(n)

    def run():
        x = logits.clone().requires_grad_()
        with running("cpu", "router_topk"):
            out = router_topk(x, k, scoring=scoring, bias=bias)
        loss = (out.weights * grads[0]).sum() + (out.prob_sums * grads[1]).sum() + (out.lse * grads[2]).sum()
        loss.backward()
        return [t.detach() for t in out] + [x.grad]

    _assert_same_across_threads(run)


@pytest.mark.parametrize("with_scale", [False, True], ids=["no-scale", "scale"])
def test_dispatch_and_combine_cpu_kernels_do_not_depend_on_the_thread_count(with_scale):
    n, e, k, d = 5003, 37, 4, 24
    indices = torch.stack([torch.randperm(e)[:k] for _ in range(n)]).int()
    x = torch.randn(n, d)
    weights = torch.rand(n, k)
    scale = torch.rand(e) + 0.5 if with_scale else None
    grad_out = torch.randn(n, d)

    def run():
        xs = x.clone().requires_grad_()
        w = weights.clone().requires_grad_()
        s = scale.clone().requires_grad_() if scale is not None else None
        with running("cpu", "moe_dispatch", "permute", "weighted_combine"):
            dispatch = moe_dispatch(indices, e)
            rows = permute(xs, dispatch)
            out = weighted_combine(rows * 1.5, w, dispatch, s)
        (out * grad_out).sum().backward()
        results = [*dispatch[:3], rows.detach(), out.detach(), xs.grad, w.grad]
        return results + ([s.grad] if s is not None else [])

    _assert_same_across_threads(run)


# ---- NaN and -inf keys ------------------------------------------------------------------------

_NAN, _INF = float("nan"), float("inf")


def _mixed_logits() -> torch.Tensor:
    """Rows mixing NaN, -inf and finite logits, NaNs before and after the -infs."""
    rows = [
        [_NAN, -_INF, 0.5, -_INF, _NAN, 1.0],
        [-_INF, _NAN, -_INF, _NAN, 2.0, -1.0],
        [_NAN, _NAN, -_INF, -_INF, -_INF, _NAN],
        [_NAN, -_INF, _NAN, -_INF, _NAN, -_INF],
        [0.1, -_INF, 0.3, -_INF, -0.2, 0.0],
        [_NAN] * 6,
        [-_INF] * 6,
        [1.0, _NAN, 2.0, 3.0, -_INF, 0.0],
    ]
    return torch.tensor(rows)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("k", [3, 6])
def test_nan_keys_rank_strictly_below_minus_inf(scoring, with_bias, k):
    logits = _mixed_logits()
    # A bias with -inf and NaN entries makes -inf and NaN keys in rows of finite logits too.
    bias = torch.tensor([0.0, -_INF, 0.1, _NAN, -_INF, 0.2]) if with_bias else None
    results = {}
    for impl in ("triton", "cpu", "reference"):
        with running(impl, "router_topk"):
            results[impl] = router_topk(logits, k, scoring=scoring, bias=bias)
    # The expected order: a stable sort on (is NaN, -key).
    x = logits
    scores = torch.softmax(x, 1) if scoring == "softmax" else torch.sigmoid(x)
    key = x if bias is None else scores + bias
    for row in range(key.shape[0]):
        values = key[row].tolist()
        order = sorted(range(len(values)), key=lambda e: (values[e] != values[e],
                                                          0.0 if values[e] != values[e] else -values[e]))
        for impl, out in results.items():
            assert out.indices[row].tolist() == order[:k], f"{impl} row {row}: {values}"
    expected = results["reference"]
    for impl in ("triton", "cpu"):
        assert torch.equal(results[impl].indices, expected.indices), impl
        assert torch.equal(results[impl].counts, expected.counts), impl


# ---- zero-weight slots with non-finite rows ------------------------------------------------------


@pytest.mark.parametrize("impl", ["triton", "cpu", "reference"])
@pytest.mark.parametrize("zero_in", ["weights", "expert_scale"])
def test_sparse_combine_skips_zero_coefficient_slots(impl, zero_in):
    """A slot whose w * s is 0 adds exactly nothing, even when its expert row is NaN or Inf
    (the rule of the dense combine)."""
    n, e, k, d = 9, 5, 3, 16
    indices = torch.stack([torch.randperm(e)[:k] for _ in range(n)]).int()
    weights = torch.rand(n, k) + 0.1
    scale = torch.rand(e) + 0.5
    if zero_in == "weights":
        weights[::2, 1] = 0.0
        weights[1, 0] = -0.0
    else:
        scale[int(indices[0, 0])] = 0.0
    with running(impl, "moe_dispatch", "weighted_combine"):
        dispatch = moe_dispatch(indices, e)
        zero = (weights * scale[indices.long()]) == 0
        assert zero.any()
        rows = zero.flatten().nonzero().squeeze(1)
        positions = dispatch.inverse_positions.flatten().long()[rows]
        finite = torch.randn(n * k, d)
        poisoned = finite.clone()
        poisoned[positions] = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(d)[:d]
        out = weighted_combine(poisoned, weights, dispatch, scale)
        expected = weighted_combine(finite, weights, dispatch, scale)
    assert torch.isfinite(out).all(), f"{impl}: a zero-coefficient NaN/Inf row reached the output"
    assert torch.equal(out, expected)


# ---- degenerate loss inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens", [0, -3, torch.tensor(0), torch.tensor(-3), torch.tensor([0])],
                         ids=["int0", "int-3", "tensor0", "tensor-3", "tensor[0]"])
def test_load_balancing_loss_rejects_non_positive_num_tokens(num_tokens):
    from astrea.ops import load_balancing_loss

    out = router_topk(torch.randn(8, 4), 2)
    with pytest.raises(ValueError, match="load_balancing_loss: num_tokens"):
        load_balancing_loss(out, num_tokens=num_tokens)


def test_losses_of_no_tokens_raise():
    from astrea.ops import load_balancing_loss, router_z_loss

    out = router_topk(torch.randn(0, 4), 2)
    with pytest.raises(ValueError, match="load_balancing_loss: .*num_tokens"):
        load_balancing_loss(out)
    with pytest.raises(ValueError, match="router_z_loss: .*N = 0"):
        router_z_loss(out)
    # A rank without tokens of a global batch: the global count makes the loss defined (0 here).
    assert load_balancing_loss(out, num_tokens=16).item() == 0.0
    assert load_balancing_loss(out, num_tokens=torch.tensor(16)).item() == 0.0


# ---- the MoCo queue ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_queue_enqueue_rejects_arguments_overlapping_the_queue(impl):
    from astrea.ops import queue_enqueue_

    queue = torch.randn(8, 4)
    with running(impl, "queue_enqueue_"):
        with pytest.raises(ValueError, match="queue_enqueue_: keys overlaps the memory of queue"):
            queue_enqueue_(queue, torch.zeros(1, dtype=torch.long), queue[2:5])
        with pytest.raises(ValueError, match="queue_enqueue_: keys overlaps the memory of queue"):
            queue_enqueue_(queue, torch.zeros(1, dtype=torch.long), queue[7:8].expand(2, 4))
        # ptr viewing the queue's memory (its bits reinterpreted as int64).
        flat = torch.zeros(8 * 4)
        with pytest.raises(ValueError, match="queue_enqueue_: ptr overlaps the memory of queue"):
            queue_enqueue_(flat.view(8, 4), flat.view(torch.int64)[:1], torch.randn(2, 4))
        # Disjoint views of one buffer are fine.
        buffer = torch.randn(10, 4)
        ring, keys = buffer[:8], buffer[8:]
        expected = torch.cat([keys, buffer[2:8]])
        ptr = torch.zeros(1, dtype=torch.long)
        queue_enqueue_(ring, ptr, keys)
        assert torch.equal(ring, expected) and int(ptr) == 2
