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
from astrea.reference import experts as reference_experts
from tests.utils import (CHOICE_OF, accumulation_bound, assert_bitwise_reproducible, assert_within,
                         assert_within_torch_error, route_float64, running, strided)

OPS_UNDER_TEST = ("moe_experts",)
# The op's implementations: the Triton kernels, torch's grouped GEMMs (what CPU tensors run
# under auto), and the reference (one matmul per expert).
IMPLS = ("triton", "torch", "reference")
# Those with biases, the interleaved layout and clamped_swiglu.
FEATURE_IMPLS = ("triton", "torch", "reference")


def make_case(num_tokens, hidden, intermediate, num_experts, top_k, dtype=torch.float32, *, gated=True,
              skew=False, scale=True, biases=(), pre_scale=1.0):
    """Inputs of one layer: softmax top-k routing, weights of nn.Linear scale (gate_up's times
    ``pre_scale``, to reach the clamps of clamped_swiglu); ``biases`` names those given
    (``gate_up``, ``down``), appended to the case as (gate_up_bias, down_bias)."""
    x = torch.randn(num_tokens, hidden).to(dtype)
    rows = 2 * intermediate if gated else intermediate
    gate_up = (torch.randn(num_experts, rows, hidden) * (pre_scale / hidden**0.5)).to(dtype)
    down = (torch.randn(num_experts, hidden, intermediate) / intermediate**0.5).to(dtype)
    logits = torch.randn(num_tokens, num_experts) * 3
    if skew:  # every token prefers expert 0, and the last experts get none
        logits[:, 0] += 100
        logits[:, num_experts // 2:] -= 100
    weights, indices = logits.softmax(-1).topk(top_k)
    expert_scale = torch.rand(num_experts) + 0.5 if scale else None
    case = (x, indices.to(torch.int32), gate_up, down, weights, expert_scale)
    if not biases:
        return case
    gate_up_bias = (torch.randn(num_experts, rows) * pre_scale).to(dtype) if "gate_up" in biases else None
    down_bias = torch.randn(num_experts, hidden).to(dtype) if "down" in biases else None
    return (*case, gate_up_bias, down_bias)


def _split(case):
    """(x, indices, gate_up, down, weights, scale, gate_up_bias, down_bias) of a case with or without biases."""
    x, indices, gate_up, down, weights, scale, *biases = case
    return x, indices, gate_up, down, weights, scale, *(biases or (None, None))


def run(case, activation="silu", gated=True, **options):
    x, indices, gate_up, down, weights, scale, gate_up_bias, down_bias = _split(case)
    dispatch = ops.moe_dispatch(indices, gate_up.shape[0])
    return ops.moe_experts(x, dispatch, gate_up, down, weights, activation=activation, gated=gated, expert_scale=scale,
                           gate_up_bias=gate_up_bias, down_bias=down_bias, **options)


def _double(t):
    return None if t is None else t.double()


def float64_reference(case, activation="silu", gated=True, **options):
    x, indices, gate_up, down, weights, scale, gate_up_bias, down_bias = _split(case)
    return reference.moe_experts(x.double(), indices, gate_up.double(), down.double(), weights.double(), activation,
                                 gated, _double(scale), gate_up_bias=_double(gate_up_bias),
                                 down_bias=_double(down_bias), **options)


def torch_eager(case, activation="silu", gated=True, gate_up_layout="concatenated", swiglu_alpha=1.702,
                swiglu_limit=7.0):
    """The layer as PyTorch computes it in the inputs' dtype (transformers' eager experts,
    gpt-oss's among them): the error the kernels are judged against."""
    x, indices, gate_up, down, weights, scale, gate_up_bias, down_bias = _split(case)
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        tokens, slots = (indices == e).nonzero(as_tuple=True)
        pre = F.linear(x[tokens], gate_up[e], None if gate_up_bias is None else gate_up_bias[e])
        if gated:
            gate, up = reference_experts.split_gate_up(pre, gate_up_layout)
            hidden = reference_experts.gated_hidden(gate, up, activation, swiglu_alpha, swiglu_limit)
        else:
            hidden = experts_op.ACTIVATIONS[activation](pre)
        coef = weights[tokens, slots] * (scale[e] if scale is not None else 1)
        y = F.linear(hidden, down[e], None if down_bias is None else down_bias[e])
        out.index_add_(0, tokens, (y * coef[:, None].to(x.dtype)).to(x.dtype))
    return out


def _grads(fn, case, grad):
    """fn's output and its gradients in the case's floating tensors that are given, in case order
    (x, gate_up, down, weights, scale, gate_up_bias, down_bias)."""
    leaves = tuple(t if t is None or not t.is_floating_point() else t.detach().clone().requires_grad_() for t in case)
    out = fn(leaves)
    inputs = [t for t in leaves if t is not None and t.requires_grad]
    return out, torch.autograd.grad(out, inputs, grad.to(out.dtype))


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
    x, indices, gate_up, down, weights, scale, gate_up_bias, down_bias = make_case(0, 32, 64, 6, 2,
                                                                                   biases=("gate_up", "down"))
    leaves = [t.requires_grad_() for t in (x, gate_up_bias, down_bias)]
    with running(impl, *OPS_UNDER_TEST):
        out = run((x, indices, gate_up, down, weights, scale, gate_up_bias, down_bias))
    assert out.shape == (0, 32)
    out.sum().backward()
    assert x.grad.shape == (0, 32)
    assert all(t.grad.shape == t.shape and not t.grad.any() for t in leaves[1:]), "zero bias gradients"


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


# The options of the registered op after its tensors: activation, gated, interleaved, alpha, limit.
PLAIN_FFN = ("silu", True, False, 1.702, 7.0)
GPT_OSS_FFN = ("clamped_swiglu", True, True, 1.702, 0.5)


@pytest.mark.parametrize("impl, features", [(impl, "plain") for impl in IMPLS] +
                         [(impl, "gpt-oss") for impl in FEATURE_IMPLS])
def test_opcheck(impl, features):
    """The registered ops as they are (plain) and with biases, the interleaved layout and
    clamped_swiglu (gpt-oss), on transposed weight views there."""
    gpt_oss = features == "gpt-oss"
    x, indices, gate_up, down, weights, scale, gate_up_bias, down_bias = _split(make_case(
        20, 32, 16, 4, 2, biases=("gate_up", "down") if gpt_oss else ()))
    if gpt_oss:
        gate_up, down = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (gate_up, down))
    dispatch = ops.moe_dispatch(indices, 4)
    coef_rows = torch.rand(40, requires_grad=True)
    biases = tuple(None if b is None else b.requires_grad_() for b in (gate_up_bias, down_bias))
    ffn = GPT_OSS_FFN if gpt_oss else PLAIN_FFN
    tensors = (x.requires_grad_(), dispatch.sorted_token_ids, dispatch.inverse_positions, dispatch.expert_offsets,
               gate_up.requires_grad_(), down.requires_grad_(), coef_rows, *biases)
    args = (*tensors, *ffn, True, CHOICE_OF[impl])
    torch.library.opcheck(torch.ops.astrea.moe_experts.default, args)
    out, pre = torch.ops.astrea.moe_experts(*args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in tensors]
    torch.library.opcheck(torch.ops.astrea.moe_experts_backward.default,
                          (torch.randn(20, 32), *detached, pre.detach(), *ffn, CHOICE_OF[impl]))
    # Inference keeps no pre-activation rows, and gives the same output.
    inference_args = (*detached, *ffn, False, CHOICE_OF[impl])
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


