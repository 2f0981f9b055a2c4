"""Tests of the fused router (astrea.ops.router_topk, its losses and TopKRouter): the Triton
kernels (under the interpreter on CPU), the C++ CPU kernel of astrea._C and the reference
path against the reference."""

import pytest
import torch

from astrea import reference
from astrea.nn import RouterResult, TopKRouter
from astrea.ops import RouterOutput, load_balancing_loss, router_topk, router_z_loss
from astrea.ops.router import GROUP_SCORES
from tests.utils import (CHOICE_OF, IMPLEMENTATIONS, UNIT_ROUNDOFF, accumulation_bound, assert_within,
                         assert_within_torch_error, running, strided)

# (N, E, k, scoring, renormalize): together every N in {0, 1, 17, 1000}, E in
# {1, 3, 7, 60, 129, 512} and k in {1, 2, 6, E}, a few programs each under the interpreter.
CASES = [
    (0, 7, 2, "softmax", True),
    (1, 1, 1, "softmax", True),
    (1, 512, 512, "sigmoid", True),
    (17, 3, 3, "sigmoid", False),
    (17, 7, 2, "softmax", False),
    (17, 512, 6, "softmax", True),
    (1000, 60, 6, "softmax", True),
    (1000, 129, 2, "sigmoid", True),
    (1000, 60, 1, "sigmoid", False),
]
CASE_IDS = [f"N{n}-E{e}-k{k}-{s}-{'renorm' if r else 'raw'}" for n, e, k, s, r in CASES]
GRAD_MODES = [(s, r) for s in ("softmax", "sigmoid") for r in (True, False)]
OPS_UNDER_TEST = ("router_topk",)


def _compare(actual, logits: torch.Tensor, k: int, what: str, **options) -> None:
    """router_topk's outputs on ``logits`` against the reference's: indices and counts exactly as
    the fp32 reference chooses; weights, lse and prob_sums within 4x the fp32 reference's own
    error against the float64 reference (flash-attention's rule), weights on the rows where
    float64 chooses the same experts (a near-tie may order them otherwise)."""
    weights, indices, counts, prob_sums, lse = actual
    assert weights.dtype == torch.float32 and indices.dtype == torch.int32 and counts.dtype == torch.int32
    assert prob_sums.dtype == torch.float32 and lse.dtype == torch.float32
    expected = _reference(logits.float(), k, options)
    truth = _reference(logits.double(), k, {name: value.double() if isinstance(value, torch.Tensor) else value
                                            for name, value in options.items()})
    assert torch.equal(indices, expected[1]), f"{what}: indices differ"
    assert torch.equal(counts, expected[2]), f"{what}: counts differ"
    same = (truth[1] == expected[1]).all(1)
    assert_within_torch_error(weights[same], truth[0][same], expected[0][same], what=f"{what} weights")
    assert_within_torch_error(lse, truth[4], expected[4], what=f"{what} lse")
    assert_within_torch_error(prob_sums, truth[3], expected[3], what=f"{what} prob_sums")


def _assert_row_sums(weights: torch.Tensor, scale: float, what: str) -> None:
    """Renormalised weights add to ``scale`` per row, within the rounding of their computation:
    v_j / S with S the fp32 sum of the same k values v_j (scores, or the exponentials of the
    chosen logits), so sum_j v_j / S = 1 up to the k - 1 roundings of S, whatever the errors
    of the v_j; then up to two roundings in each division (a GPU's fast fp32 division), one in
    the scaling, and k - 1 in the test's own fp32 sum of the weights: 2k + 1 in all, each of at
    most u times the sum of |terms| (= scale)."""
    k = weights.shape[1]
    expected = torch.full((weights.shape[0],), float(scale), dtype=torch.float64)
    assert_within(weights.sum(1), expected, accumulation_bound(expected.abs(), 2 * k + 1, expected, torch.float32),
                  what=what)


def _check_grad(grad: torch.Tensor, logits: torch.Tensor, k: int, options: dict, loss_of, what: str) -> None:
    """``grad``, a kernel's d loss_of(router_topk(logits)) / d logits, against the float64
    reference's autograd, within 4x the error of PyTorch's own computation of what the kernels
    compute: their closed form (reference.router_topk_backward) in fp32, fed the gradients that
    ``loss_of`` sends into the fp32 reference's outputs (flash-attention's rule; autograd
    through the fp32 forward is another formula, cancelling differently where a softmax
    saturates). Rows where float64 chooses other experts (near-ties of fp32 keys) are left out,
    so a ``loss_of`` that couples rows through the counts needs the same choice everywhere."""
    x64 = logits.detach().double().requires_grad_()
    truth = RouterOutput(*_reference(x64, k, {name: value.double() if isinstance(value, torch.Tensor) else value
                                              for name, value in options.items()}))
    grad64 = torch.autograd.grad(loss_of(truth), x64)[0]
    own = RouterOutput(*_reference(logits.detach(), k, options))
    # The fp32 outputs as leaves: the gradients loss_of sends into each (the reference computes
    # its softmax scores from lse, so autograd through it would fold those paths into lse's).
    leaves = [t.detach().requires_grad_() for t in (own.weights, own.prob_sums, own.lse)]
    upstream = torch.autograd.grad(loss_of(own._replace(weights=leaves[0], prob_sums=leaves[1], lse=leaves[2])),
                                   leaves, allow_unused=True, materialize_grads=True)
    options = dict(scoring="softmax", renormalize=True, scaling_factor=1.0) | options
    torch_grad = reference.router_topk_backward(logits.detach(), own.indices, own.lse, *upstream,
                                                options["scoring"], options["renormalize"],
                                                options["scaling_factor"])
    same = (truth.indices == own.indices).all(1)
    assert_within_torch_error(grad[same], grad64[same], torch_grad[same], what=what)


def _loss_weights(n: int, e: int, k: int):
    return torch.randn(n, k), torch.randn(e), torch.randn(n)


def _surrogate(out, grad_weights, grad_prob_sums, grad_lse):
    """A scalar whose gradient sends the given gradients into weights, prob_sums and lse."""
    weights, _, _, prob_sums, lse = out
    return (weights * grad_weights).sum() + (prob_sums * grad_prob_sums).sum() + (lse * grad_lse).sum()


