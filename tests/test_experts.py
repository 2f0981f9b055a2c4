"""The grouped experts op (astrea.ops.moe_experts), GroupedExperts and SparseMoE on it: against a
float64 reference, with errors judged against PyTorch's own computation in the same dtype. The
Triton kernels run on CPU tensors under the interpreter: their cases keep few programs."""

import copy

import pytest
import torch
import torch.nn.functional as F

import astrea
from astrea import ops, reference
from astrea.nn import GroupedExperts, SparseMoE, TopKRouter
from astrea.ops import experts as experts_op
from tests.utils import CHOICE_OF, assert_within_torch_error, route_float64, running, strided

OPS_UNDER_TEST = ("moe_experts",)
# The op's implementations: the Triton kernels, torch's grouped GEMMs (what CPU tensors run
# under auto), and the reference (one matmul per expert).
IMPLS = ("triton", "torch", "reference")


def make_case(num_tokens, hidden, intermediate, num_experts, top_k, dtype=torch.float32, *, gated=True,
              skew=False, scale=True):
    """Inputs of one layer: softmax top-k routing, weights of nn.Linear scale."""
    x = torch.randn(num_tokens, hidden).to(dtype)
    rows = 2 * intermediate if gated else intermediate
    gate_up = (torch.randn(num_experts, rows, hidden) / hidden**0.5).to(dtype)
    down = (torch.randn(num_experts, hidden, intermediate) / intermediate**0.5).to(dtype)
    logits = torch.randn(num_tokens, num_experts) * 3
    if skew:  # every token prefers expert 0, and the last experts get none
        logits[:, 0] += 100
        logits[:, num_experts // 2:] -= 100
    weights, indices = logits.softmax(-1).topk(top_k)
    expert_scale = torch.rand(num_experts) + 0.5 if scale else None
    return x, indices.to(torch.int32), gate_up, down, weights, expert_scale


def run(case, activation="silu", gated=True):
    x, indices, gate_up, down, weights, scale = case
    dispatch = ops.moe_dispatch(indices, gate_up.shape[0])
    return ops.moe_experts(x, dispatch, gate_up, down, weights, activation=activation, gated=gated, expert_scale=scale)


def float64_reference(case, activation="silu", gated=True):
    x, indices, gate_up, down, weights, scale = case
    return reference.moe_experts(x.double(), indices, gate_up.double(), down.double(), weights.double(), activation,
                                 gated, None if scale is None else scale.double())


def torch_eager(case, activation="silu", gated=True):
    """The layer as PyTorch computes it in the inputs' dtype (transformers' eager experts):
    the error the kernels are judged against."""
    x, indices, gate_up, down, weights, scale = case
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        tokens, slots = (indices == e).nonzero(as_tuple=True)
        pre = F.linear(x[tokens], gate_up[e])
        if gated:
            gate, up = pre.chunk(2, dim=-1)
            hidden = experts_op.ACTIVATIONS[activation](gate) * up
        else:
            hidden = experts_op.ACTIVATIONS[activation](pre)
        coef = weights[tokens, slots] * (scale[e] if scale is not None else 1)
        out.index_add_(0, tokens, (F.linear(hidden, down[e]) * coef[:, None].to(x.dtype)).to(x.dtype))
    return out


def _grads(fn, case, grad):
    x, indices, gate_up, down, weights, scale = case
    leaves = [t.detach().clone().requires_grad_() for t in (x, gate_up, down, weights, scale)]
    out = fn((leaves[0], indices, leaves[1], leaves[2], leaves[3], leaves[4]))
    return out, torch.autograd.grad(out, leaves, grad.to(out.dtype))


# (N, H, I, E, k): odd and aligned sizes, N = 1, k = 1 and 8, E not a power of two; H = 33
# and I = 200 are not 16-byte aligned in fp32 rows for grouped_mm (the per-expert path).
SHAPES = [(1, 32, 64, 6, 1), (37, 32, 64, 6, 2), (50, 33, 200, 60, 8), (40, 64, 32, 160, 2), (64, 48, 16, 8, 8)]
# Under the interpreter E = 160 would cost hundreds of weight-gradient programs for no new path.
IMPL_SHAPES = [(impl, shape) for impl in IMPLS for shape in SHAPES if impl != "triton" or shape[3] <= 60]


@pytest.mark.parametrize("impl, shape", IMPL_SHAPES,
                         ids=lambda p: p if isinstance(p, str) else "N{}-H{}-I{}-E{}-k{}".format(*p))
def test_forward_backward_fp32_against_float64(impl, shape):
    case = make_case(*shape)
    grad = torch.randn(shape[0], shape[1], dtype=torch.float64)
    expected, expected_grads = _grads(float64_reference, case, grad)
    eager, eager_grads = _grads(torch_eager, case, grad)
    with running(impl, *OPS_UNDER_TEST):
        out, got_grads = _grads(run, case, grad)
    assert out.dtype == torch.float32
    assert_within_torch_error(out, expected, eager, what="out")
    for name, g, e, t in zip(("x", "gate_up", "down", "weights", "scale"), got_grads, expected_grads, eager_grads):
        assert_within_torch_error(g, e, t, what=f"grad {name}")


@pytest.mark.parametrize("impl", ("triton", "torch"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation, gated", [("silu", True), ("gelu", False)])
def test_low_precision_against_pytorchs_own_error(impl, dtype, activation, gated):
    """16-bit operands (widened before the interpreter's dot, as its 16-bit product is wrong)."""
    case = make_case(48, 32, 64, 8, 2, dtype, gated=gated)
    grad = torch.randn(48, 32, dtype=torch.float64)
    expected, expected_grads = _grads(lambda c: float64_reference(c, activation, gated), case, grad)
    eager, eager_grads = _grads(lambda c: torch_eager(c, activation, gated), case, grad)
    with running(impl, *OPS_UNDER_TEST):
        out, got_grads = _grads(lambda c: run(c, activation, gated), case, grad)
    assert out.dtype == dtype
    assert_within_torch_error(out, expected, eager, what=f"{dtype} out")
    for name, g, e, t in zip(("x", "gate_up", "down", "weights", "scale"), got_grads, expected_grads, eager_grads):
        assert_within_torch_error(g, e, t, what=f"{dtype} grad {name}")


@pytest.mark.parametrize("impl", ("triton", "torch"))
@pytest.mark.parametrize("activation", sorted(experts_op.ACTIVATIONS))
@pytest.mark.parametrize("gated", [True, False])
def test_every_activation(impl, activation, gated):
    case = make_case(30, 32, 16, 4, 2, gated=gated)
    grad = torch.randn(30, 32, dtype=torch.float64)
    expected, expected_grads = _grads(lambda c: float64_reference(c, activation, gated), case, grad)
    eager, eager_grads = _grads(lambda c: torch_eager(c, activation, gated), case, grad)
    with running(impl, *OPS_UNDER_TEST):
        out, got_grads = _grads(lambda c: run(c, activation, gated), case, grad)
    assert_within_torch_error(out, expected, eager, what=f"{activation} out")
    for g, e, t in zip(got_grads, expected_grads, eager_grads):
        assert_within_torch_error(g, e, t, what=f"{activation} grads")


@pytest.mark.parametrize("impl", IMPLS)
def test_one_expert_takes_every_token_and_others_none(impl):
    case = make_case(40, 32, 64, 6, 2, skew=True)
    grad = torch.randn(40, 32, dtype=torch.float64)
    expected, expected_grads = _grads(float64_reference, case, grad)
    eager, eager_grads = _grads(torch_eager, case, grad)
    with running(impl, *OPS_UNDER_TEST):
        out, got_grads = _grads(run, case, grad)
    assert_within_torch_error(out, expected, eager, what="out")
    assert not got_grads[1][3:].any() and not got_grads[2][3:].any(), "experts without tokens get zero gradients"
    for g, e, t in zip(got_grads, expected_grads, eager_grads):
        assert_within_torch_error(g, e, t, what="grads")


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_x_and_weights(impl):
    case = make_case(37, 32, 64, 6, 2)
    x, indices, gate_up, down, weights, scale = case
    grad = torch.randn(37, 32, dtype=torch.float64)
    expected, expected_grads = _grads(float64_reference, case, grad)
    eager, eager_grads = _grads(torch_eager, case, grad)
    with running(impl, *OPS_UNDER_TEST):
        got, got_grads = _grads(run, (strided(x), indices, gate_up, down, strided(weights), scale), grad)
    assert_within_torch_error(got, expected, eager, what="strided x")
    for g, e, t in zip(got_grads, expected_grads, eager_grads):
        assert_within_torch_error(g, e, t, what="grads of strided x")


def test_weight_stacks_are_taken_in_their_strides_by_the_kernels():
    """transformers' layout as given: a transposed view of the stacks runs without a copy."""
    case = make_case(20, 32, 16, 4, 2)
    x, indices, gate_up, down, weights, scale = case
    gate_up_t = gate_up.transpose(1, 2).contiguous().transpose(1, 2)
    down_t = down.transpose(1, 2).contiguous().transpose(1, 2)
    with running("triton", *OPS_UNDER_TEST):
        got = run((x, indices, gate_up_t, down_t, weights, scale))
    assert_within_torch_error(got, float64_reference(case), torch_eager(case), what="transposed weight stacks")


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    x, indices, gate_up, down, weights, scale = make_case(0, 32, 64, 6, 2)
    x.requires_grad_()
    with running(impl, *OPS_UNDER_TEST):
        out = run((x, indices, gate_up, down, weights, scale))
    assert out.shape == (0, 32)
    out.sum().backward()
    assert x.grad.shape == (0, 32)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_float64(impl):
    x, indices, gate_up, down, weights, scale = make_case(9, 5, 6, 3, 2, torch.float64)
    dispatch = ops.moe_dispatch(indices, 3)
    leaves = [t.requires_grad_() for t in (x, gate_up, down, weights.double(), scale.double())]
    # The interpreter runs each Triton program in milliseconds: gradcheck's fast mode (a few
    # random directions) keeps the kernels' float64 check short.
    with running(impl, *OPS_UNDER_TEST):
        assert torch.autograd.gradcheck(
            lambda x, g, d, w, s: ops.moe_experts(x, dispatch, g, d, w, expert_scale=s), leaves,
            fast_mode=impl == "triton")


@pytest.mark.parametrize("impl", ("triton", "torch"))
def test_bitwise_reproducible_across_runs_and_thread_counts(impl):
    case = make_case(64, 32, 64, 8, 2)
    grad = torch.randn(64, 32, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 2):
            torch.set_num_threads(count)
            with running(impl, *OPS_UNDER_TEST):
                out, grads = _grads(run, case, grad)
            results.append((out, *grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    x, indices, gate_up, down, weights, scale = make_case(20, 32, 16, 4, 2)
    dispatch = ops.moe_dispatch(indices, 4)
    coef_rows = torch.rand(40, requires_grad=True)
    args = (x.requires_grad_(), dispatch.sorted_token_ids, dispatch.inverse_positions, dispatch.expert_offsets,
            gate_up.requires_grad_(), down.requires_grad_(), coef_rows, "silu", True, True, CHOICE_OF[impl])
    torch.library.opcheck(torch.ops.astrea.moe_experts.default, args)
    out, pre = torch.ops.astrea.moe_experts(*args)
    torch.library.opcheck(torch.ops.astrea.moe_experts_backward.default,
                          (torch.randn(20, 32), *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:7]],
                           pre.detach(), "silu", True, args[-1]))
    # Inference keeps no pre-activation rows, and gives the same output.
    inference_args = (*[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:-2]], False, args[-1])
    torch.library.opcheck(torch.ops.astrea.moe_experts.default, inference_args)
    inference_out, no_pre = torch.ops.astrea.moe_experts(*inference_args)
    assert no_pre.shape == (0, 32)
    assert torch.equal(inference_out, out.detach())


def _layer_and_grads(moe, x):
    x = x.detach().clone().requires_grad_()
    out = moe(x)
    return out, torch.autograd.grad(out.square().sum(), [x, *moe.parameters()])


def _float64_layer_and_grads(moe, x, monkeypatch):
    """The layer's float64 oracle: a float64 copy run on the ops' references."""
    with monkeypatch.context() as patch:
        route_float64(patch)
        return _layer_and_grads(copy.deepcopy(moe).double(), x.double())


def test_sparse_moe_with_grouped_experts_compiles_fullgraph(monkeypatch):
    """No host sync anywhere in the layer: torch.compile(fullgraph=True) takes it whole, within
    4x the eager layer's own fp32 error against float64."""
    torch.manual_seed(0)
    moe = SparseMoE(GroupedExperts(8, 32, 64), TopKRouter(32, 8, 2))
    x = torch.randn(4, 16, 32)
    expected, expected_grads = _float64_layer_and_grads(moe, x, monkeypatch)  # copies moe before it runs
    eager, eager_grads = _layer_and_grads(moe, x)
    out, grads = _layer_and_grads(torch.compile(moe, fullgraph=True), x)
    assert_within_torch_error(out, expected, eager, what="compiled SparseMoE")
    for g, e, t in zip(grads, expected_grads, eager_grads):
        assert_within_torch_error(g, e, t, what="compiled grads")


def test_moe_experts_with_expert_scale_compiles_fullgraph():
    """The scale's fixed-order backward (a segment sum over dispatch rows) traces whole too."""
    x, indices, gate_up, down, weights, scale = make_case(24, 32, 16, 4, 2)
    dispatch = ops.moe_dispatch(indices, 4)

    def layer(x, gate_up, down, weights, scale):
        return ops.moe_experts(x, dispatch, gate_up, down, weights, expert_scale=scale)

    leaves = [t.requires_grad_() for t in (x, gate_up, down, weights, scale)]
    expected = torch.autograd.grad(layer(*leaves).sum(), leaves)
    got = torch.autograd.grad(torch.compile(layer, fullgraph=True, backend="aot_eager")(*leaves).sum(), leaves)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_grouped_experts_equal_a_module_list_of_the_same_experts(monkeypatch):
    torch.manual_seed(0)
    grouped = GroupedExperts(4, 16, 24, activation="gelu", gated=False)
    listed = torch.nn.ModuleList()
    for e in range(4):
        ffn = torch.nn.Sequential(torch.nn.Linear(16, 24, bias=False), torch.nn.GELU(),
                                  torch.nn.Linear(24, 16, bias=False))
        ffn[0].weight.data.copy_(grouped.gate_up.data[e])
        ffn[2].weight.data.copy_(grouped.down.data[e])
        listed.append(ffn)
    router = TopKRouter(16, 4, 2)
    x = torch.randn(3, 10, 16)
    looped = SparseMoE(listed, router)
    expected, _ = _float64_layer_and_grads(looped, x, monkeypatch)
    assert_within_torch_error(SparseMoE(grouped, router)(x), expected, looped(x), what="grouped vs loop")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(activation="tanh"), ValueError, "moe_experts: activation must be one of"),
    (dict(gated="yes"), TypeError, "moe_experts: gated must be a bool"),
    (dict(down=torch.randn(4, 32, 17)), ValueError, r"moe_experts: gate_up.shape\[1\] must equal 2 \* I"),
    (dict(gate_up=torch.randn(5, 32, 32)), ValueError, r"moe_experts: gate_up.shape\[0\] must equal the number of "
                                                       "experts E of dispatch = 4"),
    (dict(down=torch.randn(4, 32, 16).double()), TypeError, "moe_experts: down must have x's dtype"),
    (dict(weights=torch.rand(20, 3)), ValueError, "moe_experts: weights must have the shape of dispatch.indices"),
    (dict(x=torch.randn(20, 32, dtype=torch.float64).to(torch.int32)), TypeError, "moe_experts: x must have dtype"),
])
def test_bad_inputs_raise_naming_the_argument(kwargs, error, match):
    x, indices, gate_up, down, weights, _ = make_case(20, 32, 16, 4, 2)
    args = dict(x=x, dispatch=ops.moe_dispatch(indices, 4), gate_up=gate_up, down=down, weights=weights)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ops.moe_experts(**args)


