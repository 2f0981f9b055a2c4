"""Astrea on transformers models: vision experts per role (tiny configs, nothing downloaded),
the coordination matrix, and the LLaVA-style wrapper around a causal LM."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from astrea.models import EXPERTS, Astrea  # noqa: E402
from astrea.models.hf_experts import VisionExpert, tiny_experts  # noqa: E402
from tests.test_model import _one_thread  # noqa: E402,F401  (autouse fixture: single-threaded torch)
from tests.utils import assert_within_torch_error  # noqa: E402

VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
           patch_size=8)


def _role_models():
    """One tiny transformers model per role (and the backbone form of a convolutional model),
    with the tokens each must give for a 32x32 image."""
    t = transformers
    return {
        "detection/owlv2": (t.Owlv2VisionModel(t.Owlv2VisionConfig(**VIT)), 17, 32),
        "detection/resnet-backbone": (t.ResNetBackbone(t.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage1", "stage2"])), 16, 16),
        "segmentation/segformer": (t.SegformerModel(t.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
            strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])), 16, 32),
        "segmentation/sam": (t.SamVisionModel(t.SamVisionConfig(
            hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8, mlp_dim=64, window_size=2, global_attn_indexes=[1], num_pos_feats=8)), 16, 16),
        "classification/dinov2": (t.Dinov2Model(t.Dinov2Config(**VIT)), 17, 32),
        "classification/convnext-backbone": (t.ConvNextBackbone(t.ConvNextConfig(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32, out_features=["stage1", "stage2"])),
            16, 16),
        "caption/siglip": (t.SiglipVisionModel(t.SiglipVisionConfig(**VIT)), 16, 32),
        "caption/clip": (t.CLIPVisionModel(t.CLIPVisionConfig(**VIT)), 17, 32),
    }


@pytest.mark.parametrize("case", list(_role_models()))
def test_vision_expert_tokens_per_role(case):
    torch.manual_seed(0)
    backbone, tokens, width = _role_models()[case]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    expert = VisionExpert(backbone, image_processor={"image_mean": mean, "image_std": std}).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = expert(images)
        pixels = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        raw = backbone(pixel_values=pixels)
    assert out.shape == (2, tokens, width), case
    if getattr(raw, "feature_maps", None) is not None:
        expected = raw.feature_maps[-1].flatten(2).transpose(1, 2)
    else:
        hidden = raw.last_hidden_state
        expected = hidden.flatten(2).transpose(1, 2) if hidden.dim() == 4 else hidden
    assert torch.equal(out, expected), "the expert is the backbone on normalised images, as tokens"


def test_vision_expert_resizes_to_the_backbone_size_and_skips_prefix_tokens():
    torch.manual_seed(0)
    backbone = transformers.ViTModel(transformers.ViTConfig(**VIT)).eval()
    expert = VisionExpert(backbone, skip_tokens=1, image_mean=(0, 0, 0), image_std=(1, 1, 1)).eval()
    assert expert.image_size == 32
    with torch.no_grad():
        out = expert(torch.rand(1, 3, 48, 48))
    assert out.shape == (1, 16, 32), "48x48 images resized to the 32x32 of the config; class token dropped"
    with pytest.raises(ValueError, match=r"images must be \[B, 3, S, S\]"):
        expert(torch.rand(1, 32, 32))
    with pytest.raises(ValueError, match="image_std must be positive"):
        VisionExpert(backbone, image_std=(1, 0, 1))


def test_vision_expert_freezes_per_stage_and_keeps_frozen_under_requires_grad():
    torch.manual_seed(0)
    backbone = transformers.ResNetBackbone(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage1", "stage2"]))
    expert = VisionExpert(backbone, trainable=["encoder.stages.1.*"])
    assert expert.trainable_names and all(n.startswith("encoder.stages.1.") for n in expert.trainable_names)
    expert.requires_grad_(False)
    expert.requires_grad_(True)  # what a trainer does to the experts of its stage
    grads = {n: p.requires_grad for n, p in backbone.named_parameters()}
    assert all(grads[n] == n.startswith("encoder.stages.1.") for n in grads)
    expert.train()
    frozen_bn = backbone.embedder.embedder.normalization
    assert not frozen_bn.training, "a frozen batch norm keeps its running statistics"
    assert backbone.encoder.stages[1].layers[0].shortcut.normalization.training
    expert(torch.rand(2, 3, 32, 32)).square().mean().backward()
    assert all((p.grad is not None) == grads[n] for n, p in backbone.named_parameters())
    with pytest.raises(ValueError, match="match no parameter"):
        expert.set_trainable(["decoder.*"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        expert.set_trainable("encoder.*")
    expert.set_trainable(False)
    assert not any(p.requires_grad for p in backbone.parameters())


def test_vision_expert_from_pretrained_reads_the_processor_statistics(tmp_path):
    torch.manual_seed(0)
    backbone = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VIT))
    backbone.save_pretrained(tmp_path)
    processor = transformers.SiglipImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.6, 0.5, 0.4],
                                                  size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    expert = VisionExpert.from_pretrained(str(tmp_path), model_class="SiglipVisionModel").eval()
    # The processor's statistics rounded once to the expert's fp32 buffers: exactly those values.
    assert torch.equal(expert.image_mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(expert.image_std.flatten(), torch.tensor([0.6, 0.5, 0.4]))
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(expert(images), VisionExpert(backbone, image_processor=processor).eval()(images))


def test_astrea_on_transformers_experts_trains_end_to_end():
    torch.manual_seed(0)
    model = Astrea(20, 0, experts=tiny_experts(32), dim=32, num_tokens=4, heads=4)
    images = torch.rand(2, 3, 32, 32)
    out = model(images, instruction=torch.randn(2, 32))
    assert out.tokens.shape == (2, 4, 32)
    raw, _ = model.encode(images)
    assert model.heads["segmentation"](raw["segmentation"]).shape == (2, 32, 32), "square SegFormer grid"
    (out.tokens.square().mean() + model.heads["detection"](raw["detection"]).mean()).backward()
    for name in EXPERTS:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.experts[name].parameters()), name


def test_vision_expert_from_timm():
    pytest.importorskip("timm")
    expert = VisionExpert.from_timm("vit_tiny_patch16_224", pretrained=False, image_size=32,
                                    trainable=["blocks.11.*"]).eval()
    with torch.no_grad():
        tokens = expert(torch.rand(1, 3, 64, 64))
    assert tokens.dim() == 3 and tokens.shape[0] == 1
    assert all(n.startswith("blocks.11.") for n in expert.trainable_names)


# -- the coordination matrix ----------------------------------------------------------------

def _pair(**kwargs):
    """The same Astrea with and without the coordination matrix (equal other parameters)."""
    torch.manual_seed(0)
    on = Astrea(20, 0, dim=32, num_tokens=4, heads=4, **kwargs)
    torch.manual_seed(0)
    off = Astrea(20, 0, dim=32, num_tokens=4, heads=4, coordination=False, **kwargs)
    return on, off


def test_coordination_equation_and_ablation_changes_the_output():
    from astrea.models.coordination import ExpertCoordination

    on, off = _pair()
    assert off.coordination is None and isinstance(on.coordination, ExpertCoordination)
    shared = off.state_dict()
    assert all(torch.equal(value, on.state_dict()[key]) for key, value in shared.items())
    assert set(on.state_dict()) - set(shared) == {"coordination.coupling", "coordination.contribution.weight"}
    E = len(EXPERTS)
    assert torch.equal(on.coordination.coupling, (1 - torch.eye(E)) / (E - 1))
    on.eval(), off.eval()
    images, instruction = torch.rand(3, 3, 32, 32), torch.randn(3, 32)
    with torch.no_grad():
        _, adapted = on.encode(images)
        stacked = torch.stack([adapted[name] for name in EXPERTS]).double()
        coupling, weight = on.coordination.coupling.double(), on.coordination.contribution.weight.double()
        expected = stacked + torch.einsum("ej,jbtd->ebtd", coupling, stacked @ weight.T)
        # PyTorch's own fp32 evaluation of the equation: the error the module is held to (4x).
        stacked32 = stacked.float()
        torch_value = stacked32 + torch.einsum("ej,jbtd->ebtd", coupling.float(), stacked32 @ weight.float().T)
        assert_within_torch_error(on.coordination(stacked.float()), expected, torch_value, what="coordination")
        with_matrix, without = on.fuse(adapted, instruction), off.fuse(adapted, instruction)
    assert not torch.allclose(with_matrix.tokens, without.tokens, atol=1e-3), "the ablation changes the tokens"
    with pytest.raises(ValueError, match=r"stacked \[E=4, B, T, D\]"):
        on.coordination(torch.zeros(3, 1, 4, 32))


def test_coordination_matrix_trains():
    """With everything else frozen, the coupling alone fits the fused tokens to a target that
    needs the experts' tokens mixed differently: gradient reaches C and W, the loss falls."""
    model, _ = _pair()
    model.eval()  # no residual draw: the loss is a function of the parameters only
    with torch.no_grad():
        _, adapted = model.encode(torch.rand(4, 3, 32, 32))
    target = adapted["detection"] - adapted["classification"]
    model.requires_grad_(False)
    model.coordination.requires_grad_(True)
    assert model.fusion_modules()[1] is model.coordination
    optimizer = torch.optim.Adam(model.coordination.parameters(), lr=3e-2)
    losses = []
    for _ in range(40):
        loss = (model.fuse(adapted).tokens - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        assert model.coordination.coupling.grad.abs().sum() > 0
        assert model.coordination.contribution.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# -- the LLaVA-style language model -----------------------------------------------------------

VOCAB_SIZE, IMAGE_TOKEN, PAD = 48, 47, 0


def _tiny_vlm(lm="qwen2"):
    from astrea.models.llava import AstreaForCausalLM

    torch.manual_seed(0)
    configs = {
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
        "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config),
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
    }
    model_class, config_class = configs[lm]
    config = config_class(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=PAD,
                          bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
    vision = Astrea(VOCAB_SIZE, PAD, experts=tiny_experts(32), dim=32, num_tokens=4, heads=4)
    return AstreaForCausalLM(vision, model_class(config), IMAGE_TOKEN)


def _prompts():
    """Two prompts "<bos> <image> question <sep> answer <eos>" of unequal length, right-padded."""
    rows = [[1, IMAGE_TOKEN, 5, 6, 7, 3, 9, 10, 2], [1, IMAGE_TOKEN, 5, 8, 3, 11, 2, PAD, PAD]]
    input_ids = torch.tensor(rows)
    attention = (input_ids != PAD).long()
    answer = torch.zeros_like(input_ids, dtype=torch.bool)
    answer[0, 6:9] = True
    answer[1, 5:7] = True
    return input_ids, attention, answer


@pytest.mark.parametrize("lm", ["qwen2", "qwen3", "llama"])
def test_llava_loss_equals_the_lm_loss_on_the_spliced_embeddings(lm):
    from astrea.models.llava import IGNORE_INDEX, answer_labels

    model = _tiny_vlm(lm).eval()
    images = torch.rand(2, 3, 32, 32)
    input_ids, attention, answer = _prompts()
    labels = answer_labels(input_ids, answer)
    out = model(images, input_ids, attention, labels)
    T = 4
    assert out.logits.shape == (2, input_ids.shape[1] - 1 + T, VOCAB_SIZE)
    # the splice by hand: text before the placeholder, the projected visual tokens, the rest
    fused, visual = model.encode(images, input_ids, attention)
    embed = model.language_model.get_input_embeddings()
    spliced = torch.cat([embed(input_ids[:, :1]), visual, embed(input_ids[:, 2:])], dim=1)
    mask = torch.cat([attention[:, :1], torch.ones(2, T, dtype=torch.long), attention[:, 2:]], dim=1)
    expected_labels = torch.cat([labels[:, :1], torch.full((2, T), IGNORE_INDEX), labels[:, 2:]], dim=1)
    assert torch.equal(out.labels, expected_labels), "labels -100 on the visual and prompt positions"
    reference = model.language_model(inputs_embeds=spliced, attention_mask=mask, labels=expected_labels)
    assert torch.equal(out.loss, reference.loss)
    # and that loss is the mean next-token cross-entropy over the answer tokens
    logits = reference.logits[:, :-1].double()
    target = expected_labels[:, 1:]
    scored = target != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[scored], target[scored])
    assert scored.sum() == answer.sum()
    # The fp32 loss is a mean over n tokens of lse (a sum over V logits) minus one logit: at most
    # (V + n + 2) fp32 roundings of the magnitudes |lse| + |logit| that enter it.
    picked = logits[scored].gather(1, target[scored, None]).squeeze(1)
    magnitude = (torch.logsumexp(logits[scored], 1).abs() + picked.abs()).mean()
    bound = (logits.shape[-1] + int(scored.sum()) + 2) * torch.finfo(torch.float32).eps * magnitude
    assert abs(out.loss.double() - manual) <= bound, f"loss {out.loss.item()} vs float64 {manual.item()}"
    out.loss.backward()
    assert model.language.projector[0].weight.grad.abs().sum() > 0, "the loss trains the projector"
    assert any(p.grad is not None for p in model.vision.experts["caption"].parameters())


def test_llava_splice_rejects_prompts_without_one_image_token():
    model = _tiny_vlm()
    input_ids, attention, _ = _prompts()
    with pytest.raises(ValueError, match="exactly once; found"):
        model(torch.rand(2, 3, 32, 32), input_ids.masked_fill(input_ids == IMAGE_TOKEN, 5), attention)
    with pytest.raises(ValueError, match="image_token_id must be a token"):
        type(model)(model.vision, model.language, VOCAB_SIZE)


def test_llava_generate_uses_the_kv_cache_and_matches_greedy_decoding():
    model = _tiny_vlm().eval()
    images = torch.rand(2, 3, 32, 32)
    input_ids = torch.tensor([[1, IMAGE_TOKEN, 5, 6, 3], [1, IMAGE_TOKEN, 7, 8, 3]])
    new = model.generate(images, input_ids, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert new.shape == (2, 5) and new.dtype == torch.long
    cached = model.generate(images, input_ids, max_new_tokens=5, do_sample=False, eos_token_id=None,
                            return_dict_in_generate=True)
    assert cached.past_key_values is not None and cached.past_key_values.get_seq_length() == 4 + 4 + 4
    assert torch.equal(cached.sequences, new)
    # greedy decoding without a cache, one full forward per token, gives the same tokens
    _, visual = model.encode(images, input_ids)
    embeds, mask, _ = model.splice(visual, input_ids)
    embed = model.language_model.get_input_embeddings()
    tokens = []
    with torch.no_grad():
        for _ in range(5):
            logits = model.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
            step = logits[:, -1].argmax(-1)
            tokens.append(step)
            embeds = torch.cat([embeds, embed(step)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    assert torch.equal(new, torch.stack(tokens, 1))


def test_llava_save_pretrained_round_trip_gives_identical_logits(tmp_path):
    from astrea.models.llava import AstreaForCausalLM

    model = _tiny_vlm().eval()
    model.vision.experts["detection"].set_trainable(["vision_model.encoder.layers.1.*"])
    with torch.no_grad():  # weights away from their initial values
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "language_model" / "config.json").is_file()
    assert (tmp_path / "experts" / "segmentation" / "config.json").is_file()
    loaded = AstreaForCausalLM.from_pretrained(tmp_path).eval()
    images = torch.rand(2, 3, 32, 32)
    input_ids, attention, _ = _prompts()
    with torch.no_grad():
        assert torch.equal(loaded(images, input_ids, attention).logits, model(images, input_ids, attention).logits)
    assert loaded.vision.experts["detection"].trainable_names == model.vision.experts["detection"].trainable_names
    assert torch.equal(loaded.vision.experts["caption"].image_mean, model.vision.experts["caption"].image_mean)
    with pytest.raises(FileNotFoundError, match="not found"):
        AstreaForCausalLM.from_pretrained(tmp_path / "language_model")


def test_llava_save_pretrained_with_the_default_experts(tmp_path):
    from astrea.models.llava import AstreaForCausalLM

    tiny = _tiny_vlm()
    torch.manual_seed(1)
    model = AstreaForCausalLM(Astrea(VOCAB_SIZE, PAD, dim=32, num_tokens=4, heads=4, coordination=False),
                              tiny.language_model, IMAGE_TOKEN).eval()
    model.save_pretrained(tmp_path)
    loaded = AstreaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.vision.coordination is None
    images = torch.rand(2, 3, 32, 32)
    input_ids, attention, _ = _prompts()
    with torch.no_grad():
        assert torch.equal(loaded(images, input_ids, attention).logits, model(images, input_ids, attention).logits)
    model.vision.experts["caption"] = torch.nn.Identity()
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        model.save_pretrained(tmp_path / "other")


# -- the whole pipeline on transformers models -------------------------------------------------

@pytest.mark.parametrize("stop_after", [3, 9], ids=["mid-alignment", "mid-instruct"])
def test_transformers_aligner_resumes_exactly(tmp_path, stop_after):
    from astrea.models.hf_experts import VisionExpert
    from astrea.models.llava import LlavaLanguageModel
    from astrea.train import AlignConfig
    from astrea.train.demo import TransformersAligner, checkpoint_experts

    config = AlignConfig.quick(steps_instruct=4, queue_size=20, train_scenes=32, eval_scenes=8)
    uninterrupted = TransformersAligner(config)
    assert isinstance(uninterrupted.net["decoder"], LlavaLanguageModel)
    assert all(isinstance(uninterrupted.model.experts[name], VisionExpert) for name in EXPERTS)
    for _ in range(stop_after):
        uninterrupted.train_step()
    path = tmp_path / "ckpt.safetensors"
    uninterrupted.save(path)
    assert checkpoint_experts(path) == "transformers"
    position = (uninterrupted.stage_index, uninterrupted.step, uninterrupted.global_step)
    expected = [uninterrupted.train_step() for _ in range(2)]
    resumed = TransformersAligner.load(path)
    assert (resumed.stage_index, resumed.step, resumed.global_step) == position
    assert [resumed.train_step() for _ in range(2)] == expected
    for key, value in uninterrupted.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key


def test_demo_command_on_transformers_models(tmp_path):
    import json

    from astrea.cli import main
    from astrea.train.demo import checkpoint_experts

    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress", "--experts", "transformers",
                 "--train-scenes", "32", "--eval-scenes", "8"]) == 0
    assert len(list((out / "metrics").iterdir())) == 6
    assert (out / "coordination_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    coupling = json.loads((out / "coordination.json").read_text())["coupling"]
    assert len(coupling) == len(EXPERTS) and all(len(row) == len(EXPERTS) for row in coupling)
    assert checkpoint_experts(out / "checkpoint.safetensors") == "transformers"


def test_astrea_from_named_checkpoints(tmp_path):
    """The from_pretrained path, on checkpoints written here (a hub name loads the same way)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from astrea.models.llava import AstreaForCausalLM

    torch.manual_seed(0)
    t = transformers
    words = ["<pad>", "<s>", "</s>", "a", "red", "square", "what", "is", "it"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = t.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                          eos_token="</s>")
    lm = t.LlamaForCausalLM(t.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=2))
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    backbones = {"detection": t.Owlv2VisionModel(t.Owlv2VisionConfig(**VIT)),
                 "segmentation": t.SegformerModel(t.SegformerConfig(
                     num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                     patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])),
                 "classification": t.Dinov2Model(t.Dinov2Config(**VIT)),
                 "caption": t.SiglipVisionModel(t.SiglipVisionConfig(**VIT))}
    for role, backbone in backbones.items():
        backbone.save_pretrained(tmp_path / role)
    t.SiglipImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp_path / "caption")
    checkpoints = {role: str(tmp_path / role) for role in backbones}
    checkpoints["caption"] = {"name_or_path": checkpoints["caption"], "model_class": "SiglipVisionModel"}
    checkpoints["detection"] = {"name_or_path": checkpoints["detection"], "model_class": "Owlv2VisionModel"}
    model, tok = AstreaForCausalLM.from_named_checkpoints(checkpoints, str(tmp_path / "lm"), dim=32, num_tokens=4,
                                                          heads=4, image_size=32)
    assert model.image_token_id == len(words) and len(tok) == len(words) + 1, "<image> added"
    assert model.language_model.get_input_embeddings().num_embeddings == len(tok)
    assert model.vision.experts["caption"].image_mean.flatten().tolist() == [0.5] * 3, "the processor's statistics"
    prompt = tok(["<s> <image> what is it"], return_tensors="pt")
    new = model.eval().generate(torch.rand(1, 3, 32, 32), prompt["input_ids"], prompt["attention_mask"],
                                max_new_tokens=3, do_sample=False)
    assert new.shape == (1, 3)


def test_llava_generate_with_left_padding_matches_each_prompt_alone():
    model = _tiny_vlm().eval()
    images = torch.rand(2, 3, 32, 32)
    long_prompt, short_prompt = [1, IMAGE_TOKEN, 5, 6, 7, 3], [1, IMAGE_TOKEN, 8, 3]
    input_ids = torch.tensor([long_prompt, [PAD, PAD] + short_prompt])
    attention = (torch.arange(6) >= torch.tensor([[0], [2]])).long()
    batched = model.generate(images, input_ids, attention, max_new_tokens=4, do_sample=False, eos_token_id=None)
    for row, prompt in enumerate((long_prompt, short_prompt)):
        alone = model.generate(images[row:row + 1], torch.tensor([prompt]), max_new_tokens=4, do_sample=False,
                               eos_token_id=None)
        assert torch.equal(batched[row], alone[0]), row


def test_llava_with_a_bfloat16_language_model_and_a_bfloat16_expert():
    """The common mixed set-up: the LM in bf16, Astrea in fp32; and an expert backbone in bf16
    reads fp32 images."""
    from astrea.models.llava import answer_labels

    model = _tiny_vlm()
    model.language_model.to(torch.bfloat16)
    input_ids, attention, answer = _prompts()
    out = model(torch.rand(2, 3, 32, 32), input_ids, attention, answer_labels(input_ids, answer))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.language.projector[0].weight.grad.dtype == torch.float32
    expert = model.vision.experts["caption"]
    expert.backbone.to(torch.bfloat16)
    assert expert(torch.rand(1, 3, 32, 32)).dtype == torch.bfloat16


def test_llava_on_a_moe_lm_patched_with_apply_astrea():
    from astrea.integrations.transformers import apply_astrea
    from astrea.models.llava import AstreaForCausalLM, answer_labels

    torch.manual_seed(0)
    lm = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=2, max_position_embeddings=64))
    reference = AstreaForCausalLM(Astrea(VOCAB_SIZE, PAD, experts=tiny_experts(32), dim=32, num_tokens=4, heads=4),
                                  lm, IMAGE_TOKEN).eval()
    images = torch.rand(2, 3, 32, 32)
    input_ids, attention, answer = _prompts()
    labels = answer_labels(input_ids, answer)
    with torch.no_grad():
        expected = reference(images, input_ids, attention, labels).loss
        apply_astrea(lm)  # the same model, its MoE blocks on astrea's router and grouped-expert ops
        assert sum(hasattr(m, "astrea_routing") for m in lm.modules()) == 2, "both MoE blocks patched"
        patched = reference(images, input_ids, attention, labels).loss
    # the grouped-expert ops may sum in another order than the eager experts: fp32 rounding (~1e-7
    # relative per op) through two layers and the mean cross-entropy stays far below 1e-5
    assert torch.allclose(patched, expected, atol=0, rtol=1e-5), (patched.item(), expected.item())
    assert reference.generate(images, input_ids[:, :6], max_new_tokens=3, do_sample=False).shape == (2, 3)