ARGUMENT_MISTAKES = [
    (dict(activation="tanh"), ValueError, "moe_experts: activation must be one of"),
    (dict(gated="yes"), TypeError, "moe_experts: gated must be a bool"),
    (dict(down=torch.randn(4, 32, 17)), ValueError, r"moe_experts: gate_up.shape\[1\] must equal 2 \* I"),
    (dict(gate_up=torch.randn(5, 32, 32)), ValueError, r"moe_experts: gate_up.shape\[0\] must equal the number of "
                                                       "experts E of dispatch = 4"),
    (dict(down=torch.randn(4, 32, 16).double()), TypeError, "moe_experts: down must have x's dtype"),
    (dict(weights=torch.rand(20, 3)), ValueError, "moe_experts: weights must have the shape of dispatch.indices"),
    (dict(x=torch.randn(20, 32, dtype=torch.float64).to(torch.int32)), TypeError, "moe_experts: x must have dtype"),
]


# The gpt-oss / Nemotron-H arguments: biases, gate/up layout, clamped_swiglu.
GPT_OSS_ARGUMENT_MISTAKES = [
    (dict(activation="clamped_swiglu", gated=False), ValueError,
     "moe_experts: activation 'clamped_swiglu' gates the up half, so it needs gated=True"),
    (dict(gate_up_layout="blocked"), ValueError, "moe_experts: gate_up_layout must be one of 'concatenated', "
                                                 "'interleaved'; got 'blocked'"),
    (dict(gate_up_layout="interleaved", gated=False), ValueError,
     "moe_experts: gate_up_layout 'interleaved' places gate and up rows, so it needs gated=True"),
    (dict(swiglu_alpha="1.7"), TypeError, "moe_experts: swiglu_alpha must be a float, got str"),
    (dict(swiglu_alpha=float("nan")), ValueError, "moe_experts: swiglu_alpha must be a finite number; got nan"),
    (dict(swiglu_limit=0.0), ValueError, "moe_experts: swiglu_limit must be a positive finite number; got 0.0"),
    (dict(gate_up_bias=torch.randn(32)), ValueError, r"moe_experts: gate_up_bias must be 2-D; got shape \(32,\)"),
    (dict(gate_up_bias=torch.randn(5, 32)), ValueError, r"moe_experts: gate_up_bias.shape\[0\] must equal the number "
                                                        "of experts E of dispatch = 4"),
    (dict(gate_up_bias=torch.randn(4, 16)), ValueError, r"moe_experts: gate_up_bias.shape\[1\] must equal "
                                                        r"gate_up.shape\[1\] \(2 \* I gated, I ungated\) = 32"),
    (dict(gate_up_bias=torch.randn(4, 32).double()), TypeError, "moe_experts: gate_up_bias must have x's dtype "
                                                                "torch.float32; got torch.float64"),
    (dict(gate_up_bias=torch.ones(4, 32, dtype=torch.int32)), TypeError, "moe_experts: gate_up_bias must have dtype"),
    (dict(down_bias=torch.randn(4, 16)), ValueError, r"moe_experts: down_bias.shape\[1\] must equal the hidden size "
                                                     r"H = x.shape\[1\] = 32"),
    (dict(down_bias=torch.randn(4, 32).half()), TypeError, "moe_experts: down_bias must have x's dtype"),
    (dict(down_bias=torch.randn(4, 32, device="meta")), ValueError,
     "moe_experts: all tensors must be on one device; got .*down_bias on meta"),
]