def test_backend_reference_runs_the_per_expert_path(monkeypatch):
    calls = []
    original = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or original(*a, **k))
    case = make_case(20, 32, 16, 4, 2)
    with astrea.backend("reference"):
        run(case)
    assert not calls
    run(case)
    assert calls, "aligned shapes run torch's grouped_mm"


def test_cpu_tensors_run_torch_under_auto_and_the_kernels_under_triton():
    cpu = torch.device("cpu")
    with astrea.backend("auto"):
        assert experts_op.SPEC.choose(cpu) == "torch"
        assert experts_op.SPEC.describe("cuda") == "triton"
    with astrea.backend("triton"):
        assert experts_op.SPEC.choose(cpu) == "triton"


def test_triton_slots_of_out_of_range_experts_add_nothing():
    """On CUDA the dispatch places slots of out-of-range experts after expert_offsets[E]
    instead of syncing to reject them: the kernels compute no row for them and sum none."""
    from astrea.kernels.dispatch import dispatch_forward

    x, indices, gate_up, down, weights, scale = make_case(24, 32, 16, 4, 2)
    dropped = indices.clone()
    dropped[::3, 1] = 4  # expert 4 of 4: out of range
    dispatch = ops.Dispatch(*dispatch_forward(dropped, 4), dropped)
    assert int(dispatch.expert_offsets[-1]) < dropped.numel()
    kept = weights * (dropped < 4)
    expected = reference.moe_experts(x.double(), indices, gate_up.double(), down.double(), kept.double(), "silu",
                                     True, scale.double())
    leaves = [t.clone().requires_grad_() for t in (x, weights)]
    with running("triton", *OPS_UNDER_TEST):
        out = ops.moe_experts(leaves[0], dispatch, gate_up, down, leaves[1], expert_scale=scale)
        out.sum().backward()
    torch_value = reference.moe_experts(x, indices, gate_up, down, kept, "silu", True, scale)
    assert_within_torch_error(out, expected, torch_value, what="out with dropped slots")
    assert not leaves[1].grad[dropped >= 4].any(), "dropped slots get no weight gradient"


