"""astrea.integrations.transformers on tiny, randomly initialised transformers MoE models
(nothing downloaded), each checked against the same model unpatched.

Tolerances: fp32 block outputs within the issue's 1e-5 of the block's largest output; routing
weights, logits, losses and gradients within 4x the unpatched model's own error against the
same model (or routing rule) in float64, on the same inputs; bf16 block outputs within 2x
(both plus assert_within_torch_error's floor of 8 ulps at the result's scale: the output's
own rounding). The patched routers must also choose the experts the unpatched ones choose."""

import copy
import dataclasses
import functools
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", minversion="5.0")

import astrea  # noqa: E402
from astrea.integrations.transformers import (  # noqa: E402
    Routing,
    UnsupportedMoEBlockError,
    apply_astrea,
    apply_astrea_to_mixtral,
    apply_astrea_to_olmoe,
    apply_astrea_to_qwen2_moe,
    apply_astrea_to_qwen3_vl_moe,
    patch_moe_block,
    remove_astrea,
)
import astrea.reference  # noqa: E402
from tests.utils import assert_within_torch_error, running  # noqa: E402

VOCAB = 100
IMAGE_TOKEN, VISION_START, VISION_END = 90, 92, 93
LM = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    # Larger than the default 0.02, so routing and greedy decoding are not near-ties.
    initializer_range=0.2, router_aux_loss_coef=0.1, tie_word_embeddings=False,
)


def mixtral():
    config = transformers.MixtralConfig(**LM, intermediate_size=40, num_local_experts=5, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(config)


def qwen2_moe():
    # norm_topk_prob=False: the un-renormalised path (Qwen2-MoE's default); with a shared expert.
    config = transformers.Qwen2MoeConfig(
        **LM, intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
    )
    return transformers.Qwen2MoeForCausalLM(config)


def olmoe():
    config = transformers.OlmoeConfig(
        **LM, intermediate_size=40, num_experts=7, num_experts_per_tok=3, norm_topk_prob=True,
    )
    return transformers.OlmoeForCausalLM(config)


def qwen3_vl_moe():
    text = dict(
        LM, intermediate_size=40, moe_intermediate_size=24, head_dim=8, num_experts=6, num_experts_per_tok=2,
        decoder_sparse_step=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                         "mrope_interleaved": True},
    )
    vision = dict(
        depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
        spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0],
        initializer_range=0.2,
    )
    config = transformers.Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=91,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    return transformers.Qwen3VLMoeForConditionalGeneration(config)


def qwen3_moe():
    """A family without its own function: patched through the generic path."""
    config = transformers.Qwen3MoeConfig(
        **LM, intermediate_size=40, moe_intermediate_size=24, head_dim=8, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True,
    )
    return transformers.Qwen3MoeForCausalLM(config)


FAMILIES = {
    "mixtral": (mixtral, apply_astrea_to_mixtral),
    "qwen2_moe": (qwen2_moe, apply_astrea_to_qwen2_moe),
    "olmoe": (olmoe, apply_astrea_to_olmoe),
    "qwen3_vl_moe": (qwen3_vl_moe, apply_astrea_to_qwen3_vl_moe),
    "qwen3_moe (generic)": (qwen3_moe, apply_astrea),
}


def pair(family: str, dtype=torch.float32):
    """(unpatched, patched) copies of one randomly initialised model."""
    build, patch = FAMILIES[family]
    original = build().to(dtype)
    return original, patch(copy.deepcopy(original))


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "experts", None), nn.Module)]


# fp32 block outputs, patched against unpatched: the spec, relative to the block's
# largest output (one fp32 rounding of the residual stream is 6e-8 of it).
BLOCK_TOLERANCE = 1e-5


def assert_block_within_spec(output: torch.Tensor, expected: torch.Tensor) -> None:
    error = (output.double() - expected.double()).abs().max().item()
    assert error <= BLOCK_TOLERANCE * expected.abs().max().item(), (error, expected.abs().max().item())


def float64_model(model: nn.Module) -> nn.Module:
    """A float64 copy of an unpatched model: the oracle of every comparison (eager experts: the
    default grouped_mm has no float64)."""
    exact = copy.deepcopy(model).double()
    exact.set_experts_implementation("eager")
    return exact


def _path(module: nn.Module, dotted: str):
    return functools.reduce(getattr, dotted.split("."), module)