# ---- forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, e, k, scoring, renormalize", CASES, ids=CASE_IDS)
def test_kernel_forward_matches_reference(kernel, n, e, k, scoring, renormalize):
    logits = torch.randn(n, e) * 3
    out = router_topk(logits, k, scoring=scoring, renormalize=renormalize)
    assert isinstance(out, RouterOutput)
    _compare(out, logits, k, kernel, scoring=scoring, renormalize=renormalize)
    assert int(out.counts.sum()) == n * k
    if renormalize and n:
        _assert_row_sums(out.weights, 1.0, "renormalised row sums")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_low_precision_logits_are_scored_in_fp32(backend, dtype):
    logits = (torch.randn(17, 60) * 3).to(dtype)
    with running(backend, *OPS_UNDER_TEST):
        out = router_topk(logits, 6, scoring="softmax")
    _compare(out, logits.float(), 6, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_strided_logits(backend):
    logits = torch.randn(17, 60)
    with running(backend, *OPS_UNDER_TEST):
        _compare(router_topk(strided(logits), 6, scoring="sigmoid"), logits, 6, f"{backend} every other column",
                 scoring="sigmoid")
        column_major = logits.t().contiguous().t()
        _compare(router_topk(column_major, 6, scoring="sigmoid"), logits, 6, f"{backend} column-major",
                 scoring="sigmoid")


def test_empty_batch(kernel):
    logits = torch.randn(0, 7, requires_grad=True)
    out = router_topk(logits, 2)
    assert out.weights.shape == (0, 2) and out.indices.shape == (0, 2) and out.lse.shape == (0,)
    assert torch.equal(out.counts, torch.zeros(7, dtype=torch.int32))
    assert torch.equal(out.prob_sums, torch.zeros(7))
    out.prob_sums.sum().backward()
    assert logits.grad.shape == (0, 7)


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_ties_go_to_the_lower_expert_index(backend):
    logits = torch.tensor([
        [0.0, 0.0, 0.0, 0.0, 0.0],  # all equal: the first k
        [1.0, 3.0, 3.0, 2.0, 3.0],  # three-way tie for the top
        [2.0, 1.0, 2.0, 1.0, 2.0],
        [-1.0, 5.0, -1.0, 5.0, -1.0],
        [float("-inf"), 1.0, float("-inf"), float("-inf"), 0.0],  # -inf ties after the finite ones
        [-0.0, 0.0, -0.0, 1.0, -1.0],  # -0.0 equals +0.0
    ])
    expected = torch.tensor([[0, 1, 2], [1, 2, 4], [0, 2, 4], [1, 3, 0], [1, 4, 0], [3, 0, 1]], dtype=torch.int32)
    with running(backend, *OPS_UNDER_TEST):
        for scoring in ("softmax", "sigmoid"):
            assert torch.equal(router_topk(logits, 3, scoring=scoring).indices, expected), scoring
        # With a bias the keys are score + bias: equal biases keep the ties.
        biased = router_topk(logits, 3, bias=torch.full((5,), 0.25))
        assert torch.equal(biased.indices, expected)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_bias_changes_selection_not_weights(backend, scoring):
    logits = torch.randn(17, 60)
    # Levels far apart so rounding of score + bias cannot reorder experts across levels.
    bias = torch.randint(0, 4, (60,)).float() * 2
    with running(backend, *OPS_UNDER_TEST):
        out = router_topk(logits, 6, scoring=scoring, renormalize=False, bias=bias)
    def scores_of(x):
        return torch.softmax(x, 1) if scoring == "softmax" else torch.sigmoid(x)

    scores, scores64 = scores_of(logits.float()), scores_of(logits.double())
    chosen = out.indices.long()
    assert_within_torch_error(out.weights, scores64.gather(1, chosen), scores.gather(1, chosen),
                              what="weights are the unbiased scores")
    _compare(out, logits, 6, f"{backend} bias", scoring=scoring, renormalize=False, bias=bias)
    assert not torch.equal(out.indices, router_topk(logits, 6, scoring=scoring).indices)
    # A bias towards expert 5 large enough routes every token there first.
    pull = torch.zeros(60)
    pull[5] = 10.0
    with running(backend, *OPS_UNDER_TEST):
        pulled = router_topk(logits, 2, scoring=scoring, renormalize=False, bias=pull)
    assert (pulled.indices[:, 0] == 5).all()
    assert_within_torch_error(pulled.weights[:, 0], scores64[:, 5], scores[:, 5], what="pulled weight")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_non_finite_rows_give_nan_weights_and_valid_indices(backend):
    nan, inf = float("nan"), float("inf")
    logits = torch.randn(6, 7)
    logits[1, 3] = nan
    logits[2, 0] = inf
    logits[3] = -inf
    logits[4, 2:] = -inf  # finite entries remain: an ordinary row
    logits[5, 6] = nan
    for scoring in ("softmax", "sigmoid"):
        with running(backend, *OPS_UNDER_TEST):
            out = router_topk(logits, 3, scoring=scoring)
        bad = torch.tensor([False, True, True, True, False, True])
        assert out.lse[bad].isnan().all() and out.lse[~bad].isfinite().all()
        assert out.weights[bad].isnan().all() and out.weights[~bad].isfinite().all()
        assert ((out.indices >= 0) & (out.indices < 7)).all()
        # NaN ranks lowest: rows 1 and 5 route to their best finite logits, never to the NaN.
        for row, nan_expert in ((1, 3), (5, 6)):
            finite = logits[row].nan_to_num(nan=-inf)
            assert torch.equal(out.indices[row].long(), torch.sort(finite, descending=True, stable=True).indices[:3])
            assert nan_expert not in out.indices[row].tolist()
        assert torch.equal(out.indices[3], torch.tensor([0, 1, 2], dtype=torch.int32))
        assert torch.equal(out.indices[4][:2], torch.tensor([0, 1], dtype=torch.int32))
        assert int(out.counts.sum()) == 18
        assert torch.equal(out.indices, reference.router_topk(logits, 3, scoring, True)[1])


def test_forward_is_deterministic_across_program_counts(kernels, monkeypatch):
    from astrea.kernels import router as router_kernels

    logits = torch.randn(1000, 60)
    first = router_topk(logits, 6)
    again = router_topk(logits, 6)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # Fewer programs than row blocks: each program loops over several blocks. A row's outputs
    # do not depend on which program scores it: bitwise equal. prob_sums adds the same 1000
    # scores in other groupings: each order within 999 roundings of the sum (the scores are
    # positive, so their sum is the sum of |terms|), the two within twice that.
    monkeypatch.setattr(router_kernels, "MAX_FORWARD_PROGRAMS", 2)
    looped = router_topk(logits, 6)
    for name, a, b in zip(RouterOutput._fields, first, looped):
        if name != "prob_sums":
            assert torch.equal(a, b), f"looped {name}"
    sums64 = torch.softmax(logits.double(), 1).sum(0)
    assert_within(looped.prob_sums, first.prob_sums,
                  accumulation_bound(sums64, 2 * (logits.shape[0] - 1), torch.zeros_like(sums64), torch.float32),
                  what="looped prob_sums")


def test_cpu_kernel_is_deterministic_across_thread_counts():
    logits, bias = torch.randn(1000, 60), torch.randn(60)  # several blocks of rows
    threads = torch.get_num_threads()
    with running("cpu", *OPS_UNDER_TEST):
        first = router_topk(logits, 6, bias=bias)
        torch.set_num_threads(1)
        try:
            serial = router_topk(logits, 6, bias=bias)
        finally:
            torch.set_num_threads(threads)
    for name, a, b in zip(RouterOutput._fields, first, serial):
        assert torch.equal(a, b), name


# ---- backward -----------------------------------------------------------------------------------


# Every scoring/renormalisation mode on small sizes, one large case per scoring.
BACKWARD_CASES = [(n, e, k, s, r) for n, e, k in [(17, 7, 2), (17, 60, 60)] for s, r in GRAD_MODES] + [
    (1000, 129, 6, "softmax", True), (1000, 129, 6, "sigmoid", True)]


@pytest.mark.parametrize("n, e, k, scoring, renormalize", BACKWARD_CASES)
def test_kernel_backward_matches_reference_autograd(kernel, n, e, k, scoring, renormalize):
    logits = (torch.randn(n, e) * 2).requires_grad_()
    grads = _loss_weights(n, e, k)
    _surrogate(router_topk(logits, k, scoring=scoring, renormalize=renormalize), *grads).backward()
    _check_grad(logits.grad, logits, k, dict(scoring=scoring, renormalize=renormalize),
                lambda out: _surrogate(out, *grads), f"{kernel} grad_logits")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_low_precision_backward(backend, dtype):
    logits = (torch.randn(17, 60) * 2).to(dtype).requires_grad_()
    grads = _loss_weights(17, 60, 6)
    with running(backend, *OPS_UNDER_TEST):
        _surrogate(router_topk(logits, 6), *grads).backward()
    assert logits.grad.dtype == dtype
    _check_grad(logits.grad, logits, 6, {}, lambda out: _surrogate(out, *grads), f"{backend} {dtype} grad_logits")


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_backward_with_strided_logits_and_bias(backend):
    base = torch.randn(17, 60)
    logits = strided(base).requires_grad_()
    bias = torch.randint(0, 4, (60,)).float() * 2
    grads = _loss_weights(17, 60, 6)
    with running(backend, *OPS_UNDER_TEST):
        _surrogate(router_topk(logits, 6, scoring="sigmoid", bias=bias), *grads).backward()
    _check_grad(logits.grad, base, 6, dict(scoring="sigmoid", bias=bias), lambda out: _surrogate(out, *grads),
                f"{backend} strided grad_logits")


@pytest.mark.parametrize("scoring, renormalize", GRAD_MODES)
def test_reference_gradcheck_float64(scoring, renormalize):
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)

    def differentiable_outputs(x):
        weights, _, _, prob_sums, lse = reference.router_topk(x, 3, scoring, renormalize)
        return weights, prob_sums, lse

    assert torch.autograd.gradcheck(differentiable_outputs, (logits,))