@pytest.mark.parametrize("gated", [True, False])
def test_kernels_with_the_gpu_tiles(gated):
    """The tiles CUDA tensors get (narrowed column tiles, 16-deep fp32 steps, several K steps
    and row tiles per expert), run in fp32 under the interpreter, against the torch steps."""
    from astrea.kernels.experts import experts_backward, experts_forward

    x, indices, gate_up, down, weights, _ = make_case(120, 48, 40, 3, 2, gated=gated)
    dispatch = ops.moe_dispatch(indices, 3)
    assert dispatch.expert_offsets.diff().max() > 64, "an expert spans several 64-row tiles"
    coef_rows = torch.rand(240)
    args = (x, dispatch.sorted_token_ids, dispatch.inverse_positions, dispatch.expert_offsets, gate_up, down,
            coef_rows, "gelu_tanh", gated)
    grad = torch.randn(120, 48)
    args64 = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    out, pre = experts_forward(*args, interpreter=False)
    torch_out, torch_pre = experts_op._forward(*args, True, grouped=False)
    expected, expected_pre = experts_op._forward(*args64, True, grouped=False)
    assert_within_torch_error(out, expected, torch_out, what="out")
    assert_within_torch_error(pre, expected_pre, torch_pre, what="pre")
    got = experts_backward(grad, *args[:7], pre, "gelu_tanh", gated, interpreter=False)
    torch_grads = experts_op._backward(grad, *args[:7], torch_pre, "gelu_tanh", gated, grouped=False)
    expected_grads = experts_op._backward(grad.double(), *args64[:7], expected_pre, "gelu_tanh", gated, grouped=False)
    for g, e, t, name in zip(got, expected_grads, torch_grads, ("x", "gate_up", "down", "coef_rows")):
        assert_within_torch_error(g, e, t, what=f"grad {name}")


