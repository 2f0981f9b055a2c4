"""The Astrea model: attention chooser, experts, heads, adapters, fusion, language side, demo data.

Tolerances are derived: results within 4x the error of plain PyTorch's fp32 computation of
the same formula against float64 (:func:`tests.utils.assert_within_torch_error`), sums within
their accumulation bound (:func:`tests.utils.accumulation_bound`).
"""

import copy
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

import astrea
from astrea.data import CLASS_NAMES, TASKS, Vocabulary, generate_scenes
from astrea.models import EXPERTS, Astrea, ExpertAdapter, TextEncoder, TinyDecoder, default_experts
from astrea.models.astrea import BASE_EXPERT
from astrea.models.experts import BoxHead, CaptionHead, LabelHead, MaskHead, box_iou
from astrea.nn import attention as attn
from astrea.reference import dense_combine as combine_ref
from astrea.train.metrics import in_batch_info_nce
from tests.utils import (UNIT_ROUNDOFF, accumulation_bound, assert_within, assert_within_torch_error, float64_leaves,
                         strided)

VOCAB = Vocabulary()


@pytest.fixture(autouse=True)
def _one_thread():
    """Models this small run fastest single-threaded (and a busy CPU makes extra threads spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _plain_attention(q, k, v, causal):
    """softmax(q k^T / sqrt(d)) v written out in the inputs' dtype (bottom-right causal mask)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        lq, lk = q.shape[2], k.shape[2]
        keep = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("lq, lk, causal", [(7, 7, True), (3, 11, True), (5, 9, False)])
def test_attention_matches_reference(lq, lk, causal):
    q, k, v = torch.randn(2, 3, lq, 8), torch.randn(2, 3, lk, 8), torch.randn(2, 3, lk, 8)
    assert_within_torch_error(attn.attention(strided(q), k, v, causal=causal),
                              _plain_attention(q.double(), k.double(), v.double(), causal),
                              _plain_attention(q, k, v, causal), what="attention")


def test_attention_backend_chooser(monkeypatch):
    installed = set()
    monkeypatch.setattr(attn, "_installed", lambda module: module in installed)
    assert attn.attention_backend("cpu", torch.float16) == "sdpa"
    assert attn.attention_backend("cuda", torch.bfloat16) == "sdpa"
    installed.add("xformers")
    assert attn.attention_backend("cuda", torch.bfloat16) == "xformers"
    installed.add("flash_attn")
    assert attn.attention_backend("cuda", torch.float16) == "flash-attn"
    assert attn.attention_backend("cuda", torch.float32) == "sdpa", "flash-attn and xformers need half precision"
    assert attn.attention_backend("cpu", torch.float16) == "sdpa"


def test_attention_rejects_bad_arguments():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="attention: expected q"):
        attn.attention(q, torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4))
    with pytest.raises(TypeError, match="attention: k must have dtype float32"):
        attn.attention(q, q.double(), q)
    with pytest.raises(ValueError, match="causal attention needs Lq <= Lk"):
        attn.attention(q, q[:, :, :2], q[:, :, :2], causal=True)


def test_info_reports_the_attention_backend():
    from astrea import info

    rows = dict(info.collect())
    assert rows["attention backend"].startswith(attn.attention_backend("cuda", torch.bfloat16))


def test_default_experts_are_heterogeneous_and_map_images_to_tokens():
    experts = default_experts(32)
    images = torch.rand(3, 3, 32, 32)
    kinds = set()
    for name in EXPERTS:
        tokens = experts[name](images)
        assert tokens.dim() == 3 and tokens.shape[0] == 3, name
        kinds.add(type(experts[name]).__name__)
    assert len(kinds) == 4


def test_heads_predict_their_targets():
    scenes = generate_scenes(4, seed=3)
    tokens = torch.randn(4, 64, 24, requires_grad=True)
    cases = [
        (BoxHead(24), scenes.boxes, (4, 2, 4)),
        (MaskHead(24, 32), scenes.masks, (4, 32, 32)),
        (LabelHead(24, len(CLASS_NAMES)), scenes.labels, (4, len(CLASS_NAMES))),
        (CaptionHead(24, len(VOCAB), VOCAB.pad), scenes.captions, (4, len(VOCAB))),
    ]
    for head, target, shape in cases:
        prediction = head(tokens)
        assert prediction.shape == shape, type(head).__name__
        loss = head.loss(prediction, target)
        assert loss.ndim == 0 and torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, tokens)
        assert grad.abs().sum() > 0, type(head).__name__
    with pytest.raises(ValueError, match="MaskHead: tokens must form a square grid"):
        MaskHead(24, 32)(torch.randn(1, 10, 24))