@pytest.mark.parametrize("kwargs, error, match", ARGUMENT_MISTAKES + GPT_OSS_ARGUMENT_MISTAKES)
def test_bad_inputs_raise_naming_the_argument(kwargs, error, match):
    x, indices, gate_up, down, weights, _ = make_case(20, 32, 16, 4, 2)
    args = dict(x=x, dispatch=ops.moe_dispatch(indices, 4), gate_up=gate_up, down=down, weights=weights)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ops.moe_experts(**args)


def _record_grouped_gemms(monkeypatch, extension: bool = True) -> list[str]:
    """The names of the grouped GEMMs moe_experts calls from here on (F.grouped_mm and, with
    ``extension``, the C++ ones)."""
    calls = []

    def recording(name, function):
        return lambda *args, **kwargs: calls.append(name) or function(*args, **kwargs)

    monkeypatch.setattr(F, "grouped_mm", recording("F.grouped_mm", F.grouped_mm))
    for name in ("grouped_mm_cpu", "grouped_weight_grad_cpu") if extension else ():
        monkeypatch.setattr(torch.ops.astrea, name, recording(name, getattr(torch.ops.astrea, name)))
    return calls


def _forward_backward(case):
    leaves = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in case]
    run(leaves).sum().backward()


@pytest.mark.skipif(not astrea._extension.has_kernel("grouped_mm_cpu", "CPU"), reason="astrea._C is not built")
def test_cpu_runs_the_cpp_grouped_gemms_and_reference_the_per_expert_path(monkeypatch):
    calls = _record_grouped_gemms(monkeypatch)
    case = make_case(20, 32, 16, 4, 2)
    with astrea.backend("reference"):
        _forward_backward(case)
    assert not calls, f"the reference runs one matmul per expert, not {calls}"
    _forward_backward(case)
    assert calls.count("grouped_mm_cpu") == 4 and calls.count("grouped_weight_grad_cpu") == 2, calls
    assert "F.grouped_mm" not in calls, "on CPU tensors torch's grouped_mm sums in a thread-dependent order"


def test_without_the_extension_aligned_shapes_run_torchs_grouped_mm(monkeypatch):
    monkeypatch.setattr(experts_op._extension, "has_kernel", lambda *args: False)
    calls = _record_grouped_gemms(monkeypatch, extension=False)
    run(make_case(20, 32, 16, 4, 2))
    assert calls == ["F.grouped_mm", "F.grouped_mm"], calls


def test_cpu_tensors_run_torch_under_auto_and_the_kernels_under_triton():
    cpu = torch.device("cpu")
    with astrea.backend("auto"):
        assert experts_op.SPEC.choose(cpu) == "torch"
        assert experts_op.SPEC.describe("cuda") == "triton"
    with astrea.backend("triton"):
        assert experts_op.SPEC.choose(cpu) == "triton"


