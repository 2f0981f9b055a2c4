"""Stochastic residual, dense weighted combine, their fused op and the modules around them.

Kernels run in fp32 under the Triton interpreter (fixture ``kernels``); the tests of the
fixture ``kernel_impl`` also run the C++ CPU kernels of astrea._C, which the auto backend
picks for CPU tensors. The reference is the truth: it repeats Triton's Philox bit
for bit.

Tolerances are derived: the residual is fp32 math rounded once, compared bit for bit; the
combine and its gradients are sums, within :func:`tests.utils.accumulation_bound` of a float64
oracle for the roundings on each element's path, with the sums of |terms| that the same
formula gives on |inputs|.
"""

import math

import pytest
import torch

import astrea
from astrea import _backend, _extension, reference
from astrea.nn import AdaptiveWeightAllocator, StochasticResidual
from astrea.reference import dense_combine as combine_ref
from astrea.reference import residual as residual_ref
from tests.utils import (CHOICE_OF, KERNELS, accumulation_bound, assert_within, assert_within_torch_error,
                         float64_leaves, running, strided)

DIMS = (1, 33, 4096)
OPS_UNDER_TEST = ("dense_weighted_combine", "stochastic_residual", "combine_residual")
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _require_cpu_kernels():
    missing = [op for op in OPS_UNDER_TEST if not _extension.has_kernel(_backend.OPS[op].cpu_kernel, "CPU")]
    if missing:
        pytest.skip(f"astrea._C is not built with the CPU kernels of {missing}")


@pytest.fixture(params=KERNELS)
def kernel_impl(request):
    """Runs the test on each kernel in turn: Triton and the C++ CPU kernels."""
    with running(request.param, *OPS_UNDER_TEST):
        yield request.param


def _cpu_kernel(base, branch, p, *, seed, offset=0, granularity="token", training=True):
    """The C++ kernel called directly (any floating dtype, float64 included)."""
    _require_cpu_kernels()
    return torch.ops.astrea.stochastic_residual_cpu(base, branch, p, seed, offset, granularity, training)


def _mask_of(out: torch.Tensor) -> torch.Tensor:
    """Keep mask of ``stochastic_residual(0, 1, p)``: nonzero rows were kept."""
    return (out != 0).all(-1, keepdim=True)


def _experts(E, B, T, D, dtype=torch.float32, layout="list"):
    stacked = torch.randn(E, B, T, D, dtype=dtype)
    if layout == "stacked":
        return stacked
    if layout == "strided":
        return [strided(y) for y in stacked]
    return list(stacked.clone())


def _weights(B, E):
    weights = torch.rand(B, E)
    weights[0, 1 % E] = 0.0  # a skipped expert
    return weights


def _wide(experts, weights, scale, magnitude=False):
    """The combine's inputs as float64 leaves (their magnitudes when ``magnitude``), in their layout."""
    if isinstance(experts, torch.Tensor):
        ys = float64_leaves(experts, magnitude=magnitude)[0]
    else:
        ys = float64_leaves(*experts, magnitude=magnitude)
    return ys, *float64_leaves(weights, scale, magnitude=magnitude)


def _assert_dense_combine_within_bound(out, experts, weights, scale=None, what="combine"):
    """``out`` within the accumulation bound of the combine in float64: w * s rounded, then E
    products summed in fp32 (E + 1 roundings), rounded to the dtype."""
    expected = reference.dense_weighted_combine(*_wide(experts, weights, scale))
    terms = reference.dense_weighted_combine(*_wide(experts, weights, scale, magnitude=True))
    assert_within(out, expected, accumulation_bound(terms, weights.shape[1] + 1, expected, out.dtype), what=what)