def float64_routing(router: nn.Module, logits: torch.Tensor, *bias_argument: torch.Tensor):
    """(weights, indices) of a patched router's probed rule on ``logits`` in float64 (astrea's
    reference): the oracle of the routing weights, which the patched and the unpatched router
    compute from the same logits."""
    routing = router.astrea_routing
    bias = bias_argument[0] if routing.bias == "argument" else None if routing.bias is None else _path(
        router, routing.bias)
    weights, indices, *_ = astrea.reference.router_topk(
        logits.detach().double(), routing.top_k, scoring=routing.scoring, renormalize=routing.renormalize,
        bias=None if bias is None else bias.detach().double().reshape(-1), bias_on=routing.bias_on,
        num_groups=routing.num_groups, topk_groups=routing.topk_groups, group_score=routing.group_score,
        scaling_factor=routing.scaling_factor)
    return weights, indices


def assert_weights_within_torch_error(ours, theirs, exact, *, what: str) -> None:
    """Routing (weights, indices) of astrea and of transformers against the float64 ``exact``:
    the same experts per token (in any order), astrea's weights within 4x transformers' error."""
    aligned = []
    for weights, indices in (ours, theirs, exact):
        order = indices.long().sort(dim=1)
        aligned.append((weights.gather(1, order.indices), order.values))
    (weights, indices), (ref_weights, ref_indices), (exact_weights, exact_indices) = aligned
    assert torch.equal(indices, ref_indices) and torch.equal(indices, exact_indices), what
    assert_within_torch_error(weights, exact_weights, ref_weights, what=what, dtype=ref_weights.dtype)