@pytest.mark.parametrize("biased", [False, True], ids=["no-bias", "biased"])
def test_triton_slots_of_out_of_range_experts_add_nothing(biased):
    """On CUDA the dispatch places slots of out-of-range experts after expert_offsets[E]
    instead of syncing to reject them: the kernels compute no row for them and sum none (no
    bias, and no bias gradient, from them either)."""
    from astrea.kernels.dispatch import dispatch_forward

    x, indices, gate_up, down, weights, scale, gate_up_bias, down_bias = _split(
        make_case(24, 32, 16, 4, 2, biases=("gate_up", "down") if biased else ()))
    dropped = indices.clone()
    dropped[::3, 1] = 4  # expert 4 of 4: out of range
    dispatch = ops.Dispatch(*dispatch_forward(dropped, 4), dropped)
    assert int(dispatch.expert_offsets[-1]) < dropped.numel()
    kept = weights * (dropped < 4)
    biases = tuple(t for t in (gate_up_bias, down_bias) if t is not None)

    def oracle(x, weights, *biases, dtype):
        gate_up_bias, down_bias = biases if biases else (None, None)
        return reference.moe_experts(x, indices, gate_up.to(dtype), down.to(dtype), weights, "silu", True,
                                     scale.to(dtype), gate_up_bias=gate_up_bias, down_bias=down_bias)

    expected_leaves = [t.double().requires_grad_() for t in (x, kept, *biases)]
    expected = oracle(*expected_leaves, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected.sum(), expected_leaves[2:]) if biased else ()
    torch_leaves = [t.clone().requires_grad_() for t in (x, kept, *biases)]
    torch_value = oracle(*torch_leaves, dtype=torch.float32)
    torch_grads = torch.autograd.grad(torch_value.sum(), torch_leaves[2:]) if biased else ()
    leaves = [t.clone().requires_grad_() for t in (x, weights, *biases)]
    with running("triton", *OPS_UNDER_TEST):
        out = ops.moe_experts(leaves[0], dispatch, gate_up, down, leaves[1], expert_scale=scale,
                              **dict(zip(("gate_up_bias", "down_bias"), leaves[2:])))
        out.sum().backward()
    assert_within_torch_error(out, expected, torch_value, what="out with dropped slots")
    assert not leaves[1].grad[dropped >= 4].any(), "dropped slots get no weight gradient"
    for leaf, e, t in zip(leaves[2:], expected_grads, torch_grads):
        assert_within_torch_error(leaf.grad, e, t, what="bias gradient with dropped slots")


@pytest.mark.parametrize("features", ["gated", "ungated", "gpt-oss"])
def test_kernels_with_the_gpu_tiles(features):
    """The tiles CUDA tensors get (narrowed column tiles, 16-deep fp32 steps, several K steps
    and row tiles per expert), run in fp32 under the interpreter, against the torch steps;
    gpt-oss's experts (biases, interleaved rows, clamped_swiglu, transposed stacks) at a width
    (H = 144 = 2I) that takes two column blocks of the bias gradients' row sums."""
    from astrea.kernels.experts import experts_backward, experts_forward

    gpt_oss = features == "gpt-oss"
    gated = features != "ungated"
    hidden, intermediate = (144, 72) if gpt_oss else (48, 40)
    x, indices, gate_up, down, weights, _, gate_up_bias, down_bias = _split(make_case(
        120, hidden, intermediate, 3, 2, gated=gated, biases=("gate_up", "down") if gpt_oss else (),
        pre_scale=2.0 if gpt_oss else 1.0))
    if gpt_oss:
        gate_up, down = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (gate_up, down))
    dispatch = ops.moe_dispatch(indices, 3)
    assert dispatch.expert_offsets.diff().max() > 64, "an expert spans several 64-row tiles"
    coef_rows = torch.rand(240)
    tensors = (x, dispatch.sorted_token_ids, dispatch.inverse_positions, dispatch.expert_offsets, gate_up, down,
               coef_rows)
    tensors64 = tuple(a.double() if a.is_floating_point() else a for a in tensors)
    biases, biases64 = (gate_up_bias, down_bias), (_double(gate_up_bias), _double(down_bias))
    activation = "clamped_swiglu" if gpt_oss else "gelu_tanh"
    ffn = (activation, gated, gpt_oss, 1.702, 1.5)
    options = dict(gate_up_bias=gate_up_bias, down_bias=down_bias, interleaved=gpt_oss, swiglu_limit=1.5,
                   interpreter=False)
    grad = torch.randn(120, hidden)
    out, pre = experts_forward(*tensors, activation, gated, **options)
    torch_out, torch_pre = experts_op._forward(*tensors, *biases, *ffn, True, grouped=False)
    expected, expected_pre = experts_op._forward(*tensors64, *biases64, *ffn, True, grouped=False)
    assert_within_torch_error(out, expected, torch_out, what="out")
    assert_within_torch_error(pre, expected_pre, torch_pre, what="pre")
    got = experts_backward(grad, *tensors, pre, activation, gated, **options)
    torch_grads = experts_op._backward(grad, *tensors, *biases, torch_pre, *ffn, grouped=False)
    expected_grads = experts_op._backward(grad.double(), *tensors64, *biases64, expected_pre, *ffn, grouped=False)
    names = ("x", "gate_up", "down", "coef_rows", "gate_up_bias", "down_bias")
    for g, e, t, name in zip(got, expected_grads, torch_grads, names):
        assert g.stride() == t.stride(), f"grad {name} in the strides of its tensor"
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


