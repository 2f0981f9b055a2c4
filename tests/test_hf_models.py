"""Astrea on transformers models: vision experts per role (tiny configs, nothing downloaded),
the coordination matrix, and the LLaVA-style wrapper around a causal LM."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from astrea.models import EXPERTS, Astrea  # noqa: E402
from astrea.models.hf_experts import VisionExpert, tiny_experts  # noqa: E402
from tests.test_model import _one_thread  # noqa: E402,F401  (autouse fixture: single-threaded torch)

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
    assert expert.image_mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert expert.image_std.flatten().tolist() == pytest.approx([0.6, 0.5, 0.4])
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