def inputs(family: str) -> dict:
    """A batch of two prompts; for Qwen3-VL-MoE one of them holds a 4-token image."""
    ids = torch.randint(3, 90, (2, 11))
    if family != "qwen3_vl_moe":
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    ids[0, 2:8] = torch.tensor([VISION_START] + [IMAGE_TOKEN] * 4 + [VISION_END])
    # One image of 4x4 patches (merged 2x2 into 4 tokens), each patch 3 x 2 frames x 4 x 4 pixels.
    return dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == IMAGE_TOKEN).long(),
        pixel_values=torch.randn(16, 3 * 2 * 4 * 4), image_grid_thw=torch.tensor([[1, 4, 4]]),
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_patches_every_block_and_keeps_parameters(family):
    original, patched = pair(family)
    blocks = moe_blocks(patched)
    assert len(blocks) == 2
    assert all("forward" in b.gate.__dict__ and "forward" in b.experts.__dict__ for b in blocks)
    assert patched.state_dict().keys() == original.state_dict().keys()
    patched.load_state_dict(original.state_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_block_outputs_fp32(family):
    original, patched = pair(family)
    for block, reference in zip(moe_blocks(patched), moe_blocks(original)):
        hidden = torch.randn(2, 9, block.gate.weight.shape[1])
        assert_block_within_spec(block(hidden), reference(hidden))
        logits, weights, indices = block.gate(hidden.view(-1, hidden.shape[-1]))
        ref_logits, ref_weights, ref_indices = reference.gate(hidden.view(-1, hidden.shape[-1]))
        assert torch.equal(logits, ref_logits)
        assert torch.equal(indices.long(), ref_indices)
        assert weights.dtype == ref_weights.dtype
        assert_weights_within_torch_error((weights, indices), (ref_weights, ref_indices),
                                          float64_routing(block.gate, logits), what="routing weights")


@pytest.mark.parametrize("family", FAMILIES)
def test_model_outputs_aux_loss_and_gradients_fp32(family):
    """Each within 4x the unpatched model's own fp32 error against the same model in float64."""
    original, patched = pair(family)
    exact = float64_model(original)
    batch = inputs(family)
    results = []
    for model in (original, patched, exact):
        model.train()
        wide = model is exact
        model_batch = {k: v.double() if wide and v.is_floating_point() else v for k, v in batch.items()}
        out = model(**model_batch, labels=batch["input_ids"], output_router_logits=True)
        out.loss.backward()
        results.append(out)
    ref, got, truth = results
    assert_within_torch_error(got.logits, truth.logits, ref.logits, what="logits")
    assert len(got.router_logits) == len(ref.router_logits) == 2
    for layer, (a, b, c) in enumerate(zip(got.router_logits, ref.router_logits, truth.router_logits)):
        assert_within_torch_error(a, c, b, what=f"router logits of layer {layer}")
    assert_within_torch_error(got.aux_loss, truth.aux_loss, ref.aux_loss, what="aux loss")
    assert_within_torch_error(got.loss, truth.loss, ref.loss, what="loss")
    grads, exact_grads = dict(original.named_parameters()), dict(exact.named_parameters())
    checked = 0
    for name, param in patched.named_parameters():
        if grads[name].grad is None:
            assert param.grad is None, name
            continue
        assert_within_torch_error(param.grad, exact_grads[name].grad, grads[name].grad, what=f"grad of {name}")
        checked += 1
    assert checked > 0
    assert all(b.experts.gate_up_proj.grad is not None and b.gate.weight.grad is not None for b in moe_blocks(patched))


@pytest.mark.parametrize("family", FAMILIES)
def test_block_outputs_bf16_within_pytorch_error(family):
    """|patched_bf16 - fp64| <= 2 |unpatched_bf16 - fp64| (+ 8 bf16 ulps), block by block; the
    routing weights within 4x transformers' own error against float64 on the same logits."""
    original, patched = pair(family, torch.bfloat16)
    exact = float64_model(original)
    for block, reference, truth in zip(moe_blocks(patched), moe_blocks(original), moe_blocks(exact)):
        hidden = torch.randn(2, 9, block.gate.weight.shape[1]).bfloat16()
        expected = truth(hidden.double())
        tokens = hidden.view(-1, hidden.shape[-1])
        logits, weights, indices = block.gate(tokens)
        _, ref_weights, ref_indices = reference.gate(tokens)
        assert weights.dtype == ref_weights.dtype
        assert_weights_within_torch_error((weights, indices), (ref_weights, ref_indices),
                                          float64_routing(block.gate, logits), what="bf16 routing weights")
        assert_within_torch_error(block(hidden), expected, reference(hidden), what="bf16 block", factor=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_identical(family):
    original, patched = pair(family)
    batch = inputs(family)
    tokens = [
        m.eval().generate(**batch, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        for m in (original, patched)
    ]
    assert tokens[0].shape == tokens[1].shape == (2, 11 + 10)
    assert torch.equal(tokens[0], tokens[1])
    assert len(set(tokens[1][:, 11:].flatten().tolist())) > 2  # decoding is not stuck on one token


def test_triton_backend_matches_under_interpreter():
    """The Triton kernels (interpreted on CPU) inside a Mixtral block, forward and backward."""
    original, patched = pair("mixtral")
    block, reference = moe_blocks(patched)[0], moe_blocks(original)[0]
    truth = moe_blocks(float64_model(original))[0]
    hidden = torch.randn(1, 8, 32)
    with astrea.backend("triton"):
        out = block(hidden)
        out.square().sum().backward()
    expected = reference(hidden)
    expected.square().sum().backward()
    truth(hidden.double()).square().sum().backward()
    assert_block_within_spec(out, expected)
    for (name, param), ref, exact in zip(block.named_parameters(), reference.parameters(), truth.parameters()):
        assert_within_torch_error(param.grad, exact.grad, ref.grad, what=f"grad of {name}")


def test_generic_path_probes_the_routing():
    patched = apply_astrea(qwen3_moe())
    assert moe_blocks(patched)[0].gate.astrea_routing == Routing(2, True, weights_in_logits_dtype=True)
    patched = apply_astrea(mixtral())  # a family block found by apply_astrea gets its own routing
    assert moe_blocks(patched)[0].gate.astrea_routing == Routing(2, True, weights_in_logits_dtype=False)


def test_patching_twice_then_remove_astrea_restores_the_original_forwards():
    model = apply_astrea(apply_astrea_to_olmoe(olmoe()))
    assert moe_blocks(model)[0].gate.astrea_routing == Routing(3, True, weights_in_logits_dtype=True)
    remove_astrea(model)
    for block in moe_blocks(model):
        assert "forward" not in block.gate.__dict__ and "forward" not in block.experts.__dict__
        assert not hasattr(block.gate, "astrea_routing")


def deepseek_v3():
    config = transformers.DeepseekV3Config(
        **LM, intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    )
    return transformers.DeepseekV3ForCausalLM(config)


class HandWrittenBlock(nn.Module):
    """The pre-transformers-5 layout: a linear gate and a list of expert MLPs."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 4, bias=False)
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))


def phimoe():
    config = transformers.PhimoeConfig(**LM, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2)
    return transformers.PhimoeForCausalLM(config)


def test_unsupported_blocks_raise_and_patch_nothing():
    # A supported block first: the error on the second must leave it unpatched too.
    model = nn.ModuleDict({"ok": moe_blocks(mixtral())[0], "bad": moe_blocks(phimoe())[0]})
    with pytest.raises(UnsupportedMoEBlockError,
                       match=r"bad \(PhimoeSparseMoeBlock\) has a router \(PhimoeTopKRouter\) that routes with "
                             r"sparsemixer \(each chosen expert weighted by a softmax over only the logits within"):
        apply_astrea(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(UnsupportedMoEBlockError, match=r"HandWrittenBlock\) has experts ModuleList, not a"):
        apply_astrea(nn.Sequential(HandWrittenBlock()))
    with pytest.raises(UnsupportedMoEBlockError, match="top_k=9 of 5 experts"):
        patch_moe_block(moe_blocks(mixtral())[0], Routing(9, True, False))
    with pytest.raises(TypeError, match="patch_moe_block: routing must be an astrea Routing, got dict"):
        patch_moe_block(moe_blocks(mixtral())[0], {"top_k": 2})


def test_models_without_the_block_raise():
    with pytest.raises(ValueError, match=r"apply_astrea: model \(Linear\) has no sparse MoE block"):
        apply_astrea(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"apply_astrea_to_olmoe: model \(MixtralForCausalLM\) has no Olmoe"):
        apply_astrea_to_olmoe(mixtral())


def test_readme_examples_run():
    """The python blocks of the README section, run in order in one namespace."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Using astrea.ops in another MoE model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 3
    namespace = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_experts_run_one_grouped_op_per_block(family, monkeypatch):
    """Default SiLU gating: each block's experts are one moe_experts call, no per-expert loop."""
    calls = []
    grouped = astrea.ops.moe_experts
    monkeypatch.setattr(astrea.ops, "moe_experts", lambda *a, **k: calls.append(k["activation"]) or grouped(*a, **k))
    monkeypatch.setattr(astrea.ops, "permute", lambda *a, **k: pytest.fail("the per-expert loop ran"))
    original, patched = pair(family)
    for block, reference in zip(moe_blocks(patched), moe_blocks(original)):
        hidden = torch.randn(2, 9, block.gate.weight.shape[1])
        assert_block_within_spec(block(hidden), reference(hidden))
    assert calls == ["silu", "silu"]


def test_experts_with_their_own_gating_keep_the_per_expert_loop():
    original, patched = pair("mixtral")
    for block, reference in zip(moe_blocks(patched), moe_blocks(original)):
        for experts in (block.experts, reference.experts):
            # A gating astrea has no activation for: act(gate) * up with gelu_new's formula.
            experts.act_fn = transformers.activations.NewGELUActivation()
        hidden = torch.randn(2, 9, block.gate.weight.shape[1])
        assert_block_within_spec(block(hidden), reference(hidden))


# ---- every family the README table marks patched ------------------------------------------------

TABLE_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "moe_family_table.py"


@pytest.fixture(scope="module")
def family_table():
    """scripts/moe_family_table.py as a module: its tiny-model builder and its checks."""
    spec = importlib.util.spec_from_file_location("moe_family_table", TABLE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# The families the README table marks "patched exactly" (scripts/moe_family_table.py).
PATCHED_FAMILIES = (
    "afmoe aria axk1 axk2 bailing_hybrid beam cohere2_moe deepseek_ocr2 deepseek_v2 deepseek_v3 deepseek_v32 dots1 "
    "dots3_note ernie4_5_moe ernie4_5_vl_moe exaone_moe flex_olmo flint glm4_moe glm4_moe_lite glm4v_moe glm5_next "
    "glm_moe_dsa gpt_oss granitemoe granitemoe_swa granitemoehybrid granitemoeshared hunyuan_v1_moe hy_v3 hy_v4 "
    "hy_v4_vl inkling2 inkling2_loop jamba kimi_linear kolibri1 laguna lara_mini lfm2_moe mellum mimo_v2_flash minimax "
    "minimax_m2 minimax_m3_vl mistral4 mistral_large4 mixtral nemotron_h olmoe openai_privacy_filter qwen2_moe "
    "qwen3_5_moe qwen3_moe qwen3_next qwen3_omni_moe qwen3_vl_moe qwen4_exp solar_open unlimited_ocr"
).split()


@pytest.mark.parametrize("family", PATCHED_FAMILIES)
def test_family_is_patched_exactly(family_table, family):
    """fp32: every MoE block's output within 1e-5 of its largest output, the logits, and the
    gradients of every parameter, unpatched against patched (the script's own checks)."""
    result = family_table.check(family)
    assert result.status == "patched exactly", result.detail


@pytest.mark.parametrize("family", ["deepseek_v3", "mistral4", "glm4_moe", "hy_v3", "granitemoe", "ernie4_5_moe"])
def test_family_greedy_tokens_identical(family_table, family):
    original = family_table.build(family)
    patched = apply_astrea(copy.deepcopy(original))
    batch = family_table.batch_for(original)
    tokens = [m.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False) for m in (original, patched)]
    assert torch.equal(tokens[0], tokens[1])


def _router(block: nn.Module) -> nn.Module:
    return block.gate if hasattr(block, "gate") else block.router


# The routers of the table's kinds (grouped sigmoid, ERNIE's statics, a bias passed by the
# block, softmax after top-k, a Linear inside the router) and every experts layout.
BF16_FAMILIES = ["deepseek_v3", "ernie4_5_moe", "hy_v3", "granitemoe", "minimax_m2", "afmoe", "hunyuan_v1_moe",
                 "aria", "gpt_oss", "openai_privacy_filter", "nemotron_h"]


@pytest.mark.parametrize("family", BF16_FAMILIES)
def test_family_bf16_within_twice_pytorch_error(family_table, family):
    """Block by block in bf16: |patched - fp64| <= 2 |unpatched - fp64| (+ 8 bf16 ulps), and the
    routing weights and logits in transformers' dtypes."""
    original = family_table.build(family).to(torch.bfloat16)
    patched = apply_astrea(copy.deepcopy(original))
    exact = float64_model(original)
    hidden_size = original.config.get_text_config().hidden_size
    blocks = [family_table.moe_blocks(m) for m in (patched, original, exact)]
    for (_, block), (_, reference), (_, truth) in zip(*blocks):
        hidden = torch.randn(2, 9, hidden_size).bfloat16()
        tokens = hidden.view(-1, hidden_size)
        # The selection bias some blocks pass to their router (HunYuan-V3, MiniMax-M2, AFMoE).
        extra = next(((getattr(reference, name),) for name in ("e_score_correction_bias", "expert_bias")
                      if isinstance(getattr(reference, name, None), torch.Tensor)), ())
        routed = hidden if family == "afmoe" else tokens  # AFMoE's router unpacks (batch, sequence, hidden)
        ours, theirs = _router(block)(routed, *extra), _router(reference)(routed, *extra)
        assert ours[0].dtype == theirs[0].dtype and ours[1].dtype == theirs[1].dtype
        expected = _outputs(truth, hidden.double())
        assert_within_torch_error(_outputs(block, hidden), expected, _outputs(reference, hidden),
                                  what=f"{family} bf16 block", factor=2)


def test_probe_tells_grouped_from_plain_and_uses_the_bias(family_table):
    """DeepSeek-V3 with its selection bias still zero (an untrained model): the probe finds
    the grouped, bias-corrected routing, so the patched model stays exact once the bias moves."""
    original = family_table.build("deepseek_v3")
    with torch.no_grad():
        for _, block in family_table.moe_blocks(original):
            block.gate.e_score_correction_bias.zero_()
    patched = apply_astrea(copy.deepcopy(original))
    routing = moe_blocks(patched)[0].gate.astrea_routing
    assert (routing.scoring, routing.bias, routing.num_groups, routing.topk_groups, routing.group_score) == (
        "sigmoid", "e_score_correction_bias", 4, 2, "top2_sum")
    assert routing.scaling_factor == original.config.routed_scaling_factor
    for model in (original, patched):
        with torch.no_grad():
            for index, (_, block) in enumerate(family_table.moe_blocks(model)):
                block.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 8).roll(index))
    assert family_table._differences(original, patched) == []
    # The grouped selection matters on these inputs: plain top-k chooses other experts.
    block = moe_blocks(patched)[0]
    hidden = torch.randn(64, block.gate.weight.shape[1])
    plain = dataclasses.replace(routing, num_groups=1, topk_groups=1)
    grouped_indices = block.gate(hidden)[2]
    block.gate.astrea_routing = plain
    assert not torch.equal(block.gate(hidden)[2], grouped_indices)


class _FailingRouter(nn.Module):
    """A router whose forward fails on any input: probing it must refuse, not crash."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 16))
        self.top_k = 2

    def forward(self, hidden_states):
        raise RuntimeError("expected m1 and m2 to have the same dtype")


class _ExtraArgumentRouter(_FailingRouter):
    """DeepSeek-V4's hash router's signature: experts chosen by token id."""

    def forward(self, hidden_states, input_ids):
        raise AssertionError("never called")


class _OtherArgumentRouter(_FailingRouter):
    def forward(self, hidden_states, temperature):
        raise AssertionError("never called")


class _BlockWith(nn.Module):
    """A block of no known family: Mixtral's fused experts (4 of them) behind ``router``."""

    def __init__(self, router: nn.Module):
        super().__init__()
        self.gate = router
        self.experts = copy.deepcopy(moe_blocks(mixtral())[0].experts)
        self.experts.gate_up_proj = nn.Parameter(torch.randn(4, 80, 32))
        self.experts.down_proj = nn.Parameter(torch.randn(4, 32, 40))
        router.weight = nn.Parameter(torch.randn(4, 32))


@pytest.mark.parametrize("router, match", [
    (_FailingRouter(), r"whose forward raised RuntimeError on a probe \(expected m1 and m2"),
    (_OtherArgumentRouter(), r"whose forward takes more than the hidden states \(temperature\)"),
    (_ExtraArgumentRouter(), r"_ExtraArgumentRouter\) that selects its experts by token id \(its forward takes "
                             r"input_ids: hash routing"),
])
def test_routers_that_cannot_be_probed_are_refused(router, match):
    model = nn.ModuleDict({"ok": moe_blocks(mixtral())[0], "bad": _BlockWith(router)})
    with pytest.raises(UnsupportedMoEBlockError, match=match):
        apply_astrea(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_router_under_the_name_router_and_softmax_after_top_k(family_table):
    """Granite-MoE: its router is `router` and takes the softmax of the top-k logits."""
    original = family_table.build("granitemoe")
    patched = apply_astrea(copy.deepcopy(original))
    block = moe_blocks(patched)[0]
    assert "forward" in block.router.__dict__ and not hasattr(block, "gate")
    hidden = torch.randn(64, block.router.weight.shape[1])
    ours, theirs = block.router(hidden), moe_blocks(original)[0].router(hidden)
    assert_weights_within_torch_error(ours[1:], theirs[1:], float64_routing(block.router, ours[0]),
                                      what="softmax-after-top-k weights")


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_router_topk_matches_deepseek_v3_router_at_full_size(backend):
    """The benchmark's case (E=256, 8 groups, top-4 groups, k=8, sigmoid + bias, scaled) against
    transformers' DeepseekV3TopkRouter itself, on 64 tokens of unit logit scale."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = transformers.DeepseekV3Config(hidden_size=128, n_routed_experts=256, n_group=8, topk_group=4,
                                           num_experts_per_tok=8, norm_topk_prob=True, routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.normal_(0, 128**-0.5)
        router.e_score_correction_bias.uniform_(-0.1, 0.1)
    hidden = torch.randn(64, 128)
    logits, weights, indices = router(hidden)
    with running(backend, "router_topk"):
        out = astrea.ops.router_topk(logits, 8, scoring="sigmoid", bias=router.e_score_correction_bias,
                                     num_groups=8, topk_groups=4, scaling_factor=2.5)
    exact = astrea.reference.router_topk(logits.double(), 8, scoring="sigmoid",
                                         bias=router.e_score_correction_bias.double(), num_groups=8, topk_groups=4,
                                         scaling_factor=2.5)
    assert_weights_within_torch_error((out.weights, out.indices), (weights, indices), exact[:2],
                                      what="grouped weights")
    expected_order = indices.sort(1)
    plain = astrea.ops.router_topk(logits, 8, scoring="sigmoid", bias=router.e_score_correction_bias)
    assert not torch.equal(plain.indices.long().sort(1).values, expected_order.values), "groups matter here"


def test_readme_table_marks_these_families_patched():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| patched exactly \|", readme, flags=re.M)
    assert sorted(rows) == sorted(PATCHED_FAMILIES)


# What each family apply_astrea refuses does that astrea does not, as its error says.
REFUSALS = {
    "deepseek_v4": r"\(DeepseekV4TopKRouter\) that scores its logits with SqrtSoftplusActivation \(score_fn\)",
    "zaya": r"router `gate` \(ZayaRouter\) whose logits are not one linear map of the hidden states: it runs "
            r"down_proj \(Linear\), router_mlp \(ZayaRouterMLP\)",
    "gemma4": r"router `router` \(Gemma4TextRouter\) whose logits are not one linear map of the hidden states: it "
              r"runs norm \(Gemma4RMSNorm\), proj \(Linear\)",
    "muse_spark": r"has experts with a norm after each expert \(has_post_expert_norm=True: "
                  r"MuseSparkTextInputScaledRMSNorm\) before the routing weight",
    "inkling": r"\(InklingTopkRouter\) that returns 4 values, not \(router_logits, routing_weights, expert_indices\)",
    "phimoe": r"\(PhimoeTopKRouter\) that routes with sparsemixer",
}


@pytest.mark.parametrize("family", REFUSALS)
def test_family_refused_with_its_reason(family_table, family):
    model = family_table.build(family)
    with pytest.raises(UnsupportedMoEBlockError, match=REFUSALS[family]):
        apply_astrea(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert family_table.check(family).status == "refused"


def test_expert_parallel_experts_are_refused():
    block = moe_blocks(mixtral())[0]
    block.experts._is_expert_parallel = True
    with pytest.raises(UnsupportedMoEBlockError, match=r"has expert-parallel experts \(_is_expert_parallel=True"):
        apply_astrea(nn.Sequential(block))


def test_transposed_experts_run_one_op_on_views_of_the_parameters(family_table, monkeypatch):
    """Aria stores gate_up_proj [E, H, 2I] and down_proj [E, I, H]: moe_experts gets transposed
    views of the parameters (no copy), and their gradients come back to the parameters."""
    original = family_table.build("aria")
    patched = apply_astrea(copy.deepcopy(original))
    exact = float64_model(original)
    block, reference, truth = (family_table.moe_blocks(m)[0][1] for m in (patched, original, exact))
    seen = []
    grouped = astrea.ops.moe_experts

    def recording(x, dispatch, gate_up, down, weights, **options):
        seen.append((gate_up.data_ptr(), gate_up.stride(), down.data_ptr(), down.stride(), options["activation"]))
        return grouped(x, dispatch, gate_up, down, weights, **options)

    monkeypatch.setattr(astrea.ops, "moe_experts", recording)
    monkeypatch.setattr(astrea.ops, "permute", lambda *a, **k: pytest.fail("the per-expert loop ran"))
    experts = block.experts
    hidden = torch.randn(2, 9, experts.gate_up_proj.shape[1])
    out = block(hidden)
    num_experts, hidden_size, width = experts.gate_up_proj.shape
    assert seen == [(experts.gate_up_proj.data_ptr(), (hidden_size * width, 1, width), experts.down_proj.data_ptr(),
                     (width // 2 * hidden_size, 1, hidden_size), "silu")]
    expected = reference(hidden)
    assert_block_within_spec(out[0] if isinstance(out, tuple) else out, expected[0] if isinstance(expected, tuple)
                             else expected)
    for model_block, inputs_dtype in ((block, torch.float32), (reference, torch.float32), (truth, torch.float64)):
        result = model_block(hidden.to(inputs_dtype))
        (result[0] if isinstance(result, tuple) else result).square().sum().backward()
    for name in ("gate_up_proj", "down_proj"):
        ours, theirs, oracle = (getattr(b.experts, name).grad for b in (block, reference, truth))
        assert_within_torch_error(ours, oracle, theirs, what=f"grad of {name}")


def _recording_moe_experts(monkeypatch) -> list[dict]:
    """The keyword arguments of every moe_experts call; the per-expert loop must not run."""
    calls = []
    grouped = astrea.ops.moe_experts
    monkeypatch.setattr(astrea.ops, "moe_experts", lambda *a, **k: calls.append(k) or grouped(*a, **k))
    monkeypatch.setattr(astrea.ops, "permute", lambda *a, **k: pytest.fail("the per-expert loop ran"))
    return calls


def _outputs(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    out = block(hidden)
    return out[0] if isinstance(out, tuple) else out  # gpt-oss's block also returns its router scores


def test_gpt_oss_experts_run_one_op_with_biases_and_clamped_swiglu(family_table, monkeypatch):
    """gpt-oss: transposed stacks with biases, gate and up interleaved, the clamped SwiGLU read
    off the module (alpha, limit) once its _apply_gate matched the formula on the probe."""
    original = family_table.build("gpt_oss")
    calls = _recording_moe_experts(monkeypatch)
    patched = apply_astrea(copy.deepcopy(original))
    for (_, block), (_, reference) in zip(family_table.moe_blocks(patched), family_table.moe_blocks(original)):
        hidden = torch.randn(2, 9, block.experts.gate_up_proj.shape[1])
        assert_block_within_spec(_outputs(block, hidden), _outputs(reference, hidden))
    experts = family_table.moe_blocks(patched)[0][1].experts
    assert len(calls) == 2 and all(call["activation"] == "clamped_swiglu" for call in calls)
    assert calls[0]["gate_up_layout"] == "interleaved"
    assert (calls[0]["swiglu_alpha"], calls[0]["swiglu_limit"]) == (experts.alpha, experts.limit)


def _gate_clamped_on_both_sides(self, gate_up: torch.Tensor) -> torch.Tensor:
    """gpt-oss's gate with its gate half clamped from below too: not the op's formula."""
    gate, up = gate_up[..., ::2].clamp(-self.limit, self.limit), gate_up[..., 1::2].clamp(-self.limit, self.limit)
    return (up + 1) * gate * torch.sigmoid(gate * self.alpha)


def test_a_modified_gpt_oss_gate_is_not_taken_for_the_op_and_runs_per_expert(family_table, monkeypatch):
    original = family_table.build("gpt_oss")
    for _, block in family_table.moe_blocks(original):
        experts_class = type(block.experts)
        block.experts.__class__ = type("ModifiedGptOssExperts", (experts_class,),
                                       {"_apply_gate": _gate_clamped_on_both_sides})
    patched = apply_astrea(copy.deepcopy(original))
    monkeypatch.setattr(astrea.ops, "moe_experts", lambda *a, **k: pytest.fail("the one-op path ran"))
    for (_, block), (_, reference) in zip(family_table.moe_blocks(patched), family_table.moe_blocks(original)):
        assert block.experts.astrea_layout.activation is None
        hidden = torch.randn(2, 9, block.experts.gate_up_proj.shape[1]) * 4  # gates below -limit
        assert_block_within_spec(_outputs(block, hidden), _outputs(reference, hidden))


def test_experts_in_another_dtype_than_their_biases_run_per_expert(family_table, monkeypatch):
    """The per-expert loop takes every accepted layout (here gpt-oss's, its biases float64)."""
    original = family_table.build("gpt_oss")
    for _, block in family_table.moe_blocks(original):
        block.experts.gate_up_proj_bias.data = block.experts.gate_up_proj_bias.data.double()
    patched = apply_astrea(copy.deepcopy(original))
    monkeypatch.setattr(astrea.ops, "moe_experts", lambda *a, **k: pytest.fail("the one-op path ran"))
    (_, block), (_, reference) = family_table.moe_blocks(patched)[0], family_table.moe_blocks(original)[0]
    hidden = torch.randn(2, 9, block.experts.gate_up_proj.shape[1])
    assert_block_within_spec(_outputs(block, hidden), _outputs(reference, hidden))


def test_ungated_experts_run_one_op(family_table, monkeypatch):
    """Nemotron-H: up_proj [E, I, H] and relu2 (its act_fn, probed), no gate."""
    original = family_table.build("nemotron_h")
    calls = _recording_moe_experts(monkeypatch)
    patched = apply_astrea(copy.deepcopy(original))
    blocks = list(zip(family_table.moe_blocks(patched), family_table.moe_blocks(original)))
    for (_, block), (_, reference) in blocks:
        hidden = torch.randn(2, 9, block.experts.up_proj.shape[2])
        assert_block_within_spec(_outputs(block, hidden), _outputs(reference, hidden))
    assert [(call["activation"], call["gated"]) for call in calls] == [("relu2", False)] * len(blocks)