# ---- biases, the interleaved layout, clamped_swiglu, relu2, transposed weight views ------------

_CASE_NAMES = ("x", "indices", "gate_up", "down", "weights", "scale", "gate_up_bias", "down_bias")
BIASES = {"gate_up": ("gate_up",), "down": ("down",), "both": ("gate_up", "down")}
# Every implementation in fp32; torch's (what CPU tensors run) in every dtype the op takes there.
FEATURE_DTYPES = [(impl, torch.float32) for impl in FEATURE_IMPLS] + [
    ("torch", dtype) for dtype in (torch.bfloat16, torch.float16, torch.float64)]
_dtype_id = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _ids(value):
    return _dtype_id.get(value, value) if not isinstance(value, tuple) else "-".join(map(_ids, value))


def _check_against_float64(impl, case, what, **options):
    """Output and every gradient of the op on ``impl`` within 4x PyTorch's own error in the case's
    dtype against the float64 reference (gradients of 16-bit products judged at that dtype's ulp)."""
    grad = torch.randn(case[0].shape, dtype=torch.float64)
    expected, expected_grads = _grads(lambda c: float64_reference(c, **options), case, grad)
    eager, eager_grads = _grads(lambda c: torch_eager(c, **options), case, grad)
    with running(impl, *OPS_UNDER_TEST):
        out, got_grads = _grads(lambda c: run(c, **options), case, grad)
    dtype = case[0].dtype
    assert out.dtype == dtype
    assert_within_torch_error(out, expected, eager, what=f"{what} out")
    names = [n for n, t in zip(_CASE_NAMES, case) if t is not None and t.is_floating_point()]
    assert len(names) == len(got_grads)
    for name, g, e, t in zip(names, got_grads, expected_grads, eager_grads):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_within_torch_error(g, e, t, what=f"{what} grad {name}", dtype=dtype)


@pytest.mark.parametrize("impl, dtype", FEATURE_DTYPES, ids=_ids)
@pytest.mark.parametrize("which", sorted(BIASES))
def test_biases(impl, dtype, which):
    case = make_case(37, 32, 64, 6, 2, dtype, biases=BIASES[which])
    _check_against_float64(impl, case, f"{which} bias")


@pytest.mark.parametrize("impl", FEATURE_IMPLS)
def test_biases_without_gating_and_with_relu2(impl):
    case = make_case(30, 32, 16, 4, 2, gated=False, biases=("gate_up", "down"))
    _check_against_float64(impl, case, "ungated relu2", activation="relu2", gated=False)


@pytest.mark.parametrize("impl, dtype", FEATURE_DTYPES, ids=_ids)
@pytest.mark.parametrize("biased", [False, True], ids=["no-bias", "biased"])
def test_interleaved_layout(impl, dtype, biased):
    case = make_case(37, 32, 64, 6, 2, dtype, biases=("gate_up", "down") if biased else ())
    _check_against_float64(impl, case, "interleaved", gate_up_layout="interleaved")


def test_reference_interleaved_layout_is_the_concatenated_one_with_rows_reordered():
    """The oracle's layouts agree: gate row i at 2i and up row i at 2i + 1 of gate_up and its bias."""
    x, indices, gate_up, down, weights, scale, gate_up_bias, down_bias = (
        _double(t) if t is not None and t.is_floating_point() else t
        for t in make_case(20, 16, 12, 4, 2, biases=("gate_up", "down")))
    order = torch.stack([torch.arange(12), torch.arange(12) + 12], dim=1).reshape(-1)  # gate 0, up 0, gate 1, ...
    for activation in ("silu", "clamped_swiglu"):
        concatenated = reference.moe_experts(x, indices, gate_up, down, weights, activation, True, scale,
                                             gate_up_bias=gate_up_bias, down_bias=down_bias, swiglu_limit=0.5)
        interleaved = reference.moe_experts(x, indices, gate_up[:, order], down, weights, activation, True, scale,
                                            gate_up_bias=gate_up_bias[:, order], down_bias=down_bias,
                                            gate_up_layout="interleaved", swiglu_limit=0.5)
        torch.testing.assert_close(interleaved, concatenated, rtol=1e-12, atol=1e-12)