@pytest.mark.parametrize("scoring, renormalize", GRAD_MODES)
def test_cpu_kernel_gradcheck_float64(scoring, renormalize):
    """The C++ kernel's forward and closed-form backward in float64, through the custom op
    (router_topk itself takes fp32/fp16/bf16)."""
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7)

    def differentiable_outputs(x):
        weights, _, _, prob_sums, lse = torch.ops.astrea.router_topk(x, 3, scoring, renormalize, bias, "extension")
        return weights, prob_sums, lse

    with running("cpu", *OPS_UNDER_TEST):
        assert differentiable_outputs(logits)[0].dtype == torch.float64
        assert torch.autograd.gradcheck(differentiable_outputs, (logits,))


@pytest.mark.parametrize("scoring, renormalize", GRAD_MODES)
def test_reference_closed_form_backward_matches_autograd(scoring, renormalize):
    """The derivation written in the kernel, checked in float64 against autograd. Both are
    float64 evaluations, so the bound is the closed form's own rounding: its error in fp32 on
    the same (fp32) inputs, scaled by the ratio of the unit roundoffs (rounding errors are
    linear in u to first order), at most 4x that."""
    logits = torch.randn(9, 11).double().requires_grad_()
    grads = [g.double() for g in _loss_weights(9, 11, 4)]
    out = reference.router_topk(logits, 4, scoring, renormalize)
    _surrogate(out, *grads).backward()
    closed_form = reference.router_topk_backward(logits.detach(), out[1], out[4].detach(), *grads, scoring,
                                                 renormalize)
    out32 = reference.router_topk(logits.detach().float(), 4, scoring, renormalize)
    assert torch.equal(out32[1], out[1])
    closed_form32 = reference.router_topk_backward(logits.detach().float(), out32[1], out32[4],
                                                   *(g.float() for g in grads), scoring, renormalize)
    assert_within_torch_error(closed_form, logits.grad, closed_form32, what="closed-form grad_logits",
                              factor=4 * UNIT_ROUNDOFF[torch.float64] / UNIT_ROUNDOFF[torch.float32])


