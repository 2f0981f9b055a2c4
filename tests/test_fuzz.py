"""Property tests of every public op of astrea.ops: hypothesis draws the shapes (odd sizes,
empty dimensions where the op takes them), dtypes, strides, k, E, seeds and the op's options;
each example runs the default CPU path (the C++ CPU kernels of astrea._C; torch's kernels for
moe_experts), forward and backward, against the op's reference in astrea.reference run in
float64 on the same (already rounded) inputs. A few examples of tiny shapes also run the Triton
kernels of the router, the combines and the residual under the interpreter (TRITON_EXAMPLES).

Tolerances, derived as in tests/utils.py:
- Sums of products (permute's backward, the combines, the stochastic residual, MoCo logits):
  :func:`tests.utils.accumulation_bound`, with the sums of |terms| computed by the reference
  itself on |inputs| (these ops are multilinear in their inputs, so the reference evaluated at
  |inputs| sums exactly the |terms|) and a length of the number of terms plus the roundings
  inside each term.
- The rest (router, its losses, InfoNCE, the expert FFNs): flash-attention's rule,
  :func:`tests.utils.assert_within_torch_error`: the error against float64 is at most 4x that
  of PyTorch's own computation of the kernels' formula in the inputs' dtype (the reference run
  on those inputs; the router's closed-form backward; InfoNCE as lse minus the positive logit;
  for moe_experts the expert FFNs in that dtype, as eager PyTorch computes them).
- Index outputs (routing, dispatch, the queue) exactly.

Some draws are invalid on purpose (k out of range, an empty queue, p = 0, ...): the op must
then raise its own error, naming the op and the argument. The profile "astrea" of
tests/conftest.py makes the examples reproducible; each test's example count is in EXAMPLES
(and TRITON_EXAMPLES).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from astrea import _extension, ops, reference
from astrea.reference.experts import ACTIVATIONS, expert_ffn
from astrea.reference.residual import stochastic_residual_backward
from tests.utils import (UNIT_ROUNDOFF, accumulation_bound, assert_within, assert_within_torch_error, running, strided,
                         torch_threads)

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given, settings = hypothesis.given, hypothesis.settings

pytestmark = pytest.mark.skipif(not _extension.available(), reason="astrea._C is not built")


# Generated examples per op in the default run.
EXAMPLES = {
    "router_topk": 200,
    "load_balancing_loss": 200,
    "router_z_loss": 200,
    "moe_dispatch": 200,
    "permute": 200,
    "weighted_combine": 200,
    "dense_weighted_combine": 200,
    "combine_residual": 200,
    "stochastic_residual": 200,
    "moco_logits": 200,
    "moco_infonce": 200,
    "queue_enqueue_": 200,
    "moe_experts": 200,
}

# The Triton kernels under the interpreter (on CPU tensors, ~3-5 ms per program): a few
# examples of tiny shapes, for the ops whose Triton kernels run there.
TRITON_EXAMPLES = {"router_topk": 10, "weighted_combine": 10, "dense_weighted_combine": 10,
                   "stochastic_residual": 10}
# The largest N, E and D drawn, by implementation (the dense layout's E, B and T stay small).
MAX_SIZE = {"cpu": 70, "triton": 12}
# The interpreter rounds fp32 to bf16 toward zero where a GPU rounds to nearest (1 + 1.5 * 2^-8
# stores as 1.0): bf16 results of the Triton kernels are checked on a GPU, not here.
DTYPES = {"cpu": (torch.float32, torch.float16, torch.bfloat16), "triton": (torch.float32, torch.float16)}

FLOATS = st.sampled_from(DTYPES["cpu"])
LAYOUTS = st.sampled_from(["contiguous", "strided", "column-major"])
# One draw in ten is an invalid argument (hypothesis shrinks towards the valid one, listed first).
INVALID = st.sampled_from([False] * 9 + [True])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The fuzzing runs on one torch thread: its tiny shapes gain nothing from a second one, and
    on a busy 2-core machine each parallel region of a tiny op then waits for a descheduled
    thread (100x slower). That the results do not depend on the thread count is
    tests/test_determinism.py's part."""
    with torch_threads(1):
        yield