def _exact_iou(a: list[float], b: list[float]) -> float:
    """IoU of two boxes in exact rational arithmetic on their float64 coordinates."""
    a, b = [Fraction(v) for v in a], [Fraction(v) for v in b]
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return float(inter / (area_a + area_b - inter))


def test_box_iou_and_contrastive_loss_gradcheck():
    a = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.6, 0.9]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.3, 0.2, 0.7, 0.6], [0.25, 0.35, 0.55, 0.8]], dtype=torch.float64)
    # A box against itself: the intersection is its area, computed the same way: exactly 1.
    assert box_iou(a[:1], a[:1]).item() == 1.0
    # 3 roundings per area and the intersection, 2 for the union (whose cancellation at most
    # doubles theirs: it is >= half the sum of the areas), 1 for the quotient: within 16 u.
    exact = _exact_iou(a[0].tolist(), b[0].tolist())
    assert abs(box_iou(a[:1], b[:1]).item() - exact) <= 16 * UNIT_ROUNDOFF[torch.float64] * exact
    assert torch.autograd.gradcheck(lambda x: box_iou(x, b), (a,))
    q = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: in_batch_info_nce(x, y, 0.5), (q, k))


def test_adapter_resamples_to_common_token_count():
    adapter = ExpertAdapter(in_dim=24, dim=32, num_tokens=5, heads=4)
    assert adapter(torch.randn(2, 49, 24)).shape == (2, 5, 32)
    assert adapter(strided(torch.randn(2, 7, 24))).shape == (2, 5, 32)


def _small_astrea(**kwargs):
    return Astrea(len(VOCAB), VOCAB.pad, dim=32, num_tokens=5, **kwargs)


def test_astrea_output_shapes_and_gradients():
    model = _small_astrea()
    images = torch.rand(3, 3, 32, 32)
    out = model(images, instruction=torch.randn(3, 32), offset=4)
    assert out.tokens.shape == (3, 5, 32)
    assert out.router_probs.shape == (3, len(EXPERTS))
    # A softmax divides the same E rounded exponentials by their fp32 sum (E - 1 roundings, and
    # one per quotient), and the check sums E quotients again: within 2 E u of 1.
    ones = torch.ones(3)
    assert_within(out.router_probs.sum(-1), ones, accumulation_bound(ones, 2 * len(EXPERTS), ones, torch.float32),
                  what="router probabilities")
    assert ((out.expert_weights > 0).sum(-1) == model.top_k).all()
    (out.tokens.square().mean() + out.aux_loss).backward()
    for name in EXPERTS:
        assert model.adapters[name].project.weight.grad is not None, name
        assert any(p.grad is not None for p in model.experts[name].parameters()), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.router.parameters())
    model.eval()
    with torch.no_grad():
        first, second = model(images, offset=1).tokens, model(images, offset=2).tokens
    assert torch.equal(first, second), "evaluation must not drop the residual at random"


def test_astrea_accepts_any_expert_modules():
    class Flatten(nn.Module):  # a foreign encoder: 16 tokens of width 12
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3 * 8 * 8, 12)

        def forward(self, images):
            return self.proj(images.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2))

    experts = default_experts(32)
    experts["classification"] = Flatten()
    model = _small_astrea(experts=experts)
    assert model.adapters["classification"].project.in_features == 12
    assert model(torch.rand(2, 3, 32, 32)).tokens.shape == (2, 5, 32)
    with pytest.raises(ValueError, match="Astrea: experts must be named"):
        _small_astrea(experts={"detection": Flatten()})
    with pytest.raises(ValueError, match="residual_p must be in"):
        _small_astrea(residual_p=0.0)


def test_decoder_is_causal_and_scores_answers():
    decoder = TinyDecoder(len(VOCAB), 32, max_len=30, pad_id=VOCAB.pad)
    visual = torch.randn(2, 5, 32)
    tokens = torch.randint(4, len(VOCAB), (2, 9))
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % len(VOCAB)
    before, after = decoder(visual, tokens), decoder(visual, changed)
    assert before.shape == (2, 9, len(VOCAB))
    assert torch.equal(before[:, :6], after[:, :6]) and not torch.equal(before[:, 6:], after[:, 6:])
    scenes = generate_scenes(2, seed=1)
    loss, token_hits, exact = decoder.loss_and_accuracy(visual, scenes.prompts[:, 0], scenes.answer_mask[:, 0])
    assert torch.isfinite(loss) and token_hits.numel() == int(scenes.answer_mask[:, 0, 1:].sum())
    assert exact.shape == (2,)
    text = TextEncoder(len(VOCAB), 32, 12, VOCAB.pad)
    assert text(scenes.captions).shape == (2, 32)