# ---- routing modes: groups, scaling, softmax after top-k, bias on the logits ------------------

# (name, E, k, keyword arguments; "bias" True means a random bias): grouped selection of
# DeepSeek-V3 (sigmoid + bias on the scores, top-2 sums, scaled) and DeepSeek-V2 (softmax,
# group max) at E = 160, 256 and 384 in 8 groups, softmax over the top-k logits (gpt-oss),
# a bias on the logits.
MODE_CASES = [
    ("v3-E256", 256, 8, dict(scoring="sigmoid", bias=True, num_groups=8, topk_groups=4, scaling_factor=2.5)),
    ("v3-E384", 384, 8, dict(scoring="sigmoid", bias=True, num_groups=8, topk_groups=4, scaling_factor=2.827)),
    ("v2-E160", 160, 6, dict(scoring="softmax", renormalize=False, num_groups=8, topk_groups=3, group_score="max",
                             scaling_factor=16.0)),
    ("grouped-no-bias-E160", 160, 6, dict(scoring="sigmoid", num_groups=8, topk_groups=2)),
    ("topk-softmax-E128", 128, 4, dict(scoring="topk_softmax")),
    ("topk-softmax-grouped-E384", 384, 8, dict(scoring="topk_softmax", num_groups=8, topk_groups=2)),
    ("bias-on-logits-E160", 160, 6, dict(scoring="sigmoid", bias=True, bias_on="logits", scaling_factor=0.5)),
    ("softmax-bias-on-logits-E256", 256, 8, dict(scoring="softmax", bias=True, bias_on="logits",
                                                  num_groups=8, topk_groups=4, group_score="max")),
]
MODE_IDS = [case[0] for case in MODE_CASES]