def test_reference_activations_are_transformers():
    """clamped_swiglu is gpt-oss's GptOssExperts._apply_gate and relu2 transformers' ACT2FN["relu2"],
    bitwise, on values beyond both clamps."""
    from types import SimpleNamespace

    from transformers.activations import ACT2FN
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    pre = torch.randn(64, 2 * 24) * 8
    experts = SimpleNamespace(alpha=1.702, limit=7.0)
    gate, up = reference_experts.split_gate_up(pre, "interleaved")
    assert (gate > 7).any() and (up > 7).any() and (up < -7).any()
    assert torch.equal(reference_experts.clamped_swiglu(gate, up), GptOssExperts._apply_gate(experts, pre))
    assert torch.equal(experts_op.ACTIVATIONS["relu2"](pre), ACT2FN["relu2"](pre))


def _float64_pre(case):
    """Each routed slot's float64 pre-activations (gate_up @ x + bias)."""
    x, indices, gate_up, down, weights, scale, gate_up_bias, _ = _split(case)
    pre = torch.einsum("th,tjrh->tjr", x.double(), gate_up.double()[indices.long()])
    return pre if gate_up_bias is None else pre + gate_up_bias.double()[indices.long()]


@pytest.mark.parametrize("impl, dtype", FEATURE_DTYPES, ids=_ids)
@pytest.mark.parametrize("layout", experts_op.GATE_UP_LAYOUTS)
def test_clamped_swiglu_through_both_clamps(impl, dtype, layout):
    """gpt-oss's gate, alpha and limit set, on pre-activations beyond +-limit in both halves:
    forward and gradients (zero where a clamp holds) against the float64 reference."""
    options = dict(activation="clamped_swiglu", gate_up_layout=layout, swiglu_alpha=1.3, swiglu_limit=1.5)
    case = make_case(37, 32, 64, 6, 2, dtype, biases=("gate_up", "down"), pre_scale=2.0)
    gate, up = reference_experts.split_gate_up(_float64_pre(case), layout)
    assert (gate > 1.5).float().mean() > 0.1 and (gate < 1.5).float().mean() > 0.1
    assert (up > 1.5).float().mean() > 0.1 and (up < -1.5).float().mean() > 0.1
    _check_against_float64(impl, case, f"clamped_swiglu {layout}", **options)


@pytest.mark.parametrize("impl", FEATURE_IMPLS)
def test_clamped_swiglu_gradient_at_the_clamp_bounds(impl):
    """Pre-activations exactly at -limit and +limit (one-hot x: each is one weight) pass their
    gradient, as torch.clamp's derivative does there; beyond them it is zero."""
    limit = 1.5
    case = list(make_case(24, 8, 16, 3, 2))
    case[0] = F.one_hot(torch.arange(24) % 8, 8).float()
    values = torch.tensor([-2, -1, -0.5, 0.5, 1, 2]) * limit  # exact in fp32
    case[2] = values[torch.randint(0, 6, case[2].shape)]
    pre = _float64_pre(case)
    assert (pre == limit).any() and (pre == -limit).any()
    _check_against_float64(impl, tuple(case), "clamp bounds", activation="clamped_swiglu", swiglu_limit=limit)


GPT_OSS = dict(activation="clamped_swiglu", gate_up_layout="interleaved", swiglu_limit=1.5)