def test_decoder_compiles_fullgraph():
    decoder = TinyDecoder(len(VOCAB), 32, max_len=30, pad_id=VOCAB.pad).eval()
    visual, tokens = torch.randn(2, 5, 32), torch.randint(0, len(VOCAB), (2, 9))
    compiled = torch.compile(decoder, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected = copy.deepcopy(decoder).double()(visual.double(), tokens)
        assert_within_torch_error(compiled(visual, tokens), expected, decoder(visual, tokens), what="compiled decoder")


def test_scenes_are_deterministic_and_annotations_exact():
    scenes = generate_scenes(12, seed=5)
    again = generate_scenes(12, seed=5)
    assert torch.equal(scenes.images, again.images) and torch.equal(scenes.prompts, again.prompts)
    assert not torch.equal(scenes.images, generate_scenes(12, seed=6).images)
    s = scenes.images.shape[-1]
    for n in range(len(scenes)):
        left, right = (scenes.boxes[n] * s).round().long().tolist()
        assert left[2] <= s // 2 <= right[0], "the left object lies in the left half"
        inside = torch.zeros(s, s, dtype=torch.bool)
        for x0, y0, x1, y1 in (left, right):
            inside[y0:y1, x0:x1] = True
            assert scenes.masks[n, y0:y1, x0:x1].any(0).all() and scenes.masks[n, y0:y1, x0:x1].any(1).all()
        assert not scenes.masks[n][~inside].any(), "boxes are tight around the mask"
        caption = VOCAB.decode(scenes.captions[n].tolist())
        assert caption.startswith("a ") and (" left of a " in caption or " right of a " in caption)
        label = CLASS_NAMES[scenes.labels[n]]
        first, second = caption.split(" of a ")
        first, relation = first.rsplit(" ", 1)
        assert (first if relation == "left" else second).endswith(label), (caption, label)
        answers = [VOCAB.decode(p[m].tolist()) for p, m in zip(scenes.prompts[n], scenes.answer_mask[n])]
        assert answers[TASKS.index("caption")] == caption
        assert answers[TASKS.index("position")] in ("left", "right")
    with pytest.raises(ValueError, match="split must be"):
        generate_scenes(1, seed=0, split="test")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        VOCAB.encode("a purple circle")


def test_astrea_fusion_on_the_kernels_matches_the_reference():
    """On the kernels and on the references: the same experts chosen; the routing weights (the
    chosen softmax probabilities, renormalised) and the balancing loss within 4x the error of
    plain PyTorch's fp32 softmax against float64; the tokens within the accumulation bound of
    the dense combine and residual in float64, given those weights."""
    model = _small_astrea()
    _, adapted = model.encode(torch.rand(3, 3, 32, 32))
    instruction = torch.randn(3, 32)
    seen = {}
    hooks = [model.coordination.register_forward_hook(lambda module, args, out: seen.update(stacked=out.detach())),
             model.allocator.register_forward_hook(lambda module, args, out: seen.update(logits=out.detach()))]
    runs = {}
    for backend in ("reference", "triton"):
        with astrea.backend(backend):
            runs[backend] = model.fuse(adapted, instruction, offset=7), seen["stacked"], seen["logits"]
    for hook in hooks:
        hook.remove()
    assert torch.equal(runs["triton"][0].counts.long(), runs["reference"][0].counts.long())
    num_experts, (num_samples, top_k) = len(EXPERTS), (3, model.top_k)
    for backend, (out, stacked, logits) in runs.items():
        chosen = out.expert_weights > 0
        exact, own = logits.double().softmax(-1), out.router_probs

        def renormalised(probs):
            kept = torch.where(chosen, probs, 0)
            return kept / kept.sum(-1, keepdim=True)

        def balancing_loss(probs):
            fractions = out.counts.to(probs.dtype) / (num_samples * top_k)
            return num_experts * (fractions * probs.sum(0) / num_samples).sum()

        assert_within_torch_error(out.expert_weights, renormalised(exact), renormalised(own), what=f"{backend} weights")
        assert_within_torch_error(out.aux_loss, balancing_loss(exact), balancing_loss(own),
                                  what=f"{backend} balancing loss")

        def fused(magnitude):
            ys, weights, scale = float64_leaves(stacked, out.expert_weights, model.allocator.scale, magnitude=magnitude)
            return combine_ref.combine_residual(ys, weights, ys[model.names.index(BASE_EXPERT)], model.residual_p,
                                                seed=model.seed, offset=7, expert_scale=scale)

        expected, terms = fused(False), fused(True)
        # w * s, E products and E - 1 additions, then r * (1/p rounded) and the add: E + 4.
        assert_within(out.tokens, expected, accumulation_bound(terms, num_experts + 4, expected, torch.float32),
                      what=f"{backend} fused tokens")