def _mode_kwargs(e: int, kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    if kwargs.get("bias"):
        kwargs["bias"] = torch.randn(e) * 0.5
    return kwargs


def _reference(logits, k, kwargs):
    """The reference of router_topk with keyword arguments, topk_groups defaulting to 1."""
    options = dict(scoring="softmax", renormalize=True, bias=None, bias_on="scores", num_groups=1, topk_groups=1,
                   group_score="top2_sum", scaling_factor=1.0) | kwargs
    return reference.router_topk(logits, k, *options.values())


@pytest.mark.parametrize("name, e, k, kwargs", MODE_CASES, ids=MODE_IDS)
def test_routing_modes_match_the_float64_reference(kernel, name, e, k, kwargs):
    kwargs = _mode_kwargs(e, kwargs)
    logits = torch.randn(64, e) * 2
    out = router_topk(logits, k, **kwargs)
    scale = kwargs.get("scaling_factor", 1.0)
    _compare(out, logits, k, f"{kernel} {name}", **kwargs)
    assert int(out.counts.sum()) == 64 * k
    if kwargs.get("renormalize", True) or kwargs["scoring"] == "topk_softmax":
        _assert_row_sums(out.weights, scale, "row sums = scaling_factor")


def test_grouped_selection_keeps_to_the_best_groups():
    """Grouped and plain top-k differ on these logits, and every chosen expert lies in one of
    the topk_groups groups with the largest top-2 sums."""
    logits = torch.randn(64, 256) * 2
    bias = torch.randn(256) * 0.5
    grouped = router_topk(logits, 8, scoring="sigmoid", bias=bias, num_groups=8, topk_groups=4)
    plain = router_topk(logits, 8, scoring="sigmoid", bias=bias)
    assert not torch.equal(grouped.indices, plain.indices)
    keys = torch.sigmoid(logits) + bias
    group_scores = keys.reshape(64, 8, 32).topk(2, dim=2).values.sum(2)
    best_groups = group_scores.topk(4, dim=1).indices
    chosen_groups = grouped.indices.long() // 32
    assert (chosen_groups[:, :, None] == best_groups[:, None, :]).any(2).all()
    # Within the kept groups the choice is the plain top-k of the keys.
    masked = keys.masked_fill(~(torch.arange(256) // 32 == best_groups[:, :, None]).any(1), float("-inf"))
    assert torch.equal(grouped.indices.long(), masked.topk(8, dim=1).indices)


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_grouped_ties_go_to_the_lower_index(backend):
    # 4 groups of 3 experts, all keys equal: the first two groups, then their first experts.
    equal = torch.zeros(2, 12)
    # Groups 0, 1 and 3 tie on top-2 sums (and on maxima) above group 2: groups 0 and 1 are
    # kept, whose experts 0 and 4 tie for the top, then experts 1 and 3.
    levels = torch.tensor([[2.0, 1.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 2.0, 1.0, 0.0]]).repeat(2, 1)
    with running(backend, *OPS_UNDER_TEST):
        for group_score in GROUP_SCORES:
            out = router_topk(equal, 3, scoring="sigmoid", num_groups=4, topk_groups=2, group_score=group_score)
            assert torch.equal(out.indices, torch.tensor([[0, 1, 2]] * 2, dtype=torch.int32)), group_score
            out = router_topk(levels, 4, scoring="sigmoid", num_groups=4, topk_groups=2, group_score=group_score)
            assert torch.equal(out.indices, torch.tensor([[0, 4, 1, 3]] * 2, dtype=torch.int32)), group_score
        # The topk_softmax weights of tied logits are equal.
        out = router_topk(equal, 4, scoring="topk_softmax")
        assert torch.equal(out.indices, torch.tensor([[0, 1, 2, 3]] * 2, dtype=torch.int32))
        assert torch.equal(out.weights, torch.full((2, 4), 0.25))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_routing_modes_on_non_finite_rows(backend):
    nan, inf = float("nan"), float("inf")
    logits = torch.randn(5, 160)
    logits[1, 3] = nan
    logits[2, 0] = inf
    logits[3] = -inf
    logits[4, :20] = nan  # a whole group of NaN keys: the group ranks last
    bad = torch.tensor([False, True, True, True, True])
    bias = torch.randn(160)
    for name, e, k, kwargs in MODE_CASES:
        if e != 160:
            continue
        kwargs = dict(kwargs, bias=bias) if kwargs.get("bias") else kwargs
        with running(backend, *OPS_UNDER_TEST):
            out = router_topk(logits, k, **kwargs)
        assert out.weights[bad].isnan().all() and out.weights[~bad].isfinite().all(), name
        assert torch.equal(out.indices, _reference(logits, k, kwargs)[1]), name
        assert ((out.indices >= 0) & (out.indices < 160)).all() and int(out.counts.sum()) == 5 * k, name
        if kwargs.get("num_groups", 1) > 1 and kwargs["scoring"] != "softmax":  # a NaN makes every softmax score NaN
            assert not (out.indices[4] < 20).any(), f"{name}: the NaN group is never kept"


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_routing_modes_with_strided_logits(backend):
    base = torch.randn(17, 256) * 2
    bias = torch.randn(256) * 0.5
    with running(backend, *OPS_UNDER_TEST):
        for name, e, k, kwargs in MODE_CASES:
            if e != 256:
                continue
            kwargs = dict(kwargs, bias=bias) if kwargs.get("bias") else kwargs
            _compare(router_topk(strided(base), k, **kwargs), base, k, f"{backend} {name} strided", **kwargs)
            _compare(router_topk(base.t().contiguous().t(), k, **kwargs), base, k, f"{backend} {name} column-major",
                     **kwargs)


@pytest.mark.parametrize("name, e, k, kwargs", MODE_CASES, ids=MODE_IDS)
def test_routing_modes_backward_matches_reference_autograd(kernel, name, e, k, kwargs):
    kwargs = _mode_kwargs(e, kwargs)
    logits = (torch.randn(33, e) * 2).requires_grad_()
    grads = _loss_weights(33, e, k)
    _surrogate(router_topk(logits, k, **kwargs), *grads).backward()
    _check_grad(logits.grad, logits, k, kwargs, lambda out: _surrogate(out, *grads), f"{kernel} {name} grad_logits")


@pytest.mark.parametrize("renormalize", [True, False])
def test_sigmoid_backward_through_the_weights_alone(kernel, renormalize):
    """A loss of the weights alone (no load-balancing or z loss): the sigmoid gradient is zero off
    the chosen experts, which the CPU kernel computes from their k scores alone. Rows with a -inf
    logit, rows whose chosen scores underflow (renormalised as the softmax of the chosen logits),
    and a NaN row, whose gradient stays NaN as with the losses."""
    logits = torch.randn(300, 64) * 2
    logits[3, 5] = float("-inf")
    logits[7] -= 120
    logits[11, 9] = float("nan")
    kwargs = dict(scoring="sigmoid", renormalize=renormalize, bias=torch.randn(64) * 0.1, num_groups=8,
                  topk_groups=4, scaling_factor=2.5)
    grad_weights = torch.randn(300, 8)
    x = logits.clone().requires_grad_()
    (router_topk(x, 8, **kwargs).weights * grad_weights).sum().backward()
    assert x.grad[11].isnan().all() and x.grad[torch.arange(300) != 11].isfinite().all()
    finite = torch.cat([logits[:11], logits[12:]])
    grad = torch.cat([x.grad[:11], x.grad[12:]])
    _check_grad(grad, finite, 8, kwargs, lambda out: (out.weights * torch.cat([grad_weights[:11], grad_weights[12:]]))
                .sum(), f"{kernel} weights-only grad_logits")
    chosen = torch.zeros_like(grad, dtype=torch.bool).scatter_(1, router_topk(finite, 8, **kwargs).indices.long(), True)
    assert (grad[~chosen] == 0).all(), "a gradient off the chosen experts"


@pytest.mark.parametrize("scoring", ["topk_softmax", "sigmoid"])
def test_routing_modes_reference_gradcheck_float64(scoring):
    logits = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12)

    def differentiable_outputs(x):
        weights, _, _, prob_sums, lse = reference.router_topk(x, 3, scoring, True, bias, "scores", 4, 2, "top2_sum",
                                                              2.5)
        return weights, prob_sums, lse

    assert torch.autograd.gradcheck(differentiable_outputs, (logits,))


@pytest.mark.parametrize("scoring", ["topk_softmax", "sigmoid"])
def test_cpu_kernel_routing_modes_gradcheck_float64(scoring):
    logits = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12)

    def differentiable_outputs(x):
        weights, _, _, prob_sums, lse = torch.ops.astrea.router_topk(x, 3, scoring, True, bias, "extension",
                                                                     "scores", 4, 2, "top2_sum", 2.5)
        return weights, prob_sums, lse

    with running("cpu", *OPS_UNDER_TEST):
        assert torch.autograd.gradcheck(differentiable_outputs, (logits,))


def test_torch_compile_fullgraph_grouped():
    def step(x, bias):
        out = router_topk(x, 8, scoring="sigmoid", bias=bias, num_groups=8, topk_groups=4, scaling_factor=2.5)
        return out.weights, out.indices, load_balancing_loss(out)

    logits = torch.randn(17, 256, requires_grad=True)
    bias = torch.randn(256) * 0.5
    weights, indices, loss = torch.compile(step, fullgraph=True)(logits, bias)
    (weights.square().sum() + loss).backward()
    expected = step(logits.detach(), bias)
    # The compiled graph runs the same kernel on the same logits: the same bits.
    assert torch.equal(indices, expected[1]) and torch.equal(weights, expected[0])
    options = dict(scoring="sigmoid", bias=bias, num_groups=8, topk_groups=4, scaling_factor=2.5)
    _check_grad(logits.grad, logits, 8, options, lambda out: out.weights.square().sum() + load_balancing_loss(out),
                "compiled grad_logits")


# ---- renormalisation where the scores underflow ---------------------------------------------------

# (name, options): sigmoid scores of logits near -100 and -1000 round to 0 in fp32, with or
# without a bias (on the scores, with a scaling factor; on the logits); softmax scores
# underflow where a bias on the logits picks experts far below the row's best.
UNDERFLOW_MODES = [
    ("sigmoid", dict(scoring="sigmoid")),
    ("sigmoid-bias-scaled", dict(scoring="sigmoid", bias="scores", scaling_factor=2.5)),
    ("sigmoid-bias-on-logits", dict(scoring="sigmoid", bias="logits")),
    ("softmax-bias-on-logits", dict(scoring="softmax", bias="logits")),
]
UNDERFLOW_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _underflow_case(options: dict, dtype: torch.dtype):
    """(logits [10, 8], router_topk's options, the rows whose lse is NaN): rows of logits near -100,
    near -1000, both, one near -100 among -inf (k = 3 chooses two -inf), one NaN, and ordinary
    rows between them (a kernel block mixes both kinds). For softmax, expert 0 holds the row's
    maximum, 0, and a NaN bias keeps it from being chosen (NaN keys rank last); for sigmoid with
    a bias, expert 0 has the largest, so that row 7 keeps its finite logit."""
    inf = float("inf")
    logits = torch.randn(10, 8)
    logits[0:3] -= 100
    logits[4:6] = logits[4:6] * 3 - 1000
    logits[6, ::2] -= 100
    logits[6, 1::2] = logits[6, 1::2] * 3 - 1000
    logits[7, 0] -= 100
    logits[7, 1:] = -inf
    logits[8, 2] = float("nan")
    options = dict(options)
    bias_on = options.pop("bias", None)
    if options["scoring"] == "softmax":
        logits[7, 1] = logits[7, 0]
        logits[[0, 1, 2, 4, 5, 6, 7], 0] = 0.0
        bias = torch.zeros(8)
        bias[0] = float("nan")
    else:
        bias = torch.randn(8) * 0.5
        bias[0] = bias.max() + 1
    if bias_on:
        options.update(bias=bias, bias_on=bias_on)
    return logits.to(dtype), options, torch.arange(10) == 8


def _log_space_outputs(x: torch.Tensor, indices: torch.Tensor, options: dict):
    """(weights, prob_sums, lse) by the log-space formula, in x's dtype: the renormalised weights
    exp(log v_j - logsumexp_i log v_i) of the chosen scores, log v = logsigmoid(x) or log_softmax(x),
    then scaled."""
    chosen = indices.long()
    if options["scoring"] == "sigmoid":
        log_scores, scores = torch.nn.functional.logsigmoid(x), torch.sigmoid(x)
    else:
        log_scores, scores = torch.log_softmax(x, 1), torch.softmax(x, 1)
    weights = torch.softmax(log_scores.gather(1, chosen), 1) * options.get("scaling_factor", 1.0)
    return weights, scores.sum(0), torch.logsumexp(x, 1)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's sigmoid
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # its NaN row
@pytest.mark.parametrize("dtype", UNDERFLOW_DTYPES, ids=str)
@pytest.mark.parametrize("name, options", UNDERFLOW_MODES, ids=[m[0] for m in UNDERFLOW_MODES])
@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_renormalised_weights_where_the_scores_underflow(backend, name, options, dtype):
    """Finite weights and gradients in rows whose chosen scores all round to 0 in fp32 (and in
    the ordinary rows beside them), against the float64 log-space formula on the same chosen
    experts, within 4x the error of PyTorch's own fp32 computation of that formula (the logits
    are scored in fp32 whatever their dtype); the NaN row keeps NaN weights."""
    logits, options, nan_rows = _underflow_case(options, dtype)
    k = 3
    x = logits.clone().requires_grad_()
    with running(backend, *OPS_UNDER_TEST):
        out = router_topk(x, k, **options)
    assert torch.equal(out.indices, _reference(logits, k, options)[1]), "indices"
    assert out.weights[nan_rows].isnan().all() and out.lse[nan_rows].isnan().all()
    rows = ~nan_rows
    x64 = logits[rows].double().requires_grad_()
    x32 = logits[rows].float().requires_grad_()
    truth = _log_space_outputs(x64, out.indices[rows], options)
    own = _log_space_outputs(x32, out.indices[rows], options)
    assert own[0].isfinite().all()
    assert_within_torch_error(out.weights[rows], truth[0], own[0], what=f"{backend} {name} {dtype} weights")
    _assert_row_sums(out.weights[rows], options.get("scaling_factor", 1.0), f"{backend} {name} {dtype} row sums")

    # Backward, the NaN row apart: finite and within PyTorch's own error of the log-space formula.
    grads = _loss_weights(rows.sum().item(), 8, k)
    weights, _, _, prob_sums, lse = out
    surrogate = ((weights[rows] * grads[0]).sum() + (prob_sums * grads[1]).sum() + (lse[rows] * grads[2]).sum())
    grad = torch.autograd.grad(surrogate, x)[0][rows]
    assert grad.dtype == dtype and grad.isfinite().all(), f"{backend} {name} {dtype} grad_logits"

    def surrogate_of(outputs, prob_sum_grads):
        return sum((t * g).sum() for t, g in zip(outputs, (grads[0], prob_sum_grads, grads[2])))

    # prob_sums adds the rows' scores, so each row's gradient through it is its own: the formula
    # on the finite rows alone gives their gradients, whatever the NaN row adds to prob_sums.
    grad64 = torch.autograd.grad(surrogate_of(truth, grads[1].double()), x64)[0]
    torch_grad = torch.autograd.grad(surrogate_of(own, grads[1]), x32)[0].to(dtype)
    assert_within_torch_error(grad, grad64, torch_grad, what=f"{backend} {name} {dtype} grad_logits")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's sigmoid
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # and its 0 / 0
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_renormalising_only_minus_inf_chosen_logits_gives_nan(backend, scoring):
    """A bias may choose only experts of logit -inf in a finite row: no chosen expert has a
    positive score, so the renormalised weights are 0 / 0, NaN (the indices stay valid);
    without renormalisation they are the scores, 0."""
    inf = float("inf")
    logits = torch.tensor([[0.0, -inf, -inf, -inf], [0.0, -100.0, -inf, 1.0]])
    bias = torch.tensor([-10.0, 0.0, 0.0, -10.0])  # on the scores: experts 1 and 2 win
    with running(backend, *OPS_UNDER_TEST):
        out = router_topk(logits, 2, scoring=scoring, bias=bias)
        raw = router_topk(logits, 2, scoring=scoring, renormalize=False, bias=bias)
    assert torch.equal(out.indices, torch.tensor([[1, 2], [1, 2]], dtype=torch.int32))
    assert out.weights[0].isnan().all() and out.lse.isfinite().all()
    assert torch.equal(out.weights[1], torch.tensor([1.0, 0.0])), "softmax of [-100, -inf]"
    assert torch.equal(raw.weights[0], torch.zeros(2))


# ---- losses -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_losses_match_their_formulas_and_are_differentiable(backend):
    logits = torch.randn(17, 7, requires_grad=True)
    with running(backend, *OPS_UNDER_TEST):
        out = router_topk(logits, 2)
        aux, z = load_balancing_loss(out), router_z_loss(out)
    chosen = torch.zeros(7).index_add_(0, out.indices.flatten().long(), torch.ones(34))

    def losses(x):  # the formulas, by PyTorch in x's dtype
        aux = 7 * ((chosen.to(x.dtype) / 34) * torch.softmax(x, 1).mean(0)).sum()
        return aux, torch.logsumexp(x, 1).square().mean()

    logits64 = logits.detach().double().requires_grad_()
    expected_aux, expected_z = losses(logits)
    aux64, z64 = losses(logits64)
    assert_within_torch_error(aux, aux64, expected_aux, what="aux loss")
    assert_within_torch_error(z, z64, expected_z, what="z loss")
    (aux + z).backward()
    expected_grad = torch.autograd.grad(expected_aux + expected_z, logits)[0]
    assert_within_torch_error(logits.grad, torch.autograd.grad(aux64 + z64, logits64)[0], expected_grad,
                              what="grad of aux + z")


def test_balancing_loss_is_one_when_balanced_and_takes_global_token_count():
    # Every quantity is a power of two (fractions 2 / (4 * 2), mean scores 1 / 4, their products,
    # the sum of 4 of them, times E = 4): each fp32 step is exact, and so is the loss.
    out = RouterOutput(weights=torch.full((4, 2), 0.5), indices=torch.zeros(4, 2, dtype=torch.int32),
                       counts=torch.full((4,), 2, dtype=torch.int32), prob_sums=torch.ones(4), lse=torch.zeros(4))
    assert load_balancing_loss(out).item() == 1.0
    # counts and sums all-reduced over 2 ranks of 4 tokens: the same balance, as exactly.
    doubled = out._replace(counts=out.counts * 2, prob_sums=out.prob_sums * 2)
    assert load_balancing_loss(doubled, num_tokens=8).item() == 1.0
    with pytest.raises(TypeError, match="load_balancing_loss: out"):
        load_balancing_loss(tuple(out))


# ---- registration -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_opcheck(backend):
    logits = torch.randn(17, 7, requires_grad=True)
    logits24 = torch.randn(5, 24, requires_grad=True)
    impl = CHOICE_OF[backend]
    with running(backend, *OPS_UNDER_TEST):
        for args, options in [((logits, 2, "softmax", True, None), ()),
                              ((logits, 3, "sigmoid", False, torch.randn(7)), ()),
                              ((logits24, 4, "sigmoid", True, torch.randn(24)), ("scores", 6, 2, "top2_sum", 2.5)),
                              ((logits24, 3, "topk_softmax", True, torch.randn(24)), ("logits", 4, 1, "max", 1.0))]:
            torch.library.opcheck(torch.ops.astrea.router_topk.default, (*args, impl, *options))
            if backend == "cpu":  # the C++ kernel's own schema, with its fake
                torch.library.opcheck(torch.ops.astrea.router_topk_cpu.default,
                                      (args[0].detach(), *args[1:], *options))
        out = router_topk(logits.detach(), 2)
        grads = [g.contiguous() for g in _loss_weights(17, 7, 2)]
        backward_args = (logits.detach(), out.indices, out.lse, *grads, "softmax", True)
        torch.library.opcheck(torch.ops.astrea.router_topk_backward.default, (*backward_args, impl, 0.5))
        if backend == "cpu":
            torch.library.opcheck(torch.ops.astrea.router_topk_backward_cpu.default, (*backward_args, 0.5))


def test_torch_compile_fullgraph_cpu():
    def step(x, bias):
        out = router_topk(x, 2, scoring="sigmoid", bias=bias)
        return out.weights, out.indices, load_balancing_loss(out) + router_z_loss(out)

    logits = torch.randn(17, 7, requires_grad=True)
    bias = torch.randn(7)
    compiled = torch.compile(step, fullgraph=True)
    weights, indices, loss = compiled(logits, bias)
    (weights.sum() + loss).backward()
    expected = step(logits.detach(), bias)
    # The compiled graph runs the same kernel on the same logits: the same bits.
    assert torch.equal(indices, expected[1]) and torch.equal(weights, expected[0])
    _check_grad(logits.grad, logits, 2, dict(scoring="sigmoid", bias=bias),
                lambda out: out.weights.sum() + load_balancing_loss(out) + router_z_loss(out), "compiled grad_logits")


# ---- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(k=8), ValueError, r"router_topk: k must be in \[1, 7\]; got 8"),
    (dict(k=0), ValueError, r"router_topk: k must be in \[1, 7\]; got 0"),
    (dict(k=2.0), TypeError, "router_topk: k must be an int"),
    (dict(logits=torch.randn(7)), ValueError, r"router_topk: logits must be 2-D; got shape \(7,\)"),
    (dict(logits=torch.randn(2, 3, 7)), ValueError, "router_topk: logits must be 2-D"),
    (dict(logits=torch.ones(4, 7, dtype=torch.int64)), TypeError, "router_topk: logits must have dtype"),
    (dict(bias=torch.zeros(6)), ValueError, r"router_topk: bias.shape\[0\] must equal .* = 7; got shape \(6,\)"),
    (dict(bias=torch.zeros(7, dtype=torch.int32)), TypeError, "router_topk: bias must have dtype"),
    (dict(bias=torch.zeros(1, 7)), ValueError, "router_topk: bias must be 1-D"),
    (dict(scoring="relu"), ValueError,
     "router_topk: scoring must be one of 'softmax', 'sigmoid', 'topk_softmax'; got 'relu'"),
    (dict(renormalize=1), TypeError, "router_topk: renormalize must be a bool"),
    (dict(bias_on="experts"), ValueError, "router_topk: bias_on must be one of 'scores', 'logits'; got 'experts'"),
    (dict(num_groups=3, topk_groups=1), ValueError,
     r"router_topk: num_groups must divide the number of experts logits.shape\[1\] = 8; got 3"),
    (dict(num_groups=4), ValueError, "router_topk: topk_groups is required with num_groups=4"),
    (dict(num_groups=4, topk_groups=5), ValueError, r"router_topk: topk_groups must be in \[1, 4\]; got 5"),
    (dict(topk_groups=2), ValueError, "router_topk: topk_groups=2 needs num_groups > 1"),
    (dict(num_groups=8, topk_groups=2), ValueError, "router_topk: group_score='top2_sum' needs groups of >= 2"),
    (dict(num_groups=4, topk_groups=1, k=3), ValueError,
     r"router_topk: k must be <= topk_groups \* experts per group = 1 \* 2; got 3"),
    (dict(group_score="mean", num_groups=2, topk_groups=1), ValueError,
     "router_topk: group_score must be one of 'top2_sum', 'max'; got 'mean'"),
    (dict(scaling_factor="2"), TypeError, "router_topk: scaling_factor must be a float, got str"),
    (dict(scaling_factor=float("inf")), ValueError, "router_topk: scaling_factor must be finite; got inf"),
])
def test_bad_inputs_raise_naming_the_argument(kwargs, error, match):
    experts = 8 if {"num_groups", "topk_groups", "group_score"} & kwargs.keys() else 7
    args = dict(logits=torch.randn(4, experts), k=2) | kwargs
    with pytest.raises(error, match=match):
        router_topk(args.pop("logits"), args.pop("k"), **args)