@pytest.mark.parametrize("impl", ("triton", "reference"))
def test_triton_path_reads_nothing_on_the_host(impl, monkeypatch):
    """Forward and backward of the kernels read no tensor value on the host (the offsets stay
    on the device; the grid is a bound from the shapes): any item/tolist/int/bool of a tensor
    fails. The reference, which reads the offsets, shows that the check bites."""
    x, indices, gate_up, down, weights, scale = make_case(20, 32, 16, 4, 2)
    dispatch = ops.moe_dispatch(indices, 4)
    leaves = [t.requires_grad_() for t in (x, gate_up, down, weights, scale)]

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    with running(impl, *OPS_UNDER_TEST):
        for name in ("item", "tolist", "__int__", "__bool__"):
            monkeypatch.setattr(torch.Tensor, name, host_read)
        try:
            out = ops.moe_experts(leaves[0], dispatch, *leaves[1:4], expert_scale=leaves[4])
            torch.autograd.grad(out.sum(), leaves)
        except AssertionError:
            if impl == "triton":
                raise
        else:
            assert impl == "triton", "the reference reads its offsets on the host"
        finally:
            monkeypatch.undo()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_on_cuda_syncs_nothing_and_captures_in_a_cuda_graph():
    case = [t.cuda() if t is not None else None for t in make_case(256, 64, 128, 8, 2)]
    x, indices, gate_up, down, weights, scale = case
    dispatch = ops.moe_dispatch(indices, 8)
    leaves = [t.clone().requires_grad_() for t in (x, gate_up, down, weights)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.moe_experts(leaves[0], dispatch, *leaves[1:], expert_scale=scale)
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = ops.moe_experts(x, dispatch, gate_up, down, weights, expert_scale=scale)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, out.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_weight_gradient_kernel_sums_each_experts_rows(dtype):
    """astrea::grouped_weight_grad_cpu (the CPU weight gradients): out[e] = a[:, rows of e] @ b[rows of e],
    zeros for an expert without rows, any strides; exact against per-expert float64 products rounded once."""
    from astrea import _extension

    if not _extension.has_kernel("grouped_weight_grad_cpu", "CPU"):
        pytest.skip("astrea._C is not built with grouped_weight_grad_cpu")
    generator = torch.Generator().manual_seed(3)
    offsets = torch.tensor([0, 70, 70, 71, 200], dtype=torch.int64)  # experts of 70, 0, 1 and 129 rows
    a = torch.randn(200, 131, generator=generator).to(dtype).t()  # [131, 200], column-major
    b = strided(torch.randn(200, 45, generator=generator).to(dtype))
    out = torch.ops.astrea.grouped_weight_grad_cpu(a, b, offsets)
    assert out.shape == (4, 131, 45) and out.dtype == dtype
    assert not out[1].any()
    bounds = offsets.tolist()
    for e, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        exact = a[:, lo:hi].double() @ b[lo:hi].double()
        # Each element sums hi - lo products in the dtype's accumulation: a bound of that length.
        accumulation = torch.float64 if dtype == torch.float64 else torch.float32
        bound = (hi - lo + 1) * torch.finfo(accumulation).eps * (a[:, lo:hi].double().abs() @ b[lo:hi].double().abs())
        bound += torch.finfo(dtype).eps * exact.abs()  # the rounding to the output dtype
        assert ((out[e].double() - exact).abs() <= bound).all(), f"expert {e}"
    torch.library.opcheck(torch.ops.astrea.grouped_weight_grad_cpu.default, (a, b, offsets))
    with pytest.raises(ValueError, match="offsets must ascend"):
        torch.ops.astrea.grouped_weight_grad_cpu(a, b, torch.tensor([0, 90, 80, 200]))