def _generator(data) -> torch.Generator:
    """The torch generator of the example's values, seeded by a hypothesis draw."""
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` (2-D) as it is, as every other column of a wider tensor, or column-major."""
    if layout == "strided" and x.numel():
        return strided(x)
    if layout == "column-major":
        return x.t().contiguous().t()
    return x


def _randn(gen: torch.Generator, *shape: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def _wide(t: torch.Tensor | None, magnitude: bool = False) -> torch.Tensor | None:
    """``t`` (or ``|t|``) in float64, detached: the reference's input."""
    if t is None:
        return None
    t = t.detach().double()
    return t.abs() if magnitude else t


def _grads(out: torch.Tensor, leaves, grad: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, leaves, grad.to(out.dtype)))


def _routing(gen: torch.Generator, n: int, e: int, k: int) -> torch.Tensor:
    """``[n, k]`` int32 indices of k distinct experts per token (random, as a router's)."""
    return torch.rand(n, e, generator=gen).argsort(dim=1)[:, :k].int()


# ---- router and its losses ----------------------------------------------------------------------


def _draw_router_case(data, impl: str = "cpu"):
    """(logits [N, E] in the drawn dtype and layout, k, the keyword options of router_topk): every
    scoring, the bias on the scores or the logits, grouped selection by either group score, a
    scaling factor; k at most what the kept groups hold."""
    limit = MAX_SIZE[impl]
    n = data.draw(st.integers(0, limit), label="N")
    e = data.draw(st.integers(1, limit), label="E")
    grouped = data.draw(st.booleans(), label="grouped")
    num_groups = data.draw(st.sampled_from([g for g in range(2, e + 1) if e % g == 0] or [1]),
                           label="num_groups") if grouped else 1
    group_size = e // num_groups
    topk_groups = data.draw(st.integers(1, num_groups), label="topk_groups") if num_groups > 1 else None
    k = data.draw(st.integers(1, group_size * (topk_groups or 1)), label="k")
    scoring = data.draw(st.sampled_from(["softmax", "sigmoid", "topk_softmax"]), label="scoring")
    options = {"scoring": scoring, "renormalize": data.draw(st.booleans(), label="renormalize"),
               "bias_on": data.draw(st.sampled_from(["scores", "logits"]), label="bias_on"),
               "num_groups": num_groups, "topk_groups": topk_groups,
               "group_score": data.draw(st.sampled_from(["top2_sum", "max"] if group_size >= 2 else ["max"]),
                                        label="group_score"),
               "scaling_factor": data.draw(st.sampled_from([1.0, 2.5]), label="scaling_factor")}
    dtype, layout = data.draw(st.sampled_from(DTYPES[impl]), label="dtype"), data.draw(LAYOUTS, label="layout")
    scale = data.draw(st.sampled_from([0.1, 3.0, 30.0]), label="logit scale")
    ties = data.draw(st.booleans(), label="ties")  # logits on a coarse grid: many exactly equal keys
    gen = _generator(data)
    logits = _randn(gen, n, e, scale=scale)
    if ties:
        logits = (logits * 2).round() / 2
    options["bias"] = (_randn(gen, e, scale=0.1) if data.draw(st.booleans(), label="bias") else None)
    return _layout(logits.to(dtype), layout), k, options


def _torch_router_grad(logits: torch.Tensor, own: ops.RouterOutput, options: dict, loss_of):
    """PyTorch's own d loss / d logits: the kernels' closed form (reference.router_topk_backward)
    computed in fp32, fed the gradients that ``loss_of`` sends into ``own``'s (the reference's
    fp32 outputs') weights, prob_sums and lse, taken at leaf copies of them: the reference
    computes its softmax scores from lse, so autograd through its graph would fold the weights'
    and prob_sums' paths into lse's. Autograd through the fp32 forward would be another formula
    too: where a softmax saturates it cancels differently, and it is not what the kernels compute."""
    leaves = [t.detach().requires_grad_() for t in (own.weights, own.prob_sums, own.lse)]
    upstream = torch.autograd.grad(loss_of(own._replace(weights=leaves[0], prob_sums=leaves[1], lse=leaves[2])),
                                   leaves, allow_unused=True, materialize_grads=True)
    return reference.router_topk_backward(logits, own.indices, own.lse.detach(), *(u.float() for u in upstream),
                                          scoring=options["scoring"], renormalize=options["renormalize"],
                                          scaling_factor=options["scaling_factor"])


def _route(logits: torch.Tensor, k: int, options: dict, impl: str = "cpu"):
    """(RouterOutput of ``impl``, the float64 reference's, PyTorch's own in fp32) with the logits
    leaf of each."""
    with running(impl, "router_topk"):
        x = _leaf(logits.clone())
        out = ops.router_topk(x, k, **options)
    x64 = _leaf(_wide(logits))
    bias = options["bias"]
    reference_options = {**options, "bias": _wide(bias), "topk_groups": options["topk_groups"] or 1}
    oracle = ops.RouterOutput(*reference.router_topk(x64, k, **reference_options))
    x32 = _leaf(logits.clone())
    own = ops.RouterOutput(*reference.router_topk(x32, k, **{**reference_options, "bias": bias}))
    # Keys that fp32 rounds to a tie float64 does not have (sigmoid scores saturating at 1.0, say)
    # make fp32's choice differ from the oracle's: such examples say nothing about the kernel.
    hypothesis.assume(torch.equal(own.indices, oracle.indices))
    return (out, x), (oracle, x64), (own, x32)


@settings(max_examples=EXAMPLES["router_topk"])
@given(st.data())
def test_router_topk(data):
    _check_router_topk(data, "cpu")


@settings(max_examples=TRITON_EXAMPLES["router_topk"])
@given(st.data())
def test_router_topk_triton(data):
    _check_router_topk(data, "triton")


def _check_router_topk(data, impl: str):
    logits, k, options = _draw_router_case(data, impl)
    n, e = logits.shape
    mistake = data.draw(st.sampled_from([None] * 9 + ["k", "num_groups"]), label="mistake")
    if mistake == "k":
        with pytest.raises(ValueError, match=r"^router_topk: k must be in \[1, "):
            ops.router_topk(logits, data.draw(st.sampled_from([0, e + 1])), **options)
        return
    if mistake == "num_groups" and e > 2:  # a count that does not divide E
        bad = {**options, "num_groups": next(g for g in range(2, e) if e % g), "topk_groups": 1}
        with pytest.raises(ValueError, match=r"^router_topk: num_groups must divide the number of experts"):
            ops.router_topk(logits, 1, **bad)
        return
    (out, x), (oracle, x64), (own, x32) = _route(logits, k, options, impl)
    assert torch.equal(out.indices, oracle.indices), "indices"
    assert torch.equal(out.counts, oracle.counts), "counts"
    for name in ("weights", "lse"):
        assert_within_torch_error(getattr(out, name), getattr(oracle, name), getattr(own, name), what=name)
    # prob_sums: N scores summed in fp32 (N roundings). A score exp(x - lse) or sigmoid(x) inherits
    # the rounding of its argument, a relative error of (|x| + |x - max|) u, and the E-long sum of
    # exponentials adds E u: the bound weighs each score by its own relative error. An exp below
    # fp32's smallest normal may flush to 0 (ATen's vectorised exp does): tiny per score.
    wide = _wide(logits)
    score_error = wide.abs() + (wide - wide.amax(dim=1, keepdim=True)).abs() + e + n + 8
    scores = wide.sigmoid() if options["scoring"] == "sigmoid" else torch.exp(wide - oracle.lse.detach()[:, None])
    assert_within(out.prob_sums, oracle.prob_sums,
                  accumulation_bound((scores * score_error).sum(0), 1, oracle.prob_sums, torch.float32)
                  + n * torch.finfo(torch.float32).tiny, what="prob_sums")

    gen = _generator(data)
    upstream = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((n, k), (e,), (n,))]

    def surrogate(result):
        return sum((t * u.to(t.dtype)).sum() for t, u in zip((result.weights, result.prob_sums, result.lse), upstream))

    assert_within_torch_error(torch.autograd.grad(surrogate(out), x)[0], torch.autograd.grad(surrogate(oracle), x64)[0],
                              _torch_router_grad(logits, own, options, surrogate), what="grad logits")


@settings(max_examples=EXAMPLES["router_topk"])
@given(st.data())
def test_router_topk_renormalising_underflowing_sigmoid_scores(data):
    _check_underflowing_router_topk(data, "cpu")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's sigmoid
@settings(max_examples=TRITON_EXAMPLES["router_topk"])
@given(st.data())
def test_router_topk_triton_renormalising_underflowing_sigmoid_scores(data):
    _check_underflowing_router_topk(data, "triton")


def _check_underflowing_router_topk(data, impl: str):
    """Renormalised sigmoid scores that underflow: the draws of test_router_topk (bias, groups,
    scaling, dtypes, layouts) as renormalised sigmoid routing, shifted down by 100 or 1000, so
    that most or all chosen scores round to 0 in fp32. Weights and gradients stay finite and
    within 4x PyTorch's own error against the float64 reference (which renormalises the same way
    where its own scores are that small), as everywhere else."""
    logits, k, options = _draw_router_case(data, impl)
    options = {**options, "scoring": "sigmoid", "renormalize": True}
    shift = data.draw(st.sampled_from([100.0, 1000.0]), label="shift")
    logits = _layout((logits.float() - shift).to(logits.dtype), data.draw(LAYOUTS, label="shifted layout"))
    (out, x), (oracle, x64), (own, x32) = _route(logits, k, options, impl)
    assert torch.equal(out.indices, oracle.indices), "indices"
    assert torch.equal(out.counts, oracle.counts), "counts"
    assert out.weights.isfinite().all(), "weights"
    for name in ("weights", "lse"):
        assert_within_torch_error(getattr(out, name), getattr(oracle, name), getattr(own, name), what=name)
    n, e = logits.shape
    gen = _generator(data)
    upstream = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((n, k), (e,), (n,))]

    def surrogate(result):
        return sum((t * u.to(t.dtype)).sum() for t, u in zip((result.weights, result.prob_sums, result.lse), upstream))

    grad = torch.autograd.grad(surrogate(out), x)[0]
    assert grad.isfinite().all(), "grad logits"
    assert_within_torch_error(grad, torch.autograd.grad(surrogate(oracle), x64)[0],
                              _torch_router_grad(logits, own, options, surrogate), what="grad logits")


def _balancing(result: ops.RouterOutput, num_tokens) -> torch.Tensor:
    """The Switch loss of the reference's outputs, by its definition (load_balancing_loss's docstring)."""
    tokens = result.lse.shape[0] if num_tokens is None else num_tokens
    k = result.weights.shape[1]
    fractions = result.counts.to(result.prob_sums.dtype) / (tokens * k)
    return result.counts.shape[0] * (fractions * result.prob_sums / tokens).sum()


@settings(max_examples=EXAMPLES["load_balancing_loss"])
@given(st.data())
def test_load_balancing_loss(data):
    logits, k, options = _draw_router_case(data)
    n = logits.shape[0]
    global_tokens = n + data.draw(st.integers(0 if n else 1, 50), label="tokens on other ranks")
    choice = data.draw(st.sampled_from(["default", "int", "tensor"]), label="num_tokens")
    invalid = data.draw(INVALID, label="invalid num_tokens") or (choice == "default" and n == 0)
    if invalid:
        bad = {"default": None if n == 0 else -1, "int": -global_tokens, "tensor": torch.tensor(0)}[choice]
        out = ops.router_topk(logits, k, **options)
        with pytest.raises(ValueError, match=r"^load_balancing_loss: .*num_tokens"):
            ops.load_balancing_loss(out, num_tokens=bad)
        return
    if choice == "default":
        num_tokens = None
    else:
        num_tokens = global_tokens if choice == "int" else torch.tensor(global_tokens)
    (out, x), (oracle, x64), (own, x32) = _route(logits, k, options)
    loss = ops.load_balancing_loss(out, num_tokens=num_tokens)
    tokens = None if num_tokens is None else global_tokens
    expected, torch_loss = _balancing(oracle, tokens), _balancing(own, tokens)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_within_torch_error(loss, expected, torch_loss, what="loss")
    assert_within_torch_error(torch.autograd.grad(loss, x)[0], torch.autograd.grad(expected, x64)[0],
                              _torch_router_grad(logits, own, options, lambda result: _balancing(result, tokens)),
                              what="grad logits")


@settings(max_examples=EXAMPLES["router_z_loss"])
@given(st.data())
def test_router_z_loss(data):
    logits, k, options = _draw_router_case(data)
    if logits.shape[0] == 0:
        out = ops.router_topk(logits, k, **options)
        with pytest.raises(ValueError, match=r"^router_z_loss: out has N = 0 tokens"):
            ops.router_z_loss(out)
        return
    (out, x), (oracle, x64), (own, x32) = _route(logits, k, options)
    loss = ops.router_z_loss(out)
    expected, torch_loss = oracle.lse.square().mean(), own.lse.square().mean()
    assert_within_torch_error(loss, expected, torch_loss, what="z loss")
    assert_within_torch_error(torch.autograd.grad(loss, x)[0], torch.autograd.grad(expected, x64)[0],
                              _torch_router_grad(logits, own, options, lambda result: result.lse.square().mean()),
                              what="grad logits")


# ---- dispatch and permute -----------------------------------------------------------------------


@settings(max_examples=EXAMPLES["moe_dispatch"])
@given(st.data())
def test_moe_dispatch(data):
    n, k = data.draw(st.integers(0, 80), label="N"), data.draw(st.integers(1, 6), label="k")
    e = data.draw(st.integers(1, 80), label="E")
    layout = data.draw(LAYOUTS, label="layout")
    gen = _generator(data)
    indices = torch.randint(0, e, (n, k), generator=gen, dtype=torch.int32)  # repeats allowed
    mistake = data.draw(st.sampled_from([None] * 9 + ["out of range", "num_experts", "dtype"]), label="mistake")
    if mistake == "out of range" and n:
        indices[n // 2, k - 1] = data.draw(st.sampled_from([-1, e]))
        with pytest.raises(ValueError, match=r"^moe_dispatch: indices must lie in \[0, num_experts"):
            ops.moe_dispatch(_layout(indices, layout), e)
        return
    if mistake == "num_experts":
        with pytest.raises(ValueError, match=r"^moe_dispatch: num_experts must be in \[1, 8192\]"):
            ops.moe_dispatch(indices, data.draw(st.sampled_from([0, 8193])))
        return
    if mistake == "dtype":
        with pytest.raises(TypeError, match=r"^moe_dispatch: indices must have dtype int32"):
            ops.moe_dispatch(indices.long(), e)
        return
    with running("cpu", "moe_dispatch"):
        dispatch = ops.moe_dispatch(_layout(indices, layout), e)
    expected = reference.moe_dispatch(indices, e)
    for name, got, want in zip(("sorted_token_ids", "expert_offsets", "inverse_positions"), dispatch, expected):
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert dispatch.num_experts == e and torch.equal(dispatch.indices, indices)


@settings(max_examples=EXAMPLES["permute"])
@given(st.data())
def test_permute(data):
    n, k = data.draw(st.integers(0, 60), label="N"), data.draw(st.integers(1, 4), label="k")
    e, d = data.draw(st.integers(k, 40), label="E"), data.draw(st.integers(0, 70), label="D")
    dtype, layout = data.draw(FLOATS, label="dtype"), data.draw(LAYOUTS, label="layout")
    gen = _generator(data)
    dispatch = ops.moe_dispatch(_routing(gen, n, e, k), e)
    x = _randn(gen, n, d, dtype=dtype)
    if data.draw(INVALID, label="invalid rows"):
        with pytest.raises(ValueError, match=r"^permute: x.shape\[0\] must equal the number of tokens"):
            ops.permute(_randn(gen, n + 1, d, dtype=dtype), dispatch)
        return
    with running("cpu", "permute"):
        xs = _leaf(_layout(x, layout))
        out = ops.permute(xs, dispatch)
    assert out.dtype == dtype and torch.equal(out, reference.permute(x, dispatch.sorted_token_ids))
    grad = _randn(gen, n * k, d, dtype=dtype)
    (grad_x,) = _grads(out, [xs], grad)
    if grad_x.numel() == 0:  # (reference.permute_backward cannot view 0 elements as [N, k, -1])
        assert grad_x.shape == (n, d)
        return
    positions = dispatch.inverse_positions
    expected = reference.permute_backward(_wide(grad), positions)
    terms = reference.permute_backward(_wide(grad, True), positions)
    assert_within(grad_x, expected, accumulation_bound(terms, k + 1, expected, dtype), what="grad x")


# ---- the combines ---------------------------------------------------------------------------------


def _draw_sparse_case(data, gen, impl: str = "cpu"):
    """(expert_out [N*k, D] in its drawn layout, weights [N, k] with zero slots, scale or None, dispatch)."""
    limit = MAX_SIZE[impl]
    n, k = data.draw(st.integers(0, limit), label="N"), data.draw(st.integers(1, 4), label="k")
    e, d = data.draw(st.integers(k, max(k, limit)), label="E"), data.draw(st.integers(0, limit), label="D")
    dtype, layout = data.draw(st.sampled_from(DTYPES[impl]), label="dtype"), data.draw(LAYOUTS, label="layout")
    dispatch = ops.moe_dispatch(_routing(gen, n, e, k), e)
    weights = torch.rand(n, k, generator=gen)
    if data.draw(st.booleans(), label="zero-weight slots"):
        weights[torch.rand(n, k, generator=gen) < 0.3] = 0.0
    scale = torch.rand(e, generator=gen) + 0.5 if data.draw(st.booleans(), label="expert_scale") else None
    return _layout(_randn(gen, n * k, d, dtype=dtype), layout), weights, scale, dispatch


def _sparse_reference(expert_out, weights, scale, dispatch, magnitude=False):
    return reference.weighted_combine(_wide(expert_out, magnitude), _wide(weights, magnitude), dispatch.indices,
                                      dispatch.inverse_positions, dispatch.num_experts, _wide(scale, magnitude))


def _sparse_reference_grads(grad, expert_out, weights, scale, dispatch, magnitude=False):
    return reference.weighted_combine_backward(
        _wide(grad, magnitude), _wide(expert_out, magnitude), _wide(weights, magnitude), dispatch.indices,
        dispatch.inverse_positions, dispatch.num_experts, _wide(scale, magnitude))


def _assert_sparse_grads(got, grad, expert_out, weights, scale, dispatch):
    """d expert_out (one product of w * s by grad), d weights (a D-long dot times s) and
    d expert_scale (N*k such dots times w) against their accumulation bounds."""
    expected = _sparse_reference_grads(grad, expert_out, weights, scale, dispatch)
    terms = _sparse_reference_grads(grad, expert_out, weights, scale, dispatch, magnitude=True)
    d, slots = expert_out.shape[1], weights.numel()
    for name, g, want, term, length, dtype in zip(
            ("expert_out", "weights", "expert_scale"), got, expected, terms, (3, d + 2, d + slots + 2),
            (expert_out.dtype, weights.dtype, torch.float32)):
        if want is not None:
            assert g.dtype == dtype, name
            assert_within(g, want, accumulation_bound(term, length, want, dtype), what=f"grad {name}")


def _check_empty_sparse_combine(out, leaves, weights, expert_out):
    """N = 0 or D = 0 (the reference cannot view 0 elements as [N, k, -1]): the output's shape, and
    the gradients of a sum over no tokens or no features, zero."""
    assert out.shape == (weights.shape[0], expert_out.shape[1]) and out.dtype == expert_out.dtype
    for leaf, g in zip(leaves, _grads(out, leaves, torch.zeros(out.shape))):
        assert g.shape == leaf.shape and not g.any()


@settings(max_examples=EXAMPLES["weighted_combine"])
@given(st.data())
def test_weighted_combine(data):
    _check_weighted_combine(data, "cpu")


@settings(max_examples=TRITON_EXAMPLES["weighted_combine"])
@given(st.data())
def test_weighted_combine_triton(data):
    _check_weighted_combine(data, "triton")


def _check_weighted_combine(data, impl: str):
    gen = _generator(data)
    expert_out, weights, scale, dispatch = _draw_sparse_case(data, gen, impl)
    if data.draw(INVALID, label="invalid weights"):
        with pytest.raises(ValueError, match=r"^weighted_combine: weights must have the shape of dispatch.indices"):
            ops.weighted_combine(expert_out, weights[:, :0], dispatch, scale)
        return
    leaves = [_leaf(expert_out), _leaf(weights)] + ([_leaf(scale)] if scale is not None else [])
    with running(impl, "weighted_combine"):
        out = ops.weighted_combine(leaves[0], leaves[1], dispatch, leaves[2] if scale is not None else None)
    if out.numel() == 0:
        _check_empty_sparse_combine(out, leaves, weights, expert_out)
        return
    expected = _sparse_reference(expert_out, weights, scale, dispatch)
    terms = _sparse_reference(expert_out, weights, scale, dispatch, magnitude=True)
    k = weights.shape[1]
    assert out.dtype == expert_out.dtype
    assert_within(out, expected, accumulation_bound(terms, k + 2, expected, out.dtype), what="out")
    grad = _randn(gen, *out.shape, dtype=out.dtype)
    got = _grads(out, leaves, grad)
    _assert_sparse_grads(got + [None] * (3 - len(got)), grad, expert_out, weights, scale, dispatch)


def _draw_dense_case(data, gen, impl: str = "cpu"):
    """(E expert outputs [B, (T,) D] as a list in the drawn layout, weights [B, E] with zeros, scale or None)."""
    e, b = data.draw(st.integers(1, 5), label="E"), data.draw(st.integers(0, 6), label="B")
    middle = data.draw(st.lists(st.integers(0, 5), max_size=1), label="T")
    d = data.draw(st.integers(0, min(40, MAX_SIZE[impl])), label="D")
    dtype, layout = data.draw(st.sampled_from(DTYPES[impl]), label="dtype"), data.draw(LAYOUTS, label="layout")
    shape = (b, *middle, d)
    experts = [_randn(gen, *shape, dtype=dtype) for _ in range(e)]
    if layout == "strided" and experts[0].numel():
        experts = [strided(y) for y in experts]
    elif layout == "column-major":  # D outermost in memory
        experts = [y.movedim(-1, 0).contiguous().movedim(0, -1) for y in experts]
    weights = torch.softmax(torch.randn(b, e, generator=gen), dim=1)
    if data.draw(st.booleans(), label="zero weights"):
        weights[torch.rand(b, e, generator=gen) < 0.3] = 0.0
    scale = torch.rand(e, generator=gen) + 0.5 if data.draw(st.booleans(), label="expert_scale") else None
    return experts, weights, scale


def _dense_reference_grads(grad, experts, weights, scale, magnitude=False):
    """(d experts, d weights, d scale or None) of the dense combine in float64, by the
    reference's backward and the chain rule of ``c = w * s``."""
    w, s = _wide(weights, magnitude), _wide(scale, magnitude)
    coef = w if s is None else w * s
    grad_experts, grad_coef = reference.dense_combine.dense_weighted_combine_backward(
        _wide(grad, magnitude), [_wide(y, magnitude) for y in experts], coef)
    if s is None:
        return grad_experts, grad_coef, None
    return grad_experts, grad_coef * s, (grad_coef * w).sum(0)


def _assert_dense_grads(got_experts, got_weights, got_scale, grad, experts, weights, scale):
    expected = _dense_reference_grads(grad, experts, weights, scale)
    terms = _dense_reference_grads(grad, experts, weights, scale, magnitude=True)
    per_sample = math.prod(grad.shape[1:])
    for e, (g, want, term) in enumerate(zip(got_experts, expected[0], terms[0])):
        assert g.dtype == experts[e].dtype
        assert_within(g, want, accumulation_bound(term, 3, want, g.dtype), what=f"grad expert_out[{e}]")
    assert_within(got_weights, expected[1], accumulation_bound(terms[1], per_sample + 3, expected[1], torch.float32),
                  what="grad weights")
    if scale is not None:
        length = per_sample + grad.shape[0] + 3
        assert_within(got_scale, expected[2], accumulation_bound(terms[2], length, expected[2], torch.float32),
                      what="grad expert_scale")


@settings(max_examples=EXAMPLES["dense_weighted_combine"])
@given(st.data())
def test_dense_weighted_combine(data):
    _check_dense_weighted_combine(data, "cpu")


@settings(max_examples=TRITON_EXAMPLES["dense_weighted_combine"])
@given(st.data())
def test_dense_weighted_combine_triton(data):
    _check_dense_weighted_combine(data, "triton")


def _check_dense_weighted_combine(data, impl: str):
    gen = _generator(data)
    experts, weights, scale = _draw_dense_case(data, gen, impl)
    if data.draw(INVALID, label="invalid expert count"):
        with pytest.raises(ValueError, match=r"^dense_weighted_combine: expert_out must hold between 1 and 32"):
            ops.dense_weighted_combine([experts[0]] * 33, weights.repeat(1, 33)[:, :33])
        return
    stacked = data.draw(st.booleans(), label="stacked")
    expert_leaves = [_leaf(torch.stack(experts))] if stacked else [_leaf(y) for y in experts]
    others = [_leaf(weights)] + ([_leaf(scale)] if scale is not None else [])
    with running(impl, "dense_weighted_combine"):
        out = ops.dense_weighted_combine(expert_leaves[0] if stacked else expert_leaves, others[0],
                                         others[1] if scale is not None else None)
    expected = reference.dense_weighted_combine([_wide(y) for y in experts], _wide(weights), _wide(scale))
    terms = reference.dense_weighted_combine([_wide(y, True) for y in experts], _wide(weights, True),
                                             _wide(scale, True))
    assert out.dtype == experts[0].dtype and out.shape == experts[0].shape
    assert_within(out, expected, accumulation_bound(terms, len(experts) + 2, expected, out.dtype), what="out")
    if out.numel() == 0:  # the backward fails: see test_dense_combine_backward_of_no_elements
        return
    grad = _randn(gen, *out.shape, dtype=out.dtype)
    got = _grads(out, expert_leaves + others, grad)
    got_experts = list(got[0].unbind(0)) if stacked else got[:len(experts)]
    rest = got[len(expert_leaves):]
    _assert_dense_grads(got_experts, rest[0], rest[1] if scale is not None else None, grad, experts, weights, scale)


# ---- the stochastic residual, alone and after a combine ----------------------------------------------


def _draw_residual_draw(data):
    """(mistake, (p, seed, offset, granularity, training)): mistake is None, or "p" or "seed" when
    that argument was drawn invalid."""
    p = data.draw(st.sampled_from([1.0, 0.999, 0.8, 0.5, 0.13, 1e-3]), label="p")
    seed = data.draw(st.integers(0, 2**63 - 1), label="seed")
    offset = data.draw(st.integers(0, 2**40), label="offset")
    granularity = data.draw(st.sampled_from(["token", "sample"]), label="granularity")
    training = data.draw(st.booleans(), label="training")
    mistake = data.draw(st.sampled_from([None] * 9 + ["p", "seed"]), label="mistake")
    if mistake == "p":
        p = data.draw(st.sampled_from([0.0, -0.5, 1.5, float("nan")]))
    elif mistake == "seed":
        seed = -1
    return mistake, (p, seed, offset, granularity, training)


@settings(max_examples=EXAMPLES["stochastic_residual"])
@given(st.data())
def test_stochastic_residual(data):
    _check_stochastic_residual(data, "cpu")


@settings(max_examples=TRITON_EXAMPLES["stochastic_residual"])
@given(st.data())
def test_stochastic_residual_triton(data):
    _check_stochastic_residual(data, "triton")


def _check_stochastic_residual(data, impl: str):
    dims = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=3), label="leading dims")
    shape = (*dims, data.draw(st.integers(0, min(40, MAX_SIZE[impl])), label="D"))
    dtype, layout = data.draw(st.sampled_from(DTYPES[impl]), label="dtype"), data.draw(LAYOUTS, label="layout")
    mistake, (p, seed, offset, granularity, training) = _draw_residual_draw(data)
    draw = {"seed": seed, "offset": offset, "granularity": granularity, "training": training}
    gen = _generator(data)
    y, r = _randn(gen, *shape, dtype=dtype), _randn(gen, *shape, dtype=dtype)
    if mistake is not None:
        with pytest.raises(ValueError, match=rf"^stochastic_residual: {mistake}"):
            ops.stochastic_residual(y, r, p, **draw)
        return
    if layout != "contiguous" and len(shape) == 2:
        y, r = _layout(y, layout), _layout(r, "strided")
    ys, rs = _leaf(y), _leaf(r)
    with running(impl, "stochastic_residual"):
        out = ops.stochastic_residual(ys, rs, p, **draw)
    expected = reference.stochastic_residual(_wide(y), _wide(r), p, **draw)
    terms = reference.stochastic_residual(_wide(y, True), _wide(r, True), p, **draw)
    assert out.dtype == dtype
    assert_within(out, expected, accumulation_bound(terms, 3, expected, dtype), what="out")
    grad = _randn(gen, *shape, dtype=dtype)
    grad_y, grad_r = _grads(out, [ys, rs], grad)
    assert torch.equal(grad_y, grad), "grad y is the incoming gradient"
    expected_r = stochastic_residual_backward(_wide(grad), p, **draw)
    terms_r = stochastic_residual_backward(_wide(grad, True), p, **draw)
    assert_within(grad_r, expected_r, accumulation_bound(terms_r, 2, expected_r, dtype), what="grad r")


@settings(max_examples=EXAMPLES["combine_residual"])
@given(st.data())
def test_combine_residual(data):
    sparse = data.draw(st.booleans(), label="sparse layout")
    mistake, (p, seed, offset, granularity, training) = _draw_residual_draw(data)
    draw = {"seed": seed, "offset": offset, "granularity": granularity, "training": training}
    gen = _generator(data)
    if sparse:
        expert_out, weights, scale, dispatch = _draw_sparse_case(data, gen)
        n, d = weights.shape[0], expert_out.shape[1]
        samples = data.draw(st.sampled_from([b for b in (1, 2, 3, 5) if n % b == 0]), label="samples")
        residual = _randn(gen, samples, n // samples, d, dtype=expert_out.dtype)  # rows flatten to N
        experts = None
    else:
        experts, weights, scale = _draw_dense_case(data, gen)
        residual = _randn(gen, *experts[0].shape, dtype=experts[0].dtype)
        dispatch = None
    if mistake is not None:
        with pytest.raises(ValueError, match=rf"^combine_residual: {mistake}"):
            ops.combine_residual(expert_out if sparse else experts, weights, residual, p, **draw, dispatch=dispatch)
        return
    expert_leaves = [_leaf(expert_out)] if sparse else [_leaf(y) for y in experts]
    others = [_leaf(residual), _leaf(weights)] + ([_leaf(scale)] if scale is not None else [])
    with running("cpu", "combine_residual"):
        out = ops.combine_residual(expert_leaves[0] if sparse else expert_leaves, others[1], others[0], p, **draw,
                                   expert_scale=others[2] if scale is not None else None, dispatch=dispatch)
    if sparse:
        def fused(magnitude=False):
            return reference.sparse_combine_residual(
                _wide(expert_out, magnitude), _wide(weights, magnitude), dispatch.indices, dispatch.inverse_positions,
                dispatch.num_experts, _wide(residual, magnitude), p, **draw, expert_scale=_wide(scale, magnitude))
        terms_per_element = weights.shape[1] + 3
    else:
        def fused(magnitude=False):
            return reference.combine_residual([_wide(y, magnitude) for y in experts], _wide(weights, magnitude),
                                              _wide(residual, magnitude), p, **draw,
                                              expert_scale=_wide(scale, magnitude))
        terms_per_element = len(experts) + 3
    assert out.dtype == residual.dtype and out.shape == residual.shape
    if out.numel() == 0:  # the references cannot reshape 0 elements: the gradients of no elements are zero
        leaves = expert_leaves + others
        for leaf, g in zip(leaves, _grads(out, leaves, torch.zeros(out.shape))):
            assert g.shape == leaf.shape and not g.any()
        return
    expected, terms = fused(), fused(magnitude=True)
    # Off the fused Triton kernel the combine is rounded to the dtype before the residual is added
    # (bit-identical to the two ops in sequence): one more rounding of the combine in that dtype.
    combine_terms = terms - stochastic_residual_backward(_wide(residual, True), p, **draw).view(terms.shape)
    bound = (accumulation_bound(terms, terms_per_element, expected, out.dtype)
             + UNIT_ROUNDOFF[out.dtype] * combine_terms)
    assert_within(out, expected, bound, what="out")

    grad = _randn(gen, *out.shape, dtype=out.dtype)
    got = _grads(out, expert_leaves + others, grad)
    got_experts, (grad_residual, grad_weights, *grad_scale) = got[:len(expert_leaves)], got[len(expert_leaves):]
    expected_r = stochastic_residual_backward(_wide(grad), p, **draw)
    terms_r = stochastic_residual_backward(_wide(grad, True), p, **draw)
    assert_within(grad_residual, expected_r, accumulation_bound(terms_r, 2, expected_r, out.dtype),
                  what="grad residual")
    if sparse:
        flat = grad.reshape(-1, grad.shape[-1])
        _assert_sparse_grads([got_experts[0], grad_weights, *(grad_scale or [None])], flat, expert_out, weights, scale,
                             dispatch)
    else:
        _assert_dense_grads(got_experts, grad_weights, grad_scale[0] if grad_scale else None, grad, experts, weights,
                            scale)


# ---- momentum-queue contrast --------------------------------------------------------------------


def _draw_contrast_case(data, op: str):
    """(q, k, queue, temperature) of drawn sizes, dtype and layout, or None after checking that an
    invalid draw (an empty dimension, a bad temperature) raises the op's error."""
    n, d = data.draw(st.integers(1, 40), label="N"), data.draw(st.integers(1, 70), label="D")
    num_keys = data.draw(st.integers(1, 300), label="K")
    dtype, layout = data.draw(FLOATS, label="dtype"), data.draw(LAYOUTS, label="layout")
    temperature = data.draw(st.sampled_from([0.07, 0.2, 1.0]), label="temperature")
    normalized = data.draw(st.booleans(), label="unit rows")
    mistake = data.draw(st.sampled_from([None] * 9 + ["N", "D", "K", "temperature"]), label="mistake")
    if mistake == "N":
        n = 0
    elif mistake == "D":
        d = 0
    elif mistake == "K":
        num_keys = 0
    elif mistake == "temperature":
        temperature = data.draw(st.sampled_from([0.0, -1.0, float("inf"), float("nan")]))
    gen = _generator(data)
    tensors = [torch.randn(rows, d, generator=gen) for rows in (n, n, num_keys)]
    if normalized:
        tensors = [F.normalize(t, dim=1) for t in tensors]
    q, key, queue = (_layout(t.to(dtype), layout) for t in tensors)
    if mistake is not None:
        expected = {"N": "q must be", "D": "q must be", "K": "queue must have", "temperature": "temperature"}[mistake]
        with pytest.raises(ValueError, match=rf"^{op}: {expected}"):
            getattr(ops, op)(q, key, queue, temperature)
        return None
    return q, key, queue, temperature


@settings(max_examples=EXAMPLES["moco_logits"])
@given(st.data())
def test_moco_logits(data):
    case = _draw_contrast_case(data, "moco_logits")
    if case is None:
        return
    q, key, queue, temperature = case
    leaves = [_leaf(q), _leaf(key)]
    with running("cpu", "moco_logits"):
        logits = ops.moco_logits(*leaves, queue, temperature)

    def wide(magnitude=False):
        leaves64 = [_leaf(_wide(t, magnitude)) for t in (q, key)]
        return reference.moco_logits(*leaves64, _wide(queue, magnitude), temperature), leaves64

    (expected, leaves64), (terms, abs_leaves) = wide(), wide(magnitude=True)
    d, num_keys = q.shape[1], queue.shape[0]
    assert logits.dtype == torch.float32
    # q / T rounded to fp32 first, then D-long fp32 dot products.
    assert_within(logits, expected, accumulation_bound(terms, d + 2, expected, torch.float32), what="logits")
    weight = torch.randn(logits.shape, generator=_generator(data), dtype=torch.float64)
    got = _grads(logits, leaves, weight)
    want = torch.autograd.grad(expected, leaves64, weight)
    term_sums = torch.autograd.grad(terms, abs_leaves, weight.abs())
    for name, g, w, t, length in zip(("q", "k"), got, want, term_sums, (num_keys + 3, 3)):
        assert g.dtype == q.dtype
        assert_within(g, w, accumulation_bound(t, length, w, q.dtype), what=f"grad {name}")


@settings(max_examples=EXAMPLES["moco_infonce"])
@given(st.data())
def test_moco_infonce(data):
    case = _draw_contrast_case(data, "moco_infonce")
    if case is None:
        return
    q, key, queue, temperature = case
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    if data.draw(INVALID, label="invalid reduction"):
        with pytest.raises(ValueError, match=r"^moco_infonce: reduction must be one of"):
            ops.moco_infonce(q, key, queue, temperature, reduction="max")
        return
    leaves, leaves64, leaves32 = [_leaf(q), _leaf(key)], [_leaf(_wide(q)), _leaf(_wide(key))], [_leaf(q), _leaf(key)]
    with running("cpu", "moco_infonce"):
        loss = ops.moco_infonce(*leaves, queue, temperature, reduction)
    expected = reference.moco_infonce(*leaves64, _wide(queue), temperature, reduction)
    # PyTorch's own computation of the kernels' formula, loss = lse - positive logit, in fp32: it
    # cancels as they do when the positive dominates (cross_entropy's log_softmax does not).
    logits32 = reference.moco_logits(*leaves32, queue, temperature)
    per_row = torch.logsumexp(logits32, dim=1) - logits32[:, 0]
    torch_loss = {"mean": per_row.mean, "sum": per_row.sum, "none": lambda: per_row}[reduction]()
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    assert_within_torch_error(loss, expected, torch_loss, what="loss")
    weight = torch.rand(loss.shape, generator=_generator(data), dtype=torch.float64)
    # The CPU kernel's exp clamps its argument at -87 (csrc/cpu/moco.cpp): a softmax weight below
    # e^-87 counts as e^-87, which can add e^-87 / T * sum_j |queue_j| * |weight| to grad q.
    clamp_floor = math.exp(-87) / temperature * _wide(queue, True).sum(0).max().item() * weight.max().item()
    # grad q sums K + 1 softmax-weighted keys / T (weights summing to 1): in any order at most
    # K + 1 + D roundings of 2 / T * max |key| * |weight|, which holds where PyTorch's own error
    # is small by luck (its summation order is the BLAS's, another on another host).
    largest_key = max(_wide(queue, True).max().item(), _wide(key, True).max().item()) if queue.numel() else 0.0
    accumulation_floor = ((queue.shape[0] + 1 + q.shape[1]) * torch.finfo(torch.float32).eps * 2 / temperature
                          * largest_key * (weight.max().item() if weight.numel() else 0.0))
    for name, g, w, t in zip(("q", "k"), _grads(loss, leaves, weight), _grads(expected, leaves64, weight),
                             _grads(torch_loss, leaves32, weight)):
        assert g.dtype == q.dtype
        assert_within_torch_error(g, w, t, what=f"grad {name}", floor=clamp_floor + accumulation_floor)


@settings(max_examples=EXAMPLES["queue_enqueue_"])
@given(st.data())
def test_queue_enqueue(data):
    capacity, d = data.draw(st.integers(1, 64), label="K"), data.draw(st.integers(0, 40), label="D")
    count = data.draw(st.integers(0, capacity), label="B")
    start = data.draw(st.integers(0, capacity - 1), label="ptr")
    dtype = data.draw(FLOATS, label="queue dtype")
    keys_dtype = data.draw(FLOATS, label="keys dtype")
    layout = data.draw(LAYOUTS, label="keys layout")
    gen = _generator(data)
    queue = _randn(gen, capacity, d, dtype=dtype)
    keys = _layout(_randn(gen, count, d, dtype=keys_dtype), layout)
    ptr = torch.tensor([start])
    mistake = data.draw(st.sampled_from([None] * 9 + ["too many keys", "ptr", "float64 keys"]), label="mistake")
    if mistake == "float64 keys":  # keys are fp32, fp16 or bf16
        with pytest.raises(TypeError, match=r"^queue_enqueue_: keys must have dtype float32, float16, bfloat16"):
            ops.queue_enqueue_(queue, ptr, keys.double())
        return
    if mistake == "too many keys":
        with pytest.raises(ValueError, match=r"^queue_enqueue_: keys has \d+ rows, more than the queue's"):
            ops.queue_enqueue_(queue, ptr, _randn(gen, capacity + 1, d, dtype=dtype))
        return
    if mistake == "ptr":
        ptr.fill_(capacity)
        with pytest.raises(ValueError, match=rf"^queue_enqueue_: ptr\[0\] = {capacity} is outside \[0, {capacity}\)"):
            with running("cpu", "queue_enqueue_"):
                ops.queue_enqueue_(queue, ptr, keys)
        return
    expected_queue, expected_ptr = queue.clone(), ptr.clone()
    reference.queue_enqueue_(expected_queue, expected_ptr, keys)
    with running("cpu", "queue_enqueue_"):
        ops.queue_enqueue_(queue, ptr, keys)
    assert torch.equal(queue, expected_queue) and torch.equal(ptr, expected_ptr)
    assert int(ptr) == (start + count) % capacity


# ---- grouped experts --------------------------------------------------------------------------------


def _experts_in_dtype(x, indices, gate_up, down, weights, activation, gated, scale):
    """The layer as eager PyTorch computes it in x's dtype: each expert's FFN by the reference's
    expert_ffn on inputs of that dtype, the weighted sum in fp32 (the op's contract)."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in range(gate_up.shape[0]):
        tokens, slots = (indices == e).nonzero(as_tuple=True)
        y = expert_ffn(x[tokens], gate_up[e], down[e], activation, gated)
        coef = weights[tokens, slots].float() * (scale[e].float() if scale is not None else 1.0)
        out = out.index_add(0, tokens, coef[:, None] * y.float())
    return out.to(x.dtype)


@settings(max_examples=EXAMPLES["moe_experts"])
@given(st.data())
def test_moe_experts(data):
    n, hidden = data.draw(st.integers(0, 24), label="N"), data.draw(st.integers(1, 40), label="H")
    intermediate, e = data.draw(st.integers(1, 24), label="I"), data.draw(st.integers(1, 6), label="E")
    k = data.draw(st.integers(1, min(e, 3)), label="k")
    gated = data.draw(st.booleans(), label="gated")
    activation = data.draw(st.sampled_from(sorted(ACTIVATIONS)), label="activation")
    dtype, layout = data.draw(FLOATS, label="dtype"), data.draw(LAYOUTS, label="x layout")
    gen = _generator(data)
    x = _layout(_randn(gen, n, hidden, dtype=dtype), layout)
    rows = 2 * intermediate if gated else intermediate
    gate_up = _randn(gen, e, rows, hidden, dtype=dtype, scale=hidden**-0.5)
    down = _randn(gen, e, hidden, intermediate, dtype=dtype, scale=intermediate**-0.5)
    indices = _routing(gen, n, e, k)
    weights = torch.softmax(torch.randn(n, k, generator=gen), dim=1)
    scale = torch.rand(e, generator=gen) + 0.5 if data.draw(st.booleans(), label="expert_scale") else None
    dispatch = ops.moe_dispatch(indices, e)
    if data.draw(INVALID, label="invalid down"):
        with pytest.raises(ValueError, match=r"^moe_experts: gate_up.shape\[1\] must equal 2 \* I \(gated\) or I"):
            ops.moe_experts(x, dispatch, gate_up, down[..., :0], weights, activation=activation, gated=gated,
                            expert_scale=scale)
        return
    options = {"activation": activation, "gated": gated}
    tensors = (x, gate_up, down, weights) + ((scale,) if scale is not None else ())
    if n == 0:  # no tokens: an empty output, zero gradients (the reference's output has no graph then)
        leaves = [_leaf(t) for t in tensors]
        with running("torch", "moe_experts"):
            out = ops.moe_experts(leaves[0], dispatch, *leaves[1:4], **options,
                                  expert_scale=leaves[4] if scale is not None else None)
        assert out.shape == (0, hidden) and out.dtype == dtype
        for leaf, g in zip(leaves, torch.autograd.grad(out.sum(), leaves, allow_unused=True, materialize_grads=True)):
            assert g.shape == leaf.shape and not g.any()
        return

    def run(fn, inputs):
        leaves = [_leaf(t) for t in inputs]
        return fn(leaves), leaves

    def op(leaves):
        with running("torch", "moe_experts"):
            return ops.moe_experts(leaves[0], dispatch, *leaves[1:4], **options,
                                   expert_scale=leaves[4] if scale is not None else None)

    def oracle(leaves):
        return reference.moe_experts(leaves[0], indices, *leaves[1:4], **options,
                                     expert_scale=leaves[4] if scale is not None else None)

    def eager(leaves):
        return _experts_in_dtype(leaves[0], indices, *leaves[1:4], activation, gated,
                                 leaves[4] if scale is not None else None)

    (out, leaves), (expected, leaves64), (torch_out, leaves_eager) = (
        run(op, tensors), run(oracle, [_wide(t) for t in tensors]), run(eager, tensors))
    assert out.dtype == dtype and out.shape == x.shape
    assert_within_torch_error(out, expected, torch_out, what="out")
    grad = torch.randn(n, hidden, generator=gen, dtype=torch.float64)
    names = ("x", "gate_up", "down", "weights", "expert_scale")
    # Each gradient is a chain of fp32 sums of lengths H, I and N*k (the slots, or an expert's
    # rows): whatever order a BLAS or kernel picks, at most that many roundings of the largest
    # value (Higham), which holds where PyTorch's own error is small by luck (a lucky order can
    # put it far below the worst case on one host and not on another).
    chain = hidden + intermediate + n * k
    for name, g, w, t in zip(names, _grads(out, leaves, grad), _grads(expected, leaves64, grad),
                             _grads(torch_out, leaves_eager, grad)):
        # The routing-weight and scale gradients are fp32 but dot products of x's dtype values.
        floor = chain * torch.finfo(torch.float32).eps * w.abs().max().item() if w.numel() else 0.0
        assert_within_torch_error(g, w, t, what=f"grad {name}", dtype=dtype, floor=floor)


# ---- failures the fuzzing found, now fixed: their regression tests ---------------------------------


def test_sparse_combine_backward_with_no_features():
    dispatch = ops.moe_dispatch(torch.tensor([[0], [1]], dtype=torch.int32), 2)
    expert_out, weights = torch.randn(2, 0, requires_grad=True), torch.rand(2, 1, requires_grad=True)
    grad_weights = torch.autograd.grad(ops.weighted_combine(expert_out, weights, dispatch).sum(), weights)[0]
    assert torch.equal(grad_weights, torch.zeros(2, 1))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 2, 5)], ids=lambda s: "x".join(map(str, s)))
def test_dense_combine_backward_of_no_elements(shape):
    experts = [torch.randn(*shape, requires_grad=True) for _ in range(2)]
    weights = torch.rand(shape[0], 2, requires_grad=True)
    with running("cpu", "dense_weighted_combine"):
        out = ops.dense_weighted_combine(experts, weights)
    grads = torch.autograd.grad(out.sum(), [*experts, weights])
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, [*experts, weights]))


@pytest.mark.parametrize("hidden, intermediate", [(1, 8), (8, 1)], ids=["H1", "I1"])
def test_moe_experts_with_a_unit_hidden_or_intermediate_size(hidden, intermediate):
    x = torch.randn(4, hidden)
    dispatch = ops.moe_dispatch(torch.tensor([[0], [1], [1], [0]], dtype=torch.int32), 2)
    gate_up, down = torch.randn(2, 2 * intermediate, hidden), torch.randn(2, hidden, intermediate)
    with running("torch", "moe_experts"):
        out = ops.moe_experts(x, dispatch, gate_up, down, torch.ones(4, 1))
    expected = reference.moe_experts(x.double(), dispatch.indices, gate_up.double(), down.double(),
                                     torch.ones(4, 1, dtype=torch.float64))
    torch_value = _experts_in_dtype(x, dispatch.indices, gate_up, down, torch.ones(4, 1), "silu", True, None)
    assert_within_torch_error(out, expected, torch_value, what="out")