@pytest.mark.parametrize("impl", FEATURE_IMPLS)
def test_transposed_weight_views_run_without_a_weight_copy(impl):
    """Aria's and gpt-oss's stacks, gate_up_proj [E, H, 2I] and down_proj [E, I, H], passed as
    their transpose(1, 2) views: forward and backward allocate nothing weight-sized but the two
    weight gradients (a copy of a stack, or of a gradient into the stack's layout, would be a
    third), and the stacks get gradients in their own strides."""
    from torch.profiler import ProfilerActivity, profile

    x, indices, gate_up, down, weights, scale, gate_up_bias, down_bias = make_case(
        8, 64, 48, 4, 2, biases=("gate_up", "down"), pre_scale=2.0)
    gate_up_proj = gate_up.transpose(1, 2).contiguous().requires_grad_()
    down_proj = down.transpose(1, 2).contiguous().requires_grad_()
    views = (x, indices, gate_up_proj.transpose(1, 2), down_proj.transpose(1, 2), weights, scale, gate_up_bias,
             down_bias)
    grad = torch.randn(8, 64)
    with running(impl, *OPS_UNDER_TEST), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run(views, **GPT_OSS)
        out.backward(grad)
    weight_sized = min(gate_up.numel(), down.numel()) * gate_up.element_size()
    allocations = sorted(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage >= weight_sized)
    assert allocations == sorted(t.numel() * t.element_size() for t in (gate_up, down)), allocations
    assert gate_up_proj.grad.stride() == gate_up_proj.stride() and down_proj.grad.stride() == down_proj.stride()
    case = (x, indices, gate_up, down, weights, scale, gate_up_bias, down_bias)
    expected, (_, grad_gate_up, grad_down, *_) = _grads(lambda c: float64_reference(c, **GPT_OSS), case,
                                                          grad.double())
    eager, (_, eager_gate_up, eager_down, *_) = _grads(lambda c: torch_eager(c, **GPT_OSS), case, grad)
    assert_within_torch_error(out, expected, eager, what="out of transposed views")
    assert_within_torch_error(gate_up_proj.grad, grad_gate_up.transpose(1, 2), eager_gate_up.transpose(1, 2),
                              what="grad gate_up_proj")
    assert_within_torch_error(down_proj.grad, grad_down.transpose(1, 2), eager_down.transpose(1, 2),
                              what="grad down_proj")


# (case options, op options) of the new features' float64 gradchecks.
GRADCHECK_FEATURES = {
    "gpt-oss": (dict(biases=("gate_up", "down"), pre_scale=2.0), dict(GPT_OSS, swiglu_alpha=1.3)),
    "gate_up_bias-relu2": (dict(biases=("gate_up",)), dict(activation="relu2")),
    "down_bias-relu2-ungated": (dict(biases=("down",), gated=False), dict(activation="relu2", gated=False)),
}


@pytest.mark.parametrize("impl", FEATURE_IMPLS)
@pytest.mark.parametrize("features", sorted(GRADCHECK_FEATURES))
def test_gradcheck_float64_of_the_new_features(impl, features):
    case_options, options = GRADCHECK_FEATURES[features]
    case = make_case(9, 5, 6, 3, 2, torch.float64, **case_options)
    x, indices, *_ = case
    dispatch = ops.moe_dispatch(indices, 3)
    given = [i for i, t in enumerate(case) if t is not None and t.is_floating_point()]
    leaves = [case[i].double().requires_grad_() for i in given]

    def layer(*tensors):
        full = list(case)
        for i, t in zip(given, tensors):
            full[i] = t
        _, _, gate_up, down, weights, scale, gate_up_bias, down_bias = full
        return ops.moe_experts(full[0], dispatch, gate_up, down, weights, expert_scale=scale,
                               gate_up_bias=gate_up_bias, down_bias=down_bias, **options)

    with running(impl, *OPS_UNDER_TEST):
        assert torch.autograd.gradcheck(layer, leaves, fast_mode=impl == "triton")


def test_moe_experts_with_the_new_features_compiles_fullgraph():
    """Biases, the interleaved layout, clamped_swiglu and transposed views trace whole, the same bits."""
    x, indices, gate_up, down, weights, scale, gate_up_bias, down_bias = make_case(
        24, 32, 16, 4, 2, biases=("gate_up", "down"), pre_scale=2.0)
    dispatch = ops.moe_dispatch(indices, 4)

    def layer(x, gate_up_proj, down_proj, weights, gate_up_bias, down_bias):
        return ops.moe_experts(x, dispatch, gate_up_proj.transpose(1, 2), down_proj.transpose(1, 2), weights,
                               gate_up_bias=gate_up_bias, down_bias=down_bias, **GPT_OSS)

    leaves = [t.requires_grad_() for t in (x, gate_up.transpose(1, 2).contiguous(),
                                           down.transpose(1, 2).contiguous(), weights, gate_up_bias, down_bias)]
    expected = torch.autograd.grad(layer(*leaves).sum(), leaves)
    got = torch.autograd.grad(torch.compile(layer, fullgraph=True, backend="aot_eager")(*leaves).sum(), leaves)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