def test_cpu_kernel_checks_direct_calls():
    """torch.ops.astrea.router_topk_cpu / _backward_cpu skip the Python checks: theirs name the argument."""
    logits = torch.randn(4, 7)
    forward = torch.ops.astrea.router_topk_cpu
    with pytest.raises(ValueError, match=r"router_topk: k must be in \[1, 7\], got 8"):
        forward(logits, 8, "softmax", True, None)
    with pytest.raises(ValueError,
                       match="router_topk: scoring must be 'softmax', 'sigmoid' or 'topk_softmax', got 'relu'"):
        forward(logits, 2, "relu", True, None)
    with pytest.raises(ValueError, match=r"router_topk: bias must be \[7\], got \[6\]"):
        forward(logits, 2, "softmax", True, torch.zeros(6))
    with pytest.raises(ValueError, match="router_topk: num_groups must divide the 7 experts, got 2"):
        forward(logits, 2, "softmax", True, None, num_groups=2)
    with pytest.raises(ValueError, match=r"router_topk: topk_groups must be in \[1, 1\], got 2"):
        forward(logits, 2, "softmax", True, None, topk_groups=2)
    with pytest.raises(ValueError, match="router_topk: bias_on must be 'scores' or 'logits', got 'x'"):
        forward(logits, 2, "softmax", True, None, bias_on="x")
    with pytest.raises(TypeError, match="router_topk: logits must be floating"):
        forward(logits.long(), 2, "softmax", True, None)
    out = forward(logits, 2, "softmax", True, None)
    grads = (torch.zeros(4, 2), torch.zeros(7), torch.zeros(4))
    backward = torch.ops.astrea.router_topk_backward_cpu
    bad_indices = out[1].clone()
    bad_indices[3, 1] = 7
    with pytest.raises(ValueError, match=r"router_topk_backward: indices\[3, 1\] = 7 is outside \[0, 7\)"):
        backward(logits, bad_indices, out[4], *grads, "softmax", True)
    with pytest.raises(TypeError, match="router_topk_backward: grad_weights must be Double"):
        backward(logits.double(), out[1], out[4].double(), grads[0], *(g.double() for g in grads[1:]), "softmax",
                 True)
    with pytest.raises(ValueError, match=r"router_topk_backward: grad_lse must have shape \[4\], got \[3\]"):
        backward(logits, out[1], out[4], *grads[:2], torch.zeros(3), "softmax", True)


