"""MoE dispatch, permute, sparse weighted combine and its fusion with the stochastic
residual: kernels (Triton, and the C++ CPU kernels of astrea._C) against the references,
validation, opcheck, torch.compile, float64 gradcheck, determinism, and SparseMoE against
a per-token loop.

Tolerances are derived: permute is exact; sums (permute's backward, the combines and their
gradients) lie within :func:`tests.utils.accumulation_bound` of a float64 oracle, for the
number of roundings on each element's path and the sums of |terms| that the same formula
gives on |inputs|; compiled graphs and SparseMoE within 4x the error of eager PyTorch against
float64 (:func:`tests.utils.assert_within_torch_error`)."""

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import astrea
from astrea import _backend, _extension, ops, reference
from astrea.nn import SparseMoE
from tests.utils import (CHOICE_OF, KERNELS, UNIT_ROUNDOFF, accumulation_bound, assert_within,
                         assert_within_torch_error, float64_leaves, running, strided)


def reference_layout(indices: torch.Tensor, num_experts: int):
    """The Dispatch of indices from the reference path (the kernel's layout is tested on its
    own; interpreting it again in every permute and combine test would only cost time)."""
    with astrea.backend("reference"):
        return ops.moe_dispatch(indices, num_experts)


def make_indices(num_tokens: int, top_k: int, num_experts: int, device="cpu") -> torch.Tensor:
    """Distinct experts per token, as a top-k router gives."""
    return torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).int().to(device)


