"""astrea.integrations.transformers on tiny, randomly initialised transformers MoE models
(nothing downloaded), each checked against the same model unpatched."""

import copy
import dataclasses
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
from tests.utils import assert_close, running  # noqa: E402

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
        assert (block(hidden) - reference(hidden)).abs().max() <= 1e-5
        logits, weights, indices = block.gate(hidden.view(-1, hidden.shape[-1]))
        ref_logits, ref_weights, ref_indices = reference.gate(hidden.view(-1, hidden.shape[-1]))
        assert torch.equal(logits, ref_logits)
        assert torch.equal(indices.long(), ref_indices)
        assert weights.dtype == ref_weights.dtype
        assert_close(weights, ref_weights, what="routing weights")


@pytest.mark.parametrize("family", FAMILIES)
def test_model_outputs_aux_loss_and_gradients_fp32(family):
    original, patched = pair(family)
    batch = inputs(family)
    results = []
    for model in (original, patched):
        model.train()
        out = model(**batch, labels=batch["input_ids"], output_router_logits=True)
        out.loss.backward()
        results.append(out)
    ref, got = results
    assert_close(got.logits, ref.logits, what="logits")
    assert len(got.router_logits) == len(ref.router_logits) == 2
    for layer, (a, b) in enumerate(zip(got.router_logits, ref.router_logits)):
        assert_close(a, b, what=f"router logits of layer {layer}")
    assert_close(got.aux_loss, ref.aux_loss, what="aux loss")
    assert_close(got.loss, ref.loss, what="loss")
    grads = dict(original.named_parameters())
    checked = 0
    for name, param in patched.named_parameters():
        if grads[name].grad is None:
            assert param.grad is None, name
            continue
        assert_close(param.grad, grads[name].grad, what=f"grad of {name}")
        checked += 1
    assert checked > 0
    assert all(b.experts.gate_up_proj.grad is not None and b.gate.weight.grad is not None for b in moe_blocks(patched))


@pytest.mark.parametrize("family", FAMILIES)
def test_block_outputs_bf16_within_pytorch_error(family):
    """|patched_bf16 - fp64| <= 2 |unpatched_bf16 - fp64| + atol, block by block."""
    original, patched = pair(family, torch.bfloat16)
    exact = copy.deepcopy(original).double()
    exact.set_experts_implementation("eager")  # the default grouped_mm has no float64
    for block, reference, truth in zip(moe_blocks(patched), moe_blocks(original), moe_blocks(exact)):
        hidden = torch.randn(2, 9, block.gate.weight.shape[1]).bfloat16()
        expected = truth(hidden.double())
        tokens = hidden.view(-1, hidden.shape[-1])
        weights, ref_weights = block.gate(tokens)[1], reference.gate(tokens)[1]
        assert weights.dtype == ref_weights.dtype
        assert_close(weights, ref_weights, what="bf16 routing weights")
        ours = (block(hidden).double() - expected).abs().max()
        theirs = (reference(hidden).double() - expected).abs().max()
        assert ours <= 2 * theirs + 1e-3, (ours, theirs)


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
    hidden = torch.randn(1, 8, 32)
    with astrea.backend("triton"):
        out = block(hidden)
        out.square().sum().backward()
    expected = reference(hidden)
    expected.square().sum().backward()
    assert (out - expected).abs().max() <= 1e-5
    for (name, param), ref in zip(block.named_parameters(), reference.parameters()):
        assert_close(param.grad, ref.grad, what=f"grad of {name}")


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
    with pytest.raises(UnsupportedMoEBlockError, match=r"bad \(PhimoeSparseMoeBlock\) has a router .* none of"):
        apply_astrea(model)  # sparsemixer routing
    assert not any("forward" in m.__dict__ for m in model.modules())
    gpt_oss = transformers.GptOssConfig(**dict(LM, max_position_embeddings=4096), intermediate_size=32,
                                        num_local_experts=4, num_experts_per_tok=2, head_dim=8)
    with pytest.raises(UnsupportedMoEBlockError, match=r"GptOssMLP\) has experts with has_bias=True"):
        apply_astrea(transformers.GptOssForCausalLM(gpt_oss))
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
        assert (block(hidden) - reference(hidden)).abs().max() <= 1e-5
    assert calls == ["silu", "silu"]