@pytest.mark.parametrize("impl", ("triton", "torch"))
def test_bias_gradients_bitwise_reproducible_across_runs_and_thread_counts(impl):
    """The bias gradients sum each expert's rows in one order: two runs on 2 threads and one on 1
    give the same bits (E = 8, a skewed histogram; 512 tokens on torch's path, whose CPU kernels
    split their work over the threads, 64 under the interpreter)."""
    tokens = 64 if impl == "triton" else 512
    case = make_case(tokens, 64, 32, 8, 2, skew=True, biases=("gate_up", "down"))
    grad = torch.randn(tokens, 64)

    def biased_grads():
        with running(impl, *OPS_UNDER_TEST):
            out, grads = _grads(lambda c: run(c, **GPT_OSS), case, grad)
        return {"out": out, "grad gate_up_bias": grads[-2], "grad down_bias": grads[-1]}

    assert_bitwise_reproducible(biased_grads)
    grads = biased_grads()
    assert not grads["grad gate_up_bias"][4:].any() and not grads["grad down_bias"][4:].any(), \
        "experts without rows get zero bias gradients"


# ---- the torch implementation's half-precision weighted sum -----------------------------------

def _spread_slot_rows(dtype, top_k, num_tokens=300, width=96, seed=5):
    """(rows, inverse_positions, coef_rows exact in dtype) for _sum_slots, the rows spanning many
    binades (where another summation order or a rounding of the partial sums would show)."""
    generator = torch.Generator().manual_seed(seed)
    num_rows = num_tokens * top_k
    scale = 2.0 ** torch.randint(-12, 12, (num_rows, width), generator=generator)
    rows = (torch.randn(num_rows, width, generator=generator) * scale).to(dtype)
    inverse_positions = torch.randperm(num_rows, generator=generator).view(num_tokens, top_k).to(torch.int32)
    coef_rows = torch.rand(num_rows, generator=generator).to(dtype).float()
    return rows, inverse_positions, coef_rows


def _on_threads(counts, fn):
    threads = torch.get_num_threads()
    try:
        results = []
        for count in counts:
            torch.set_num_threads(count)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_torch_half_weighted_sum_with_exact_coefficients_is_one_reproducible_bmm(dtype, top_k):
    """Coefficients exact in the rows' half dtype take one bmm in that dtype: its products are
    exact in fp32, so it is within an fp32 sum of top_k terms of the float64 sum (plus top_k
    flushed subnormal products) and half an ulp of rounding; the same bits on 1 and 2 threads."""
    rows, inverse_positions, coef_rows = _spread_slot_rows(dtype, top_k)
    assert experts_op._exact_in(coef_rows, dtype)
    narrow = _on_threads((1, 2, 1), lambda: experts_op._sum_slots(rows, inverse_positions, coef_rows))
    assert narrow[0].dtype == dtype
    assert torch.equal(narrow[1], narrow[0]) and torch.equal(narrow[2], narrow[0])
    positions = inverse_positions.long()
    terms = rows.double()[positions] * coef_rows.double()[positions][..., None]
    exact = terms.sum(1)
    bound = accumulation_bound(terms.abs().sum(1), top_k, exact, dtype) + top_k * torch.finfo(torch.float32).tiny
    assert_within(narrow[0], exact, bound, what=f"bmm weighted sum, k={top_k}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_torch_unweighted_sum_is_the_fp32_slot_order_sum_rounded_once(dtype):
    """The backward's d x: half rows summed in their dtype, bitwise the fp32 sum in slot order
    rounded once (torch accumulates half sums in fp32)."""
    rows, inverse_positions, coef_rows = _spread_slot_rows(dtype, 8)
    total = experts_op._sum_slots(rows, inverse_positions, coef_rows, weighted=False)
    assert total.dtype == dtype
    slot_order = rows[inverse_positions[:, 0].long()].float()
    for j in range(1, inverse_positions.shape[1]):
        slot_order = slot_order + rows[inverse_positions[:, j].long()].float()
    assert torch.equal(total, slot_order.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_products_with_exact_coefficients_are_the_fp32_products_rounded_once(dtype):
    """What the backward's scaled rows rely on: rows times a column exact in their half dtype,
    multiplied in that dtype, are bitwise the fp32 products rounded once."""
    rows, _, coef_rows = _spread_slot_rows(dtype, 2)
    column = coef_rows[:, None]
    assert torch.equal(rows * column.to(dtype), (rows.float() * column).to(dtype))


def test_torch_weighted_sum_takes_the_fp32_path_for_coefficients_inexact_in_the_rows_dtype():
    coef_rows = torch.tensor([0.5, 1 / 3, 0.25])
    assert not experts_op._exact_in(coef_rows, torch.bfloat16)
    assert experts_op._exact_in(coef_rows[[0, 2]], torch.bfloat16)
    assert not experts_op._exact_in(coef_rows[[0, 2]], torch.float32)  # fp32 rows: the fp32 path anyway