def reference_dispatch(indices: torch.Tensor, num_experts: int):
    """The layout written out from the definition: slots sorted by (expert, token, slot)."""
    indices = indices.cpu()
    top_k = indices.shape[1]
    slots = sorted(range(indices.numel()), key=lambda r: (int(indices.view(-1)[r]), r))
    sorted_token_ids = torch.tensor([r // top_k for r in slots], dtype=torch.int32)
    inverse = torch.empty(indices.numel(), dtype=torch.int32)
    inverse[torch.tensor(slots, dtype=torch.long)] = torch.arange(indices.numel(), dtype=torch.int32)
    counts = torch.bincount(indices.view(-1).long(), minlength=num_experts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return sorted_token_ids, offsets, inverse.view_as(indices)


def assert_same_layout(dispatch, expected) -> None:
    for name, got, want in zip(("sorted_token_ids", "expert_offsets", "inverse_positions"), dispatch, expected):
        assert got.dtype == want.dtype, name
        assert torch.equal(got.cpu(), want), name


def fp64_combine(y, weights, indices, inverse_positions, scale=None):
    coefficient = weights.double() * (scale.double()[indices.long()] if scale is not None else 1)
    rows = y.double()[inverse_positions.long()]
    return (coefficient[..., None] * rows).sum(1)


OPS_UNDER_TEST = ("moe_dispatch", "permute", "weighted_combine")


def use_impl(request, impl: str) -> torch.device:
    """Runs the ops of this test on ``impl`` (triton, cpu or reference); the device it runs on."""
    stack = contextlib.ExitStack()
    request.addfinalizer(stack.close)
    stack.enter_context(running(impl, *OPS_UNDER_TEST))
    return request.getfixturevalue("device") if impl == "triton" else torch.device("cpu")


@pytest.fixture(params=KERNELS)
def kernel_device(request) -> torch.device:
    """Turns each kernel on in turn for this test; the device it runs on."""
    return use_impl(request, request.param)


@pytest.fixture(params=KERNELS)
def kernels(request) -> None:
    """Turns each kernel on in turn for this test (on CPU tensors)."""
    use_impl(request, request.param)


def test_cpu_tensors_run_the_cpu_kernels_under_auto():
    if not _extension.available():
        pytest.skip("astrea._C is not built")
    with astrea.backend("auto"):
        for op in OPS_UNDER_TEST:
            assert _backend.OPS[op].choose(torch.device("cpu")) == "extension", op


# --- moe_dispatch -------------------------------------------------------------------------


# 3000 experts: more buckets than the Triton histogram counts in one pass.
@pytest.mark.parametrize("num_tokens, top_k, num_experts", [(1, 1, 1), (100, 3, 5), (67, 2, 160), (700, 3, 3000)])
@pytest.mark.parametrize("impl", [*KERNELS, "reference"])
def test_dispatch_is_a_stable_sort_by_expert(num_tokens, top_k, num_experts, impl, request):
    device = use_impl(request, impl)
    indices = make_indices(num_tokens, top_k, num_experts, device)
    dispatch = ops.moe_dispatch(indices, num_experts)
    assert_same_layout(dispatch, reference_dispatch(indices, num_experts))
    assert dispatch.indices is indices and dispatch.num_experts == num_experts


def test_dispatch_kernel_spans_many_blocks_with_skewed_and_empty_experts(kernel_device):
    # Several blocks of slots, most on expert 2, experts 0 and 5 empty, ties inside a token.
    num_tokens = 350 if kernel_device.type == "cpu" else 3000
    indices = torch.full((num_tokens, 2), 2, dtype=torch.int32, device=kernel_device)
    indices[::7, 1] = 4
    indices[::11, 0] = 1
    indices[5, :] = 3
    assert_same_layout(ops.moe_dispatch(indices, 6), reference_dispatch(indices, 6))


def test_dispatch_kernel_places_out_of_range_experts_after_the_last_expert(device):
    """The CUDA policy, through the launcher (on CPU the op raises before any kernel runs)."""
    from astrea.kernels.dispatch import dispatch_forward

    indices = make_indices(90, 2, 4, device)
    indices[3, 1] = 4
    indices[40, 0] = -1
    indices[77, 1] = 1000
    sorted_token_ids, offsets, inverse = dispatch_forward(indices, 4)
    bad = (indices < 0) | (indices >= 4)
    # The same layout as if those slots had chosen a fifth expert.
    want_sorted, want_offsets, want_inverse = reference_dispatch(torch.where(bad, 4, indices), 5)
    assert_same_layout((sorted_token_ids, offsets, inverse), (want_sorted, want_offsets[:5], want_inverse))
    assert int(offsets[-1]) == indices.numel() - 3
    # Those slots contribute nothing, and their rows (never computed by an expert) are not read.
    from astrea.kernels.combine import combine_forward

    expert_out = torch.randn(indices.numel(), 5, device=device)
    expert_out[offsets[-1]:] = float("nan")
    weights, scale = torch.rand(90, 2, device=device), torch.rand(4, device=device)
    out = combine_forward(expert_out, inverse, weights, indices, scale, 4)
    rows = torch.where(bad[..., None], 0, expert_out.double()[inverse.long()])
    coefficient = torch.where(bad, 0, weights.double() * scale.double()[indices.clamp(0, 3).long()])
    expected = (coefficient[..., None] * rows).sum(1)
    terms = (coefficient.abs()[..., None] * rows.abs()).sum(1)
    assert_within(out, expected, accumulation_bound(terms, 2 + 2, expected, torch.float32), what="out")


def test_dispatch_of_zero_tokens(kernel_device):
    dispatch = ops.moe_dispatch(torch.empty(0, 2, dtype=torch.int32, device=kernel_device), 3)
    assert dispatch.sorted_token_ids.shape == (0,) and dispatch.inverse_positions.shape == (0, 2)
    assert torch.equal(dispatch.expert_offsets.cpu(), torch.zeros(4, dtype=torch.int64))


def test_dispatch_is_deterministic(kernel_device):
    indices = make_indices(150, 2, 3, kernel_device)
    first = ops.moe_dispatch(indices, 3)
    second = ops.moe_dispatch(indices.clone(), 3)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# --- permute ----------------------------------------------------------------------------


def assert_permute_grad_within_bound(grad_x, grad, dispatch):
    """grad x[t] sums the k rows of ``grad`` that token t went to (k - 1 fp32 additions, rounded
    to the dtype): within the accumulation bound of that sum in float64."""
    rows = grad.double()[dispatch.inverse_positions.long()]
    expected = rows.sum(1)
    bound = accumulation_bound(rows.abs().sum(1), rows.shape[1], expected, grad_x.dtype)
    assert_within(grad_x, expected, bound, what="grad x")


@pytest.mark.parametrize("num_tokens, top_k, num_experts, dim", [(100, 3, 5, 1), (37, 2, 7, 33), (5, 2, 3, 4096)])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_permute_kernel_matches_reference(kernel_device, num_tokens, top_k, num_experts, dim, layout):
    indices = make_indices(num_tokens, top_k, num_experts, kernel_device)
    base = torch.randn(num_tokens, dim, device=kernel_device)
    x = (strided(base) if layout == "strided" else base.clone()).requires_grad_()
    dispatch = reference_layout(indices, num_experts)
    out = ops.permute(x, dispatch)
    assert torch.equal(out, base[dispatch.sorted_token_ids.long()])
    grad = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    assert_permute_grad_within_bound(grad_x, grad, dispatch)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_permute_low_precision_on_cpu(dtype, impl, request):
    use_impl(request, impl)
    indices = make_indices(40, 2, 5)
    x = torch.randn(40, 33, dtype=dtype, requires_grad=True)
    dispatch = ops.moe_dispatch(indices, 5)
    out = ops.permute(x, dispatch)
    assert out.dtype == dtype and torch.equal(out, x.detach()[dispatch.sorted_token_ids.long()])
    grad = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    assert_permute_grad_within_bound(grad_x, grad, dispatch)


# --- weighted_combine -------------------------------------------------------------------


def combine_case(num_tokens, top_k, num_experts, dim, dtype=torch.float32, layout="contiguous", device="cpu"):
    dispatch = reference_layout(make_indices(num_tokens, top_k, num_experts, device), num_experts)
    y = torch.randn(num_tokens * top_k, dim, dtype=dtype, device=device)
    weights = torch.rand(num_tokens, top_k, device=device)
    scale = torch.rand(num_experts, device=device) + 0.5
    if layout == "strided":
        y, weights = strided(y), strided(weights)
    return dispatch, y.requires_grad_(), weights.requires_grad_(), scale.requires_grad_()


def rounding_slack(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """What the Triton interpreter adds to a bound: it converts fp32 to bf16 by truncation
    (torch, and Triton on a GPU, round to nearest), a whole ulp instead of half of one."""
    interpreted = device.type == "cpu" and _backend.OPS["weighted_combine"].choose(device) == "triton"
    if interpreted and value.dtype == torch.bfloat16:
        return UNIT_ROUNDOFF[torch.bfloat16] * value.detach().double().abs()
    return torch.zeros((), dtype=torch.float64)


def check_combine(dispatch, y, weights, scale):
    """Output and gradients against float64, within the accumulation bounds of their sums."""
    out = ops.weighted_combine(y, weights, dispatch, expert_scale=scale)
    assert out.dtype == y.dtype
    indices, inverse = dispatch.indices, dispatch.inverse_positions
    inputs = [t for t in (y, weights, scale) if t is not None]
    leaves64, magnitudes = float64_leaves(*inputs), float64_leaves(*inputs, magnitude=True)
    expected = fp64_combine(*leaves64[:2], indices, inverse, *leaves64[2:])
    terms = fp64_combine(*magnitudes[:2], indices, inverse, *magnitudes[2:])
    top_k, dim = indices.shape[1], y.shape[1]
    # w * s rounded to fp32, then k products summed in fp32, rounded to the dtype.
    assert_within(out, expected, accumulation_bound(terms, top_k + 2, expected, out.dtype)
                  + rounding_slack(expected.to(out.dtype), y.device), what="out")
    grad = torch.randn(expected.shape, device=expected.device).to(out.dtype)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, leaves64, grad.double())
    term_sums = torch.autograd.grad(terms, magnitudes, grad.double().abs())
    # d expert_out = (w s) g: 2 roundings; d weights = s <g, y>: D products, then s; d expert_scale
    # sums w <g, y> over the expert's slots: (slots * D) products, then w.
    slots = int((dispatch.expert_offsets[1:] - dispatch.expert_offsets[:-1]).max())
    lengths = (2, dim + 2, slots * dim + 2)
    for name, g, w, t, length in zip(("grad expert_out", "grad weights", "grad expert_scale"), got, want,
                                     term_sums, lengths):
        assert g.dtype == (y.dtype if name == "grad expert_out" else torch.float32), name
        assert_within(g, w, accumulation_bound(t, length, w, g.dtype) + rounding_slack(w.to(g.dtype), y.device),
                      what=name)


@pytest.mark.parametrize("num_tokens, top_k, num_experts, dim", [(100, 3, 5, 1), (37, 2, 7, 33), (5, 2, 3, 4096)])
@pytest.mark.parametrize("with_scale", [True, False])
def test_weighted_combine_kernel_matches_reference(kernel_device, num_tokens, top_k, num_experts, dim, with_scale):
    dispatch, y, weights, scale = combine_case(num_tokens, top_k, num_experts, dim, device=kernel_device)
    check_combine(dispatch, y, weights, scale if with_scale else None)


def test_weighted_combine_kernel_strided_inputs(kernel_device):
    check_combine(*combine_case(45, 2, 3, 33, layout="strided", device=kernel_device))


def test_weighted_combine_kernel_bfloat16(kernel_device):
    check_combine(*combine_case(21, 2, 3, 300, dtype=torch.bfloat16, device=kernel_device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_weighted_combine_low_precision_on_cpu(dtype, impl, request):
    use_impl(request, impl)
    dispatch, y, weights, scale = combine_case(40, 2, 5, 33, dtype=dtype)
    check_combine(dispatch, y, weights, scale)


def test_combine_backward_is_deterministic(kernel_device):
    dispatch, y, weights, scale = combine_case(64, 4, 5, 33, device=kernel_device)
    grad = torch.randn(64, 33, device=kernel_device)
    runs = [torch.autograd.grad(ops.weighted_combine(y, weights, dispatch, scale), (y, weights, scale), grad)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --- weighted_combine fused with the stochastic residual -------------------------------


def fused_case(residual_shape, top_k, num_experts, with_scale=True):
    """(expert_out, weights, scale or None, dispatch, strided residual) of a sparse combine_residual."""
    num_tokens, dim = residual_shape[:-1].numel(), residual_shape[-1]
    dispatch, y, weights, scale = combine_case(num_tokens, top_k, num_experts, dim)
    return y, weights, scale if with_scale else None, dispatch, strided(torch.randn(residual_shape)).requires_grad_()


def two_ops(y, weights, scale, dispatch, residual, p, **draw):
    combined = ops.weighted_combine(y, weights, dispatch, expert_scale=scale)
    return ops.stochastic_residual(combined.view_as(residual), residual, p, **draw)


def fused(y, weights, scale, dispatch, residual, p, **draw):
    return ops.combine_residual(y, weights, residual, p, expert_scale=scale, dispatch=dispatch, **draw)


# (residual shape, k): N*k spans several 8-token blocks; D=4096 with few tokens.
FUSED_SHAPES = [((5, 7, 1), 3), ((37, 33), 3), ((5, 7, 33), 2), ((2, 3, 4096), 2)]


@pytest.mark.parametrize("residual_shape, top_k", FUSED_SHAPES)
@pytest.mark.parametrize("granularity", ["token", "sample"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_scale", [True, False])
def test_combine_residual_kernel_is_bit_identical_to_two_ops(kernels, residual_shape, top_k, granularity, training,
                                                             with_scale):
    case = fused_case(torch.Size(residual_shape), top_k, 5, with_scale)
    draw = {"seed": 2**40 + 7, "offset": 13, "granularity": granularity, "training": training}
    out = fused(*case, 0.5, **draw)
    assert out.shape == residual_shape and out.is_contiguous()
    assert torch.equal(out, two_ops(*case, 0.5, **draw))
    y, weights, scale, dispatch, residual = case

    def reference_on(y, weights, scale, residual):
        return reference.sparse_combine_residual(y, weights, dispatch.indices, dispatch.inverse_positions, 5,
                                                 residual, 0.5, expert_scale=scale, **draw)

    expected, terms = reference_on(*float64_leaves(*case[:3], residual)), reference_on(
        *float64_leaves(*case[:3], residual, magnitude=True))
    # w * s: 1 rounding, k products and k - 1 additions, 1/p and r * (1/p): 2, the final add: 1.
    assert_within(out, expected, accumulation_bound(terms, top_k + 4, expected, out.dtype),
                  what="against the reference")


def test_combine_residual_kernel_at_p_one_is_combine_plus_residual(kernels):
    case = fused_case(torch.Size((4, 5, 33)), 2, 3)
    out = fused(*case, 1.0, seed=3)
    assert torch.equal(out, two_ops(*case, 1.0, seed=3))
    assert torch.equal(out, ops.weighted_combine(*case[:2], case[3], case[2]).view(4, 5, 33) + case[4])


@pytest.mark.parametrize("impl", [*KERNELS, "reference"])
@pytest.mark.parametrize("granularity", ["token", "sample"])
def test_combine_residual_backward_equals_two_ops(impl, granularity, request):
    use_impl(request, impl)
    case = fused_case(torch.Size((3, 5, 33)), 3, 4)
    leaves = [case[0], case[1], case[2], case[4]]  # expert_out, weights, scale, residual
    grad = torch.randn(3, 5, 33)
    draw = {"seed": 11, "offset": 2, "granularity": granularity}
    got = torch.autograd.grad(fused(*case, 0.3, **draw), leaves, grad)
    want = torch.autograd.grad(two_ops(*case, 0.3, **draw), leaves, grad)
    for name, g, w in zip(("expert_out", "weights", "expert_scale", "residual"), got, want):
        assert torch.equal(g, w), f"grad {name}"
    # Only the residual asks for a gradient: the combine's backward is skipped.
    (grad_residual,) = torch.autograd.grad(fused(*(t.detach() for t in case[:3]), *case[3:], 0.3, **draw),
                                           case[4], grad)
    assert torch.equal(grad_residual, want[3])


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_combine_residual_sparse_low_precision_on_cpu(impl, request):
    use_impl(request, impl)
    y, weights, scale, dispatch, residual = fused_case(torch.Size((4, 6, 33)), 2, 3)
    y, residual = y.detach().bfloat16(), residual.detach().bfloat16()
    draw = {"seed": 5, "granularity": "sample"}
    out = fused(y, weights, scale, dispatch, residual, 0.5, **draw)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, two_ops(y, weights, scale, dispatch, residual, 0.5, **draw))


def test_combine_residual_sparse_validation():
    y, weights, scale, dispatch, residual = fused_case(torch.Size((2, 3, 8)), 2, 3)

    def call(**kwargs):
        args = {"expert_out": y, "weights": weights, "residual": residual, "p": 0.5, "seed": 0, "dispatch": dispatch,
                **kwargs}
        return ops.combine_residual(args.pop("expert_out"), args.pop("weights"), args.pop("residual"),
                                    args.pop("p"), **args)

    shape_error = r"combine_residual: residual must be \[N, D\] = \(6, 8\) or \[B, ..., D\] whose rows flatten to N = 6"
    with pytest.raises(ValueError, match=shape_error + r" with D = 8; got shape \(2, 3, 7\)"):
        call(residual=torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match=shape_error + r".*got shape \(2, 4, 8\)"):
        call(residual=torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=shape_error + r".*got shape \(48,\)"):
        call(residual=torch.randn(48))
    with pytest.raises(TypeError, match=r"combine_residual: residual must have the dtype of expert_out \(torch.float32\); "
                                        r"got torch.float16"):
        call(residual=residual.detach().half())
    with pytest.raises(TypeError, match="combine_residual: residual must have dtype float32, float16, bfloat16"):
        call(residual=residual.detach().int())
    with pytest.raises(ValueError, match=r"combine_residual: all tensors must be on one device; "
                                         r"got expert_out on cpu, residual on meta"):
        call(residual=torch.empty(2, 3, 8, device="meta"))
    with pytest.raises(ValueError, match=r"combine_residual: weights must have the shape of dispatch.indices"):
        call(weights=torch.rand(6, 3))
    with pytest.raises(ValueError, match=r"combine_residual: expert_scale.shape\[0\] must equal the number of experts"):
        call(expert_scale=torch.rand(4))
    with pytest.raises(TypeError, match="combine_residual: dispatch must be the Dispatch returned by"):
        call(dispatch=tuple(dispatch))
    with pytest.raises(ValueError, match=r"combine_residual: p \(the keep probability\) must be in \(0, 1\]"):
        call(p=0.0)
    with pytest.raises(ValueError, match="combine_residual: granularity must be one of"):
        call(granularity="batch")


# --- references: float64 gradcheck and explicit backward ---------------------------------


def test_reference_gradcheck_float64():
    indices = make_indices(6, 2, 3)
    sorted_token_ids, offsets, inverse = reference.moe_dispatch(indices, 3)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: reference.permute(x, sorted_token_ids), (x,))
    assert torch.autograd.gradcheck(
        lambda y, w, s: reference.weighted_combine(y, w, indices, inverse, 3, s), (y, weights, scale))


def test_combine_residual_reference_gradcheck_float64():
    indices = make_indices(6, 2, 3)
    _, _, inverse = reference.moe_dispatch(indices, 3)
    y = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(3, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda y, w, s, r: reference.sparse_combine_residual(y, w, indices, inverse, 3, r, 0.5, seed=1,
                                                             granularity="sample", expert_scale=s),
        (y, weights, scale, residual))


def combine_backward_bounds(grad, y, weights, indices, inverse, num_experts, scale, accumulation=torch.float32):
    """The accumulation bounds of weighted_combine's gradients (expert_out, weights, expert_scale)
    in ``accumulation``, rounded to the inputs' dtypes: sums of |terms| from the explicit backward
    on |inputs| (they bound |gradient| too, for the final rounding); d expert_out has 2
    roundings, d weights D + 2, d expert_scale (every slot's D products) N k D + 2."""
    magnitudes = float64_leaves(grad, y, weights, scale, magnitude=True)
    term_sums = reference.weighted_combine_backward(*magnitudes[:3], indices, inverse, num_experts, magnitudes[3])
    dim = y.shape[1]
    lengths = (2, dim + 2, indices.numel() * dim + 2)
    return [accumulation_bound(t, n, t, like.dtype, accumulation=accumulation)
            for t, n, like in zip(term_sums, lengths, (y, weights, scale))]


def test_reference_backwards_match_autograd_of_reference_forwards():
    """Both sides sum in float64, each in its own order: each within the accumulation bound of
    the exact sum, so within twice it of each other."""
    indices = make_indices(9, 3, 4)
    sorted_token_ids, offsets, inverse = reference.moe_dispatch(indices, 4)
    x = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(27, 7, dtype=torch.float64)
    (want,) = torch.autograd.grad(reference.permute(x, sorted_token_ids), x, grad)
    term_sums = grad.abs()[inverse.long()].sum(1)
    bound = accumulation_bound(term_sums, 3, want, torch.float64, accumulation=torch.float64)
    assert_within(reference.permute_backward(grad, inverse), want, 2 * bound, what="permute backward")
    y = torch.randn(27, 7, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(9, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(9, 7, dtype=torch.float64)
    want = torch.autograd.grad(reference.weighted_combine(y, weights, indices, inverse, 4, scale),
                               (y, weights, scale), grad)
    got = reference.weighted_combine_backward(grad, y, weights, indices, inverse, 4, scale)
    bounds = combine_backward_bounds(grad, y, weights, indices, inverse, 4, scale, accumulation=torch.float64)
    for name, g, w, bound in zip(("expert_out", "weights", "expert_scale"), got, want, bounds):
        assert_within(g, w, 2 * bound, what=f"grad {name}")


def test_cpu_kernels_gradcheck_float64(request):
    """The custom ops on the C++ CPU kernels, forward and backward, in float64."""
    use_impl(request, "cpu")
    indices = make_indices(7, 3, 4)
    sorted_token_ids, offsets, inverse, _ = ops.moe_dispatch(indices, 4)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(21, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(7, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(4, dtype=torch.float64, requires_grad=True)
    astrea_ops = torch.ops.astrea
    impl = CHOICE_OF["cpu"]
    assert torch.autograd.gradcheck(lambda x: astrea_ops.permute(x, sorted_token_ids, inverse, impl), (x,))
    assert torch.autograd.gradcheck(
        lambda y, w, s: astrea_ops.weighted_combine(y, w, indices, inverse, offsets, s, impl), (y, weights, scale))
    assert torch.autograd.gradcheck(
        lambda y, w: astrea_ops.weighted_combine(y, w, indices, inverse, offsets, None, impl), (y, weights))


def test_cpu_kernels_reject_bad_arguments(request):
    """Direct calls of the C++ ops: rows they would address out of bounds, or write twice, raise."""
    use_impl(request, "cpu")
    indices = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    inverse = torch.tensor([[0, 2], [1, 3]], dtype=torch.int32)
    y, weights, grad = torch.randn(4, 3), torch.rand(2, 2), torch.randn(2, 3)
    cpu_ops = torch.ops.astrea
    with pytest.raises(ValueError, match=r"moe_dispatch: indices must lie in \[0, num_experts=3\); "
                                         r"got values in \[0, 7\]"):
        cpu_ops.moe_dispatch_cpu(torch.tensor([[0, 7]], dtype=torch.int32), 3)
    with pytest.raises(TypeError, match="moe_dispatch: indices must be int32, got Long"):
        cpu_ops.moe_dispatch_cpu(indices.long(), 3)
    with pytest.raises(ValueError, match=r"permute: sorted_token_ids must lie in \[0, 2\); got 2 at flat index 1"):
        cpu_ops.permute_cpu(torch.randn(2, 3), torch.tensor([0, 2, 1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"permute_backward: inverse_positions must lie in \[0, 4\); got -1"):
        cpu_ops.permute_backward_cpu(y, torch.tensor([[0, -1], [1, 3]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weighted_combine: inverse_positions must lie in \[0, 4\); got 4"):
        cpu_ops.weighted_combine_cpu(y, weights, indices, inverse + 1, None, 3)
    with pytest.raises(ValueError, match=r"weighted_combine: expert_out must have N\*k = 4 rows, got 5"):
        cpu_ops.weighted_combine_cpu(torch.randn(5, 3), weights, indices, inverse, None, 3)
    with pytest.raises(ValueError, match=r"weighted_combine: expert_scale must be \[3\], got \[4\]"):
        cpu_ops.weighted_combine_cpu(y, weights, indices, inverse, torch.rand(4), 3)
    with pytest.raises(ValueError, match=r"weighted_combine_backward: inverse_positions must be a permutation of "
                                         r"\[0, 4\); got 2 at flat index 3"):
        cpu_ops.weighted_combine_backward_cpu(grad, y, weights, indices, torch.tensor([[0, 2], [1, 2]],
                                                                                       dtype=torch.int32), None, 3)
    with pytest.raises(TypeError, match="weighted_combine_backward: grad_out must have expert_out's dtype Float, "
                                        "got Double"):
        cpu_ops.weighted_combine_backward_cpu(grad.double(), y, weights, indices, inverse, None, 3)


def test_cpu_kernels_ignore_out_of_range_experts_in_the_combine(request):
    """As the reference does (a direct call: moe_dispatch never gives such slots on CPU)."""
    use_impl(request, "cpu")
    indices = torch.tensor([[0, 5], [-1, 2], [1, 0]], dtype=torch.int32)
    inverse = torch.tensor([[0, 5], [4, 3], [2, 1]], dtype=torch.int32)
    y, weights, scale, grad = torch.randn(6, 9), torch.rand(3, 2), torch.rand(3), torch.randn(3, 9)
    got = torch.ops.astrea.weighted_combine_cpu(y, weights, indices, inverse, scale, 3)
    y64, w64, s64 = float64_leaves(y, weights, scale)
    expected = reference.weighted_combine(y64, w64, indices, inverse, 3, s64)
    terms = reference.weighted_combine(*float64_leaves(y, weights, magnitude=True), indices, inverse, 3, s64.abs())
    assert_within(got, expected, accumulation_bound(terms, 2 + 2, expected, torch.float32), what="out")
    got = torch.ops.astrea.weighted_combine_backward_cpu(grad, y, weights, indices, inverse, scale, 3)
    want = reference.weighted_combine_backward(grad.double(), y64, w64, indices, inverse, 3, s64)
    bounds = combine_backward_bounds(grad, y, weights, indices, inverse, 3, scale)
    for name, g, w, bound in zip(("expert_out", "weights", "expert_scale"), got, want, bounds):
        assert_within(g, w, bound, what=f"grad {name}")


# --- registration: opcheck and torch.compile --------------------------------------------


def opcheck_cases(device, impl: str):
    indices = make_indices(10, 2, 3, device)
    sorted_token_ids, offsets, inverse = reference.moe_dispatch(indices, 3)
    x = torch.randn(10, 33, device=device, requires_grad=True)
    y = torch.randn(20, 33, device=device, requires_grad=True)
    weights = torch.rand(10, 2, device=device, requires_grad=True)
    scale = torch.rand(3, device=device, requires_grad=True)
    grad = torch.randn(10, 33, device=device)
    ops_ = torch.ops.astrea
    return [
        (ops_.moe_dispatch.default, (indices, 3, impl)),
        (ops_.permute.default, (x, sorted_token_ids, inverse, impl)),
        (ops_.permute_backward.default, (y.detach(), inverse, impl)),
        (ops_.weighted_combine.default, (y, weights, indices, inverse, offsets, scale, impl)),
        (ops_.weighted_combine.default, (y, weights, indices, inverse, offsets, None, impl)),
        (ops_.weighted_combine_backward.default,
         (grad, y.detach(), weights.detach(), indices, inverse, offsets, scale.detach(), impl)),
        (ops_.weighted_combine_backward.default,
         (grad, y.detach(), weights.detach(), indices, inverse, offsets, None, impl)),
        (ops_.sparse_combine_residual.default,
         (y, weights, indices, inverse, offsets, scale, x.view(2, 5, 33), 0.5, 3, 1, "sample", True, impl)),
        (ops_.sparse_combine_residual.default,
         (y, weights, indices, inverse, offsets, None, x, 0.5, 3, 1, "token", False, impl)),
    ]


@pytest.mark.parametrize("impl", [*KERNELS, "reference"])
def test_opcheck(impl, request):
    for op, args in opcheck_cases(use_impl(request, impl), CHOICE_OF[impl]):
        torch.library.opcheck(op, args)


def test_opcheck_cpu_kernel_ops(request):
    """The C++ ops themselves, which the custom ops call on CPU tensors."""
    use_impl(request, "cpu")
    indices = make_indices(10, 2, 3)
    sorted_token_ids, offsets, inverse = reference.moe_dispatch(indices, 3)
    x, y, grad = torch.randn(10, 33), torch.randn(20, 33), torch.randn(10, 33)
    weights, scale = torch.rand(10, 2), torch.rand(3)
    cpu_ops = torch.ops.astrea
    for op, args in [
        (cpu_ops.moe_dispatch_cpu.default, (indices, 3)),
        (cpu_ops.permute_cpu.default, (x, sorted_token_ids)),
        (cpu_ops.permute_backward_cpu.default, (y, inverse)),
        (cpu_ops.weighted_combine_cpu.default, (y, weights, indices, inverse, scale, 3)),
        (cpu_ops.weighted_combine_cpu.default, (y, weights, indices, inverse, None, 3)),
        (cpu_ops.weighted_combine_backward_cpu.default, (grad, y, weights, indices, inverse, scale, 3)),
        (cpu_ops.weighted_combine_backward_cpu.default, (grad, y, weights, indices, inverse, None, 3)),
    ]:
        torch.library.opcheck(op, args)


def assert_compiled_within_eager_error(out, eager, fn64, leaves, arguments):
    """``out`` (the compiled layer's) and the gradients of its sum w.r.t. ``leaves`` within 4x
    the error of the eager layer's against ``fn64(*arguments(*leaves))`` run in float64."""
    leaves64 = float64_leaves(*leaves)
    expected = fn64(*arguments(*leaves64))
    assert_within_torch_error(out, expected, eager, what="out")
    grads = torch.autograd.grad(out.sum(), leaves)
    expected_grads = torch.autograd.grad(expected.sum(), leaves64)
    eager_grads = torch.autograd.grad(eager.sum(), leaves)
    for i, (g, w, e) in enumerate(zip(grads, expected_grads, eager_grads)):
        assert_within_torch_error(g, w, e, what=f"grad of input {i}")


def test_torch_compile_fullgraph_on_cpu():
    dispatch_inputs = make_indices(30, 2, 4)
    x = torch.randn(30, 16, requires_grad=True)
    weights = torch.rand(30, 2, requires_grad=True)
    scale = torch.rand(4, requires_grad=True)

    def layer(x, indices, weights, scale):
        dispatch = ops.moe_dispatch(indices, 4)
        return ops.weighted_combine(torch.tanh(ops.permute(x, dispatch)), weights, dispatch, scale)

    def layer_in_float64(x, indices, weights, scale):
        sorted_token_ids, _, inverse = reference.moe_dispatch(indices, 4)
        return reference.weighted_combine(torch.tanh(reference.permute(x, sorted_token_ids)), weights, indices,
                                          inverse, 4, scale)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x, dispatch_inputs, weights, scale)
    assert_compiled_within_eager_error(out, layer(x, dispatch_inputs, weights, scale), layer_in_float64,
                                       (x, weights, scale), lambda x, w, s: (x, dispatch_inputs, w, s))


def test_combine_residual_sparse_torch_compile_fullgraph_on_cpu():
    y, weights, scale, dispatch, residual = fused_case(torch.Size((3, 4, 16)), 2, 4)

    def layer(y, weights, scale, indices, residual):
        dispatch = ops.moe_dispatch(indices, 4)
        return ops.combine_residual(torch.tanh(y), weights, residual, 0.5, seed=7, offset=3, expert_scale=scale,
                                    dispatch=dispatch)

    def layer_in_float64(y, weights, scale, indices, residual):
        _, _, inverse = reference.moe_dispatch(indices, 4)
        return reference.sparse_combine_residual(torch.tanh(y), weights, indices, inverse, 4, residual, 0.5, seed=7,
                                                 offset=3, expert_scale=scale)

    args = (y, weights, scale, dispatch.indices, residual)
    compiled = torch.compile(layer, fullgraph=True)
    # Inductor's tanh may differ from eager's in the last bit: both judged against float64.
    assert_compiled_within_eager_error(compiled(*args), layer(*args), layer_in_float64, (y, weights, scale, residual),
                                       lambda y, w, s, r: (y, w, s, dispatch.indices, r))


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_dispatch_validation(impl, request):
    use_impl(request, impl)
    good = make_indices(4, 2, 3)
    with pytest.raises(ValueError, match=r"moe_dispatch: indices must lie in \[0, num_experts=3\); got values in \[0, 3\]"):
        ops.moe_dispatch(torch.tensor([[0, 3]], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"got values in \[-1, 1\]"):
        ops.moe_dispatch(torch.tensor([[1, -1]], dtype=torch.int32), 3)
    with pytest.raises(TypeError, match="moe_dispatch: indices must have dtype int32 on cpu; got torch.int64"):
        ops.moe_dispatch(good.long(), 3)
    with pytest.raises(ValueError, match="moe_dispatch: indices must be 2-D; got shape"):
        ops.moe_dispatch(good.view(-1), 3)
    with pytest.raises(ValueError, match=r"moe_dispatch: num_experts must be in \[1, 8192\]; got 0"):
        ops.moe_dispatch(good, 0)
    with pytest.raises(TypeError, match="moe_dispatch: num_experts must be an int, got float"):
        ops.moe_dispatch(good, 3.0)


def test_permute_and_combine_validation():
    dispatch = ops.moe_dispatch(make_indices(4, 2, 3), 3)
    with pytest.raises(TypeError, match="permute: dispatch must be the Dispatch returned by astrea.ops.moe_dispatch"):
        ops.permute(torch.randn(4, 8), tuple(dispatch))
    with pytest.raises(ValueError, match=r"permute: x.shape\[0\] must equal the number of tokens N of dispatch = 4"):
        ops.permute(torch.randn(5, 8), dispatch)
    with pytest.raises(TypeError, match="permute: x must have dtype float32, float16, bfloat16 on cpu; got torch.int64"):
        ops.permute(torch.ones(4, 8, dtype=torch.long), dispatch)
    y, weights = torch.randn(8, 6), torch.rand(4, 2)
    with pytest.raises(ValueError, match=r"weighted_combine: weights must have the shape of dispatch.indices \(4, 2\); got \(4, 3\)"):
        ops.weighted_combine(y, torch.rand(4, 3), dispatch)
    with pytest.raises(ValueError, match=r"weighted_combine: expert_out.shape\[0\] must equal the N\*k rows of dispatch = 8"):
        ops.weighted_combine(torch.randn(7, 6), weights, dispatch)
    with pytest.raises(ValueError, match=r"weighted_combine: expert_scale.shape\[0\] must equal the number of experts E"):
        ops.weighted_combine(y, weights, dispatch, torch.rand(4))
    with pytest.raises(TypeError, match="weighted_combine: weights must have dtype float32, float16, bfloat16 on cpu; got torch.int32"):
        ops.weighted_combine(y, weights.int(), dispatch)
    with pytest.raises(TypeError, match="weighted_combine: expert_out must be a torch.Tensor, got list"):
        ops.weighted_combine([1.0], weights, dispatch)


# --- SparseMoE --------------------------------------------------------------------------


class TinyRouter(nn.Module):
    """Softmax top-k over a linear gate, renormalised; int32 indices."""

    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts)
        self.top_k = top_k

    def forward(self, x):
        probs = self.gate(x).softmax(-1)
        weights, indices = probs.topk(self.top_k, dim=-1)
        return SimpleNamespace(weights=weights / weights.sum(-1, keepdim=True), indices=indices.int(),
                               aux_loss=probs.mean(0).pow(2).sum())


class Scale(nn.Module):
    def __init__(self, num_experts: int):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(num_experts) + 0.5)


def naive_moe(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    tokens = x.reshape(-1, x.shape[-1])
    routing = moe.router(tokens)
    rows = []
    for t in range(tokens.shape[0]):
        row = 0
        for j in range(routing.indices.shape[1]):
            expert = int(routing.indices[t, j])
            scale = moe.allocator.scale[expert] if moe.allocator is not None else 1
            row = row + routing.weights[t, j] * scale * moe.experts[expert](tokens[t:t + 1])[0]
        rows.append(row)
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("impl", [*KERNELS, "reference"])
@pytest.mark.parametrize("with_allocator", [True, False])
def test_sparse_moe_equals_per_token_loop(impl, with_allocator, request):
    device = use_impl(request, impl)
    num_experts, dim, out_dim = 5, 12, 7
    experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, out_dim))
                            for _ in range(num_experts))
    moe = SparseMoE(experts, TinyRouter(dim, num_experts, top_k=2), Scale(num_experts) if with_allocator else None)
    moe.to(device)
    moe64 = copy.deepcopy(moe).double()  # the oracle's module, before a forward leaves tensors on moe
    x = torch.randn(3, 11, dim, device=device, requires_grad=True)
    out = moe(x)
    assert out.shape == (3, 11, out_dim)
    assert moe.aux_loss is not None and moe.aux_loss.ndim == 0
    # The loop in fp32 is PyTorch's own computation; in float64 (a copy of the module), the oracle.
    own = naive_moe(moe, x)
    (x64,) = float64_leaves(x)
    expected = naive_moe(moe64, x64)
    assert_within_torch_error(out, expected, own, what="out")
    params, params64 = [x, *moe.parameters()], [x64, *moe64.parameters()]
    got = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
    torch_grads = torch.autograd.grad(own.square().sum(), params, allow_unused=True)
    want = torch.autograd.grad(expected.square().sum(), params64, allow_unused=True)
    for g, w, t in zip(got, want, torch_grads):
        if w is None:  # an expert no token chose
            assert g is None or not g.any()
        else:
            assert_within_torch_error(g, w, t, what="grad")


def test_sparse_moe_rejects_bad_arguments():
    with pytest.raises(TypeError, match="SparseMoE: experts must be a GroupedExperts or a non-empty nn.ModuleList; "
                                        "got list"):
        SparseMoE([nn.Linear(4, 4)], TinyRouter(4, 1, 1))
    experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 5)])
    moe = SparseMoE(experts, TinyRouter(4, 2, 2))
    with pytest.raises(ValueError, match=r"SparseMoE: every expert must return the same feature size; got \[4, 5\]"):
        moe(torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"moe_dispatch: indices must lie in \[0, num_experts=2\)"):
        SparseMoE(experts, lambda x: SimpleNamespace(weights=torch.ones(x.shape[0], 1),
                                                     indices=torch.full((x.shape[0], 1), 2, dtype=torch.int32)))(
            torch.randn(6, 4))