# ---- module -------------------------------------------------------------------------------------


def test_top_k_router_module():
    router = TopKRouter(16, 7, 2, jitter=0.1, bias_update_rate=0.01)
    x = torch.randn(3, 5, 16)
    result = router(x)
    assert isinstance(result, RouterResult)
    assert result.logits.shape == (15, 7) and result.weights.shape == (15, 2) and result.indices.shape == (15, 2)
    assert result.aux_loss.ndim == 0 and result.z_loss.ndim == 0
    (result.weights.sum() + result.aux_loss + result.z_loss).backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0

    router.eval()
    first, second = router(x), router(x)
    assert torch.equal(first.logits, second.logits), "no jitter in eval"
    assert torch.equal(first.logits, router.gate(x.reshape(-1, 16)))
    router.train()
    assert not torch.equal(router(x).logits, first.logits), "jitter in training"

    # Aux-loss-free balancing: overloaded experts' bias falls, underloaded ones' rises.
    counts = first.counts
    router.update_expert_bias(counts)
    load = counts.float()
    assert torch.equal(router.expert_bias, 0.01 * torch.sign(load.mean() - load))
    assert "expert_bias" in router.state_dict()
    with pytest.raises(RuntimeError, match="bias_update_rate > 0"):
        TopKRouter(16, 7, 2).update_expert_bias(counts)
    with pytest.raises(ValueError, match="TopKRouter: k must be in"):
        TopKRouter(16, 7, 8)


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_top_k_router_under_bf16_autocast(backend):
    router = TopKRouter(16, 60, 6)
    x = torch.randn(17, 16)
    with running(backend, *OPS_UNDER_TEST), torch.autocast("cpu", dtype=torch.bfloat16):
        result = router(x)
    assert result.logits.dtype == torch.bfloat16 and result.weights.dtype == torch.float32
    _compare((result.weights, result.indices, result.counts, result.prob_sums, torch.logsumexp(
        result.logits.float(), 1)), result.logits.float(), 6, f"{backend} autocast")
    (result.weights.square().sum() + result.aux_loss + result.z_loss).backward()
    assert router.gate.weight.grad.dtype == torch.float32 and router.gate.weight.grad.isfinite().all()