# ---- stochastic residual -------------------------------------------------------------------


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("granularity", ["token", "sample"])
def test_kernel_mask_equals_reference_mask(kernel_impl, D, granularity):
    shape = (3, 5, D)
    out = astrea.ops.stochastic_residual(torch.zeros(shape), torch.ones(shape), 0.5, seed=1234, offset=7,
                                         granularity=granularity)
    expected = residual_ref.keep_mask(shape, 0.5, seed=1234, offset=7, granularity=granularity)
    assert torch.equal(_mask_of(out), expected)
    assert 0 < int(expected.sum()) < expected.numel()


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("granularity", ["token", "sample"])
@pytest.mark.parametrize("training, p", [(True, 0.7), (True, 1.0), (False, 0.3)])
def test_stochastic_residual_kernel_matches_reference(kernel_impl, D, granularity, training, p):
    y, r = torch.randn(2, 3, D), torch.randn(2, 3, D)
    out = astrea.ops.stochastic_residual(strided(y), strided(r), p, seed=2**40 + 3, offset=11,
                                         granularity=granularity, training=training)
    expected = reference.stochastic_residual(y, r, p, seed=2**40 + 3, offset=11, granularity=granularity,
                                             training=training)
    assert torch.equal(out, expected)


def test_p_one_and_eval_are_exactly_y_plus_r(kernel_impl):
    y, r = torch.randn(4, 33), torch.randn(4, 33)
    assert torch.equal(astrea.ops.stochastic_residual(y, r, 1.0, seed=5), y + r)
    assert torch.equal(astrea.ops.stochastic_residual(y, r, 0.2, seed=5, training=False), y + r)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_fp32_math_rounded_once(impl, dtype):
    y, r = torch.randn(3, 7, 33).to(dtype), torch.randn(3, 7, 33).to(dtype)
    with running(impl, *OPS_UNDER_TEST):
        out = astrea.ops.stochastic_residual(y, r, 0.6, seed=9)
    wide = reference.stochastic_residual(y.float(), r.float(), 0.6, seed=9)
    assert out.dtype == dtype
    assert torch.equal(out, wide.to(dtype))


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``x`` (tells -0.0 from +0.0, unlike torch.equal)."""
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("granularity", ["token", "sample"])
@pytest.mark.parametrize("training, p", [(True, 0.3), (True, 1.0), (False, 0.3)])
def test_cpu_kernel_is_the_reference_bit_for_bit(dtype, granularity, training, p):
    y, r = torch.randn(5, 3, 67).to(dtype), (torch.randn(5, 3, 67) * 100).to(dtype)
    y[:, :, :4] = -0.0  # a dropped row adds +0: -0.0 becomes +0.0, as in the reference
    draw = {"seed": 2**33 + 5, "offset": 2**32 - 7, "granularity": granularity, "training": training}
    out = _cpu_kernel(strided(y), strided(r), p, **draw)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(_bits(out), _bits(reference.stochastic_residual(y, r, p, **draw)))
    grad_r = _cpu_kernel(None, strided(r), p, **draw)
    expected = residual_ref.stochastic_residual_backward(r, p, **draw).to(dtype)
    assert torch.equal(_bits(grad_r), _bits(expected))


# (seed, offset): seeds past 2**32 fill both key words; the offsets carry from the low into
# the high counter word (past 2**32, and below 2**63 - 1 where the high word is 0x7fffffff).
PHILOX_CASES = [(0, 0), (1234, 2**32 - 50_000), (2**32 + 7, 2**40 + 3), (2**63 - 1, 2**63 - 2**32 - 50_000),
                (2**47 + 11, 2**63 - 1 - 100_000)]


@pytest.mark.parametrize("seed, offset", PHILOX_CASES)
def test_cpu_kernel_mask_is_the_reference_mask_over_many_units(seed, offset):
    units = 100_000
    ones = torch.ones(units, 1)
    for p in (0.5, 0.8437, 0.0123):
        kept = _cpu_kernel(None, ones, p, seed=seed, offset=offset) != 0
        expected = residual_ref.keep_mask(ones.shape, p, seed=seed, offset=offset)
        assert torch.equal(kept, expected), f"p = {p}: {int((kept != expected).sum())} units differ"


@pytest.mark.parametrize("kwargs, error, match", [
    ({"base": torch.randn(2, 4)}, ValueError, r"the base must have the branch's shape \[2, 3\], got \[2, 4\]"),
    ({"base": torch.randn(2, 3).half()}, TypeError, "the base must have the branch's dtype Float, got Half"),
    ({"branch": torch.randn(3)}, ValueError, r"the branch must be \[B, \.\.\., D\] \(at least 2-D\), got shape \[3\]"),
    ({"branch": torch.ones(2, 3, dtype=torch.int32)}, TypeError, "the branch must be a floating tensor, got Int"),
    ({"p": 0.0}, ValueError, r"p \(the keep probability\) must be in \(0, 1\], got 0"),
    ({"seed": -1}, ValueError, "seed and offset must be >= 0, got -1 and 0"),
    ({"granularity": "row"}, ValueError, "granularity must be 'token' or 'sample', got 'row'"),
])
def test_cpu_kernel_rejects_bad_arguments(kwargs, error, match):
    args = {"base": None, "branch": torch.randn(2, 3), "p": 0.5, "seed": 0, **kwargs}
    with pytest.raises(error, match="stochastic_residual: " + match):
        _cpu_kernel(args.pop("base"), args.pop("branch"), args.pop("p"), **args)


def test_same_seed_reproduces_and_seeds_or_offsets_differ(kernel_impl):
    y, r = torch.randn(64, 8), torch.randn(64, 8)
    first = astrea.ops.stochastic_residual(y, r, 0.5, seed=3)
    assert torch.equal(first, astrea.ops.stochastic_residual(y, r, 0.5, seed=3))
    assert not torch.equal(first, astrea.ops.stochastic_residual(y, r, 0.5, seed=4))
    assert not torch.equal(first, astrea.ops.stochastic_residual(y, r, 0.5, seed=3, offset=64))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_four_standard_errors(kernel_impl, p):
    n = 100_000
    out = astrea.ops.stochastic_residual(torch.zeros(n, 1), torch.ones(n, 1), p, seed=77)
    rate = _mask_of(out).double().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(out[out != 0], torch.full_like(out[out != 0], 1 / p))


@pytest.mark.parametrize("granularity", ["token", "sample"])
def test_gradients_are_identity_and_mask_over_p(kernel_impl, granularity):
    y = torch.randn(3, 4, 33, requires_grad=True)
    r = torch.randn(3, 4, 33, requires_grad=True)
    grad = torch.randn(3, 4, 33)
    out = astrea.ops.stochastic_residual(y, r, 0.4, seed=21, offset=2, granularity=granularity)
    grad_y, grad_r = torch.autograd.grad(out, (y, r), grad)
    keep = residual_ref.keep_mask(y.shape, 0.4, seed=21, offset=2, granularity=granularity)
    assert torch.equal(grad_y, grad)
    assert torch.equal(grad_r, torch.where(keep, grad * residual_ref.keep_scale(0.4, torch.float32, "cpu"), 0.0))
    if granularity == "sample":
        assert torch.equal(keep, keep[:, :1].expand_as(keep))


@pytest.mark.parametrize("granularity", ["token", "sample"])
def test_mask_does_not_depend_on_batch_size_or_block_size(kernel_impl, granularity):
    from astrea.kernels.residual import launch_stochastic_residual

    y, r = torch.zeros(6, 4, 33), torch.ones(6, 4, 33)
    full = astrea.ops.stochastic_residual(y, r, 0.5, seed=8, granularity=granularity)
    prefix = astrea.ops.stochastic_residual(y[:2], r[:2], 0.5, seed=8, granularity=granularity)
    assert torch.equal(full[:2], prefix)
    rows_per_unit = 4 if granularity == "sample" else 1
    for block_rows, block_d in [(4, 16), (8, 64)]:  # the default is one 32x64 block
        out = torch.empty(24, 33)
        launch_stochastic_residual(out, y.view(24, 33), r.view(24, 33), seed=8, offset=0, keep_p=0.5, inv_p=2.0,
                                   rows_per_unit=rows_per_unit, stochastic=True, block_rows=block_rows,
                                   block_d=block_d)
        assert torch.equal(out.view(6, 4, 33), full)


def test_residual_reference_gradcheck_float64():
    y = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, r: reference.stochastic_residual(y, r, 0.5, seed=1), (y, r))
    grad = torch.randn(3, 2, 5, dtype=torch.float64)
    out = reference.stochastic_residual(y, r, 0.5, seed=1)
    _, grad_r = torch.autograd.grad(out, (y, r), grad)
    assert torch.equal(grad_r, residual_ref.stochastic_residual_backward(grad, 0.5, seed=1))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"p": 0.0}, ValueError, r"p \(the keep probability\) must be in \(0, 1\]; got 0.0"),
    ({"p": 1.5}, ValueError, "must be in"),
    ({"p": float("nan")}, ValueError, "must be in"),
    ({"p": "half"}, TypeError, "p must be a float"),
    ({"seed": -1}, ValueError, "seed must be in"),
    ({"seed": 1.5}, TypeError, "seed must be an int"),
    ({"granularity": "row"}, ValueError, "granularity must be one of"),
    ({"r": torch.randn(2, 4)}, ValueError, r"r must have the shape of y \(2, 3\); got \(2, 4\)"),
    ({"r": torch.randn(2, 3, dtype=torch.float16)}, TypeError, "r must have the dtype of y"),
    ({"y": torch.randn(3), "r": torch.randn(3)}, ValueError, "at least 2-D"),
    ({"y": torch.ones(2, 3, dtype=torch.int32)}, TypeError, "y must have dtype"),
])
def test_stochastic_residual_rejects_bad_inputs(kwargs, error, match):
    args = {"y": torch.randn(2, 3), "r": torch.randn(2, 3), "p": 0.5, "seed": 0, **kwargs}
    with pytest.raises(error, match=match):
        astrea.ops.stochastic_residual(args.pop("y"), args.pop("r"), args.pop("p"), **args)


# ---- dense weighted combine ----------------------------------------------------------------


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("layout", ["list", "stacked", "strided"])
def test_dense_combine_kernel_matches_reference(kernel_impl, D, layout):
    experts = _experts(3, 2, 3, D, layout=layout)
    weights, scale = _weights(2, 3), torch.rand(3) + 0.5
    out = astrea.ops.dense_weighted_combine(experts, weights, scale)
    _assert_dense_combine_within_bound(out, experts, weights, scale)
    _assert_dense_combine_within_bound(astrea.ops.dense_weighted_combine(experts, weights), experts, weights,
                                       what="combine without scale")


def test_dense_combine_four_dims_and_low_precision():
    experts = _experts(4, 2, 3, 33, dtype=torch.bfloat16, layout="stacked").reshape(4, 2, 3, 1, 33)
    weights = _weights(2, 4)
    out = astrea.ops.dense_weighted_combine(experts, weights)
    wide = reference.dense_weighted_combine(experts.float(), weights)
    assert out.shape == (2, 3, 1, 33) and out.dtype == torch.bfloat16
    assert torch.equal(out, wide.to(torch.bfloat16))


def test_zero_weight_expert_is_skipped_not_multiplied(kernel_impl):
    experts = _experts(3, 2, 4, 33)
    experts[1].fill_(float("nan"))  # sample 0 gives expert 1 weight zero, sample 1 does not
    weights = _weights(2, 3)
    out = astrea.ops.dense_weighted_combine(experts, weights)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    kept = [experts[0][:1], experts[2][:1]]
    _assert_dense_combine_within_bound(out[:1], kept, weights[:1, [0, 2]], what="sample 0")


def _combine_grads(fn, experts, weights, scale, grad):
    leaves = [*experts, weights, scale]
    for leaf in leaves:
        leaf.requires_grad_(True)
    return torch.autograd.grad(fn(experts, weights, scale), leaves, grad)


@pytest.mark.parametrize("D", [1, 4096])
def test_dense_combine_backward_matches_reference_and_is_deterministic(kernel_impl, D):
    experts, weights, scale = _experts(3, 2, 3, D), _weights(2, 3), torch.rand(3) + 0.5
    grad = torch.randn(2, 3, D)
    got = _combine_grads(astrea.ops.dense_weighted_combine, experts, weights, scale, grad)
    again = _combine_grads(astrea.ops.dense_weighted_combine, experts, weights, scale, grad)
    def explicit_backward(grad, experts, weights, scale):
        """The reference's backward and its chain rule to w and s (autograd of the reference's
        forward would give 0 for d w where w = 0: it skips those experts)."""
        coef = combine_ref.combine_coefficients(weights, scale)
        grad_experts, grad_coef = combine_ref.dense_weighted_combine_backward(grad, experts, coef)
        return [*grad_experts, grad_coef * scale, (grad_coef * weights).sum(0)]

    expected = explicit_backward(grad.double(), *_wide(experts, weights, scale))
    term_sums = explicit_backward(grad.double().abs(), *_wide(experts, weights, scale, magnitude=True))
    # d y_e = (w s) g: 2 roundings; d w = s <g, y_e> over a sample's T x D values, then s; d s
    # sums w <g, y_e> over the B samples too.
    values = grad[0].numel()
    lengths = [2, 2, 2, values + 2, grad.numel() + 2]
    for name, a, b, c, t, n in zip(["y0", "y1", "y2", "weights", "scale"], got, again, expected, term_sums, lengths):
        assert torch.equal(a, b), f"{name} gradient is not deterministic"
        assert_within(a, c, accumulation_bound(t, n, c, a.dtype), what=f"d {name}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", ["list", "stacked", "strided"])
def test_dense_combine_cpu_kernel_is_the_reference_bit_for_bit(dtype, layout):
    """Forward and expert gradients equal the reference exactly; d coef within rounding of the sum order."""
    _require_cpu_kernels()
    experts = _experts(3, 3, 5, 37, dtype=dtype, layout=layout)
    coef = combine_ref.combine_coefficients(_weights(3, 3), torch.rand(3) + 0.5)
    experts[1][0].fill_(float("nan"))  # zero coefficient for sample 0: must not leak
    experts = list(experts)
    out = torch.ops.astrea.dense_combine_cpu(experts, coef)
    assert torch.equal(out, combine_ref.dense_weighted_combine(experts, coef))
    grad = torch.randn(3, 5, 37, dtype=dtype)
    grad_experts, grad_coef = torch.ops.astrea.dense_combine_backward_cpu(grad, experts, coef, True, True)
    expected_experts, expected_coef = combine_ref.dense_weighted_combine_backward(grad, experts, coef)
    for got, expected in zip(grad_experts, expected_experts):
        assert torch.equal(got, expected)
    finite = torch.isfinite(expected_coef)
    assert torch.equal(finite, torch.isfinite(grad_coef))
    # d coef[b, e] = <grad[b], y_e[b]>: T x D products, in fp32 (float64 for float64).
    grad64, ys64 = grad.double(), [y.double() for y in experts]
    exact = torch.stack([(grad64 * y).sum((1, 2)) for y in ys64], dim=1)
    terms = torch.stack([(grad64.abs() * y.abs()).sum((1, 2)) for y in ys64], dim=1)
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    bound = accumulation_bound(terms, 5 * 37, exact, grad_coef.dtype, accumulation=accumulation)
    assert_within(grad_coef[finite], exact[finite], bound[finite], what="d coef")
    no_experts, only_coef = torch.ops.astrea.dense_combine_backward_cpu(grad, experts, coef, False, True)
    assert no_experts == []
    torch.testing.assert_close(only_coef, grad_coef, rtol=0, atol=0, equal_nan=True)


def test_dense_combine_cpu_kernel_gradcheck_float64():
    """The registered op through the C++ forward and backward against finite differences, zero weights included."""
    _require_cpu_kernels()
    coef = _weights(2, 3).double().requires_grad_()
    stacked = torch.randn(3, 2, 3, 10, dtype=torch.float64)
    experts = [strided(y).requires_grad_() for y in stacked]
    with running("cpu", *OPS_UNDER_TEST):
        combine = torch.ops.astrea.dense_weighted_combine
        assert torch.autograd.gradcheck(lambda c, *ys: combine(list(ys), c, "extension"), (coef, *experts))


@pytest.mark.parametrize("args, error, match", [
    (([], torch.rand(2, 0)), ValueError, "experts must hold at least one tensor, got none"),
    (([torch.randn(4)], torch.rand(4, 1)), ValueError, r"experts\[0\] must be \[B, \.\.\., D\] \(at least 2-D\)"),
    (([torch.ones(2, 3, dtype=torch.int32)], torch.rand(2, 1)), TypeError, "experts must be floating, got Int"),
    (([torch.randn(2, 3), torch.randn(2, 4)], torch.rand(2, 2)), ValueError,
     r"experts\[1\] must have the shape of experts\[0\] \[2, 3\], got \[2, 4\]"),
    (([torch.randn(2, 3), torch.randn(2, 3).half()], torch.rand(2, 2)), TypeError,
     r"experts\[1\] must have the dtype of experts\[0\] Float, got Half"),
    (([torch.randn(2, 3)], torch.rand(2, 2)), ValueError, r"coef must be \[B, E\] = \[2, 1\], got \[2, 2\]"),
    (([torch.randn(2, 3)], torch.ones(2, 1, dtype=torch.int64)), TypeError, "coef must be floating, got Long"),
])
def test_dense_combine_cpu_kernel_rejects_bad_arguments(args, error, match):
    _require_cpu_kernels()
    with pytest.raises(error, match="dense_combine_cpu: " + match):
        torch.ops.astrea.dense_combine_cpu(*args)
    with pytest.raises(error, match="dense_combine_backward_cpu: " + match):
        torch.ops.astrea.dense_combine_backward_cpu(torch.randn(2, 3), *args, True, True)
    experts, coef = [torch.randn(2, 3)], torch.rand(2, 1)
    with pytest.raises(ValueError, match=r"dense_combine_backward_cpu: grad must have the experts' shape"):
        torch.ops.astrea.dense_combine_backward_cpu(torch.randn(2, 4), experts, coef, True, True)
    with pytest.raises(TypeError, match=r"dense_combine_backward_cpu: grad must have the experts' dtype Float"):
        torch.ops.astrea.dense_combine_backward_cpu(torch.randn(2, 3).half(), experts, coef, True, True)


def test_dense_combine_reference_backward_gradcheck_float64():
    """The explicit reference backward (the CPU path) against finite differences, zero weights included."""

    class Combine(torch.autograd.Function):
        @staticmethod
        def forward(ctx, coef, *experts):
            ctx.save_for_backward(coef, *experts)
            return combine_ref.dense_weighted_combine(experts, coef)

        @staticmethod
        def backward(ctx, grad):
            coef, *experts = ctx.saved_tensors
            grad_experts, grad_coef = combine_ref.dense_weighted_combine_backward(grad, experts, coef)
            return grad_coef, *grad_experts

    coef = _weights(2, 3).double().requires_grad_()
    experts = [torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(Combine.apply, (coef, *experts))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"weights": torch.rand(2, 4)}, ValueError, r"weights.shape\[1\] must equal the number of experts E = 3"),
    ({"weights": torch.rand(3, 3)}, ValueError, r"weights.shape\[0\] must equal the batch size B"),
    ({"weights": torch.ones(2, 3, dtype=torch.int64)}, TypeError, "weights must have dtype"),
    ({"expert_scale": torch.rand(4)}, ValueError, r"expert_scale.shape\[0\] must equal the number of experts"),
    ({"expert_out": []}, ValueError, "between 1 and 32 experts; got 0"),
    ({"expert_out": [torch.randn(2, 4, 8)] * 33, "weights": torch.rand(2, 33)}, ValueError, "got 33"),
    ({"expert_out": [torch.randn(2, 4, 8), torch.randn(2, 4, 9), torch.randn(2, 4, 8)]}, ValueError,
     r"expert_out\[1\] is"),
    ({"expert_out": torch.randn(3, 8)}, ValueError, "at least 3-D"),
    ({"expert_out": "experts"}, TypeError, "expert_out must be a tensor"),
])
def test_dense_combine_rejects_bad_inputs(kwargs, error, match):
    args = {"expert_out": [torch.randn(2, 4, 8) for _ in range(3)], "weights": torch.rand(2, 3), **kwargs}
    with pytest.raises(error, match=match):
        astrea.ops.dense_weighted_combine(**args)


# ---- fused combine + residual -----------------------------------------------------------


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("granularity", ["token", "sample"])
@pytest.mark.parametrize("training", [True, False])
def test_combine_residual_is_bit_identical_to_two_ops(kernel_impl, D, granularity, training):
    experts, weights, scale = _experts(4, 2, 3, D, layout="strided"), _weights(2, 4), torch.rand(4) + 0.5
    residual = strided(torch.randn(2, 3, D))
    draw = {"seed": 99, "offset": 5, "granularity": granularity, "training": training}
    fused = astrea.ops.combine_residual(experts, weights, residual, 0.5, expert_scale=scale, **draw)
    combined = astrea.ops.dense_weighted_combine(experts, weights, scale)
    assert torch.equal(fused, astrea.ops.stochastic_residual(combined, residual, 0.5, **draw))
    assert torch.equal(fused, reference.combine_residual(experts, weights, residual, 0.5, expert_scale=scale, **draw))


@pytest.mark.parametrize("granularity", ["token", "sample"])
def test_combine_residual_backward_equals_two_ops(kernel_impl, granularity):
    experts, weights, scale = _experts(3, 2, 5, 33), _weights(2, 3), torch.rand(3) + 0.5
    residual, grad = torch.randn(2, 5, 33, requires_grad=True), torch.randn(2, 5, 33)
    draw = {"seed": 4, "offset": 1, "granularity": granularity}

    def fused(experts, weights, scale):
        return astrea.ops.combine_residual(experts, weights, residual, 0.3, expert_scale=scale, **draw)

    def two_ops(experts, weights, scale):
        combined = astrea.ops.dense_weighted_combine(experts, weights, scale)
        return astrea.ops.stochastic_residual(combined, residual, 0.3, **draw)

    for name, a, b in zip(["y0", "y1", "y2", "weights", "scale"], _combine_grads(fused, experts, weights, scale, grad),
                          _combine_grads(two_ops, experts, weights, scale, grad)):
        assert torch.equal(a, b), name
    (grad_fused,) = torch.autograd.grad(fused(experts, weights, scale), residual, grad)
    (grad_two,) = torch.autograd.grad(two_ops(experts, weights, scale), residual, grad)
    assert torch.equal(grad_fused, grad_two)


def test_combine_residual_rejects_bad_residual():
    experts, weights = [torch.randn(2, 4, 8) for _ in range(3)], torch.rand(2, 3)
    with pytest.raises(ValueError, match=r"combine_residual: residual must have the shape of an expert output"):
        astrea.ops.combine_residual(experts, weights, torch.randn(2, 4, 7), 0.5, seed=0)
    with pytest.raises(TypeError, match=r"combine_residual: residual must have the dtype"):
        astrea.ops.combine_residual(experts, weights, torch.randn(2, 4, 8).half(), 0.5, seed=0)
    with pytest.raises(ValueError, match=r"combine_residual: p \(the keep probability\)"):
        astrea.ops.combine_residual(experts, weights, torch.randn(2, 4, 8), -0.5, seed=0)


# ---- registration ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "reference", "cpu"])
def test_opcheck(backend):
    """``cpu`` runs the C++ CPU kernels of the combine and the residual."""
    impl = CHOICE_OF[backend]
    experts = [torch.randn(2, 3, 33, requires_grad=True) for _ in range(3)]
    coef = _weights(2, 3).requires_grad_()
    y, r = torch.randn(2, 3, 33, requires_grad=True), torch.randn(2, 3, 33, requires_grad=True)
    grad = torch.randn(2, 3, 33)
    cases = [
        (torch.ops.astrea.stochastic_residual.default, (y, r, 0.5, 3, 1, "token", True, impl)),
        (torch.ops.astrea.stochastic_residual_backward.default, (grad, 0.5, 3, 1, "sample", True, impl)),
        (torch.ops.astrea.dense_weighted_combine.default, (experts, coef, impl)),
        (torch.ops.astrea.combine_residual.default, (experts, coef, r, 0.5, 3, 1, "sample", True, impl)),
        (torch.ops.astrea.dense_combine_backward.default,
         (grad, [e.detach() for e in experts], coef.detach(), True, True, True, 0.5, 3, 1, "token", True, impl)),
        (torch.ops.astrea.dense_combine_backward.default,
         (grad, [e.detach() for e in experts], coef.detach(), False, True, True, 0.5, 3, 1, "token", False, impl)),
    ]
    if backend == "cpu":  # the C++ kernels' own schemas, with their fakes
        detached = [e.detach() for e in experts]
        cases += [
            (torch.ops.astrea.stochastic_residual_cpu.default, (y.detach(), r.detach(), 0.5, 3, 1, "token", True)),
            (torch.ops.astrea.stochastic_residual_cpu.default, (None, grad, 0.5, 3, 1, "sample", True)),
            (torch.ops.astrea.dense_combine_cpu.default, (detached, coef.detach())),
            (torch.ops.astrea.dense_combine_backward_cpu.default, (grad, detached, coef.detach(), True, False)),
        ]
    with running(backend, *OPS_UNDER_TEST):
        for op, args in cases:
            torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_cpu():
    experts = [torch.randn(2, 3, 33, requires_grad=True) for _ in range(4)]
    weights, residual = _weights(2, 4).requires_grad_(), torch.randn(2, 3, 33, requires_grad=True)

    def fn(experts, weights, residual):
        fused = astrea.ops.combine_residual(experts, weights, residual, 0.5, seed=7, offset=3)
        return astrea.ops.stochastic_residual(fused, residual, 0.8, seed=8, granularity="sample")

    compiled = torch.compile(fn, fullgraph=True)  # inductor: ~30 s cold on 2 cores, ~6 s warm
    out = compiled(experts, weights, residual)
    expected = fn(experts, weights, residual)
    assert torch.equal(out, expected)
    leaves = [*experts, weights, residual]
    for a, b in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(expected.sum(), leaves)):
        assert torch.equal(a, b)


# ---- modules -----------------------------------------------------------------------------


def test_stochastic_residual_module_reproducible_and_fresh_per_call():
    module = StochasticResidual(0.5)
    y, r = torch.zeros(64, 8), torch.ones(64, 8)
    torch.manual_seed(1)
    first, second = module(y, r), module(y, r)
    assert module.offset == 128 and not torch.equal(first, second)
    replay = StochasticResidual(0.5)
    torch.manual_seed(1)
    assert torch.equal(replay(y, r), first)
    module.eval()
    assert torch.equal(module(y, r), y + r)
    with pytest.raises(ValueError, match="StochasticResidual: p"):
        StochasticResidual(0.0)
    with pytest.raises(ValueError, match="granularity"):
        StochasticResidual(0.5, granularity="batch")


def test_adaptive_weight_allocator():
    allocator = AdaptiveWeightAllocator(3, bias_update_rate=0.01, init_temperature=2.0)
    logits = torch.randn(5, 3)
    assert_within_torch_error(allocator(logits), logits.double() / 2.0, logits / 2.0, what="calibrated logits")
    assert torch.equal(allocator.scale, torch.ones(3))
    assert "bias" in allocator.state_dict()

    allocator.update_bias(torch.tensor([10, 2, 6]))  # mean 6: over, under, balanced
    assert torch.equal(allocator.bias, torch.tensor([-0.01, 0.01, 0.0]))
    assert not allocator.bias.requires_grad

    experts, weights = [torch.randn(5, 2, 4) for _ in range(3)], torch.rand(5, 3)
    out = astrea.ops.dense_weighted_combine(experts, weights, allocator.scale)
    out.sum().backward()
    assert allocator.log_scale.grad is not None and allocator.log_scale.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"tokens_per_expert must be a tensor of shape \(3,\)"):
        allocator.update_bias(torch.ones(4))
    with pytest.raises(ValueError, match="logits must be"):
        allocator(torch.randn(5, 4))