def test_experts_with_their_own_gating_keep_the_per_expert_loop():
    original, patched = pair("mixtral")
    for block, reference in zip(moe_blocks(patched), moe_blocks(original)):
        for experts in (block.experts, reference.experts):
            # A gating astrea has no activation for: act(gate) * up with gelu_new's formula.
            experts.act_fn = transformers.activations.NewGELUActivation()
        hidden = torch.randn(2, 9, block.gate.weight.shape[1])
        assert (block(hidden) - reference(hidden)).abs().max() <= 1e-5


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
    "axk1 axk2 bailing_hybrid beam cohere2_moe deepseek_ocr2 deepseek_v2 deepseek_v3 deepseek_v32 dots1 ernie4_5_moe "
    "ernie4_5_vl_moe exaone_moe flex_olmo flint glm4_moe glm4_moe_lite glm4v_moe glm5_next glm_moe_dsa granitemoe "
    "granitemoe_swa granitemoehybrid granitemoeshared hy_v3 hy_v4 hy_v4_vl inkling2 inkling2_loop jamba kimi_linear "
    "kolibri1 laguna lara_mini mellum mimo_v2_flash minimax minimax_m2 minimax_m3_vl mistral4 mistral_large4 mixtral "
    "olmoe qwen2_moe qwen3_5_moe qwen3_moe qwen3_next qwen3_vl_moe qwen4_exp solar_open unlimited_ocr"
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


@pytest.mark.parametrize("family", ["deepseek_v3", "ernie4_5_moe", "hy_v3", "granitemoe", "minimax_m2"])
def test_family_bf16_within_twice_pytorch_error(family_table, family):
    """Block by block in bf16: |patched - fp64| <= 2 |unpatched - fp64| + atol, and the
    routing weights and logits in transformers' dtypes."""
    original = family_table.build(family).to(torch.bfloat16)
    patched = apply_astrea(copy.deepcopy(original))
    exact = copy.deepcopy(original).double()
    exact.set_experts_implementation("eager")  # the default grouped_mm has no float64
    blocks = [family_table.moe_blocks(m) for m in (patched, original, exact)]
    for (_, block), (_, reference), (_, truth) in zip(*blocks):
        hidden = torch.randn(2, 9, _router(block).weight.shape[1]).bfloat16()
        tokens = hidden.view(-1, hidden.shape[-1])
        extra = (reference.e_score_correction_bias,) if family in ("hy_v3", "minimax_m2") else ()
        ours, theirs = _router(block)(tokens, *extra), _router(reference)(tokens, *extra)
        assert ours[0].dtype == theirs[0].dtype and ours[1].dtype == theirs[1].dtype
        expected = truth(hidden.double())
        error = (block(hidden).double() - expected).abs().max()
        own_error = (reference(hidden).double() - expected).abs().max()
        assert error <= 2 * own_error + 1e-3, (error, own_error)


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
    def forward(self, hidden_states, input_ids):
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
    (_ExtraArgumentRouter(), r"whose forward takes more than the hidden states \(input_ids\)"),
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
    assert torch.equal(ours[2].sort(1).values, theirs[2].sort(1).values)
    assert_close(ours[1], theirs[1], what="softmax-after-top-k weights")


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
    order, expected_order = out.indices.long().sort(1), indices.sort(1)
    assert torch.equal(order.values, expected_order.values)
    assert_close(out.weights.gather(1, order.indices), weights.gather(1, expected_order.indices),
                 what="grouped weights")
    plain = astrea.ops.router_topk(logits, 8, scoring="sigmoid", bias=router.e_score_correction_bias)
    assert not torch.equal(plain.indices.long().sort(1).values, expected_order.values), "groups matter here"
