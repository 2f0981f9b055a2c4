"""Astrea's visual tokens in a transformers causal language model, LLaVA style.

:class:`LlavaLanguageModel` is the language side: any ``AutoModelForCausalLM`` (Qwen2/Qwen3,
Llama, a MoE LLM patched with :func:`astrea.integrations.transformers.apply_astrea`, ...)
plus a two-layer MLP projector from Astrea's width ``D`` to the LM's hidden size ``H`` and a
projection of the prompt's mean embedding to the router's instruction input. It also has the
interface of :class:`~astrea.models.language.TinyDecoder` (``instruction_embedding``,
``loss_and_accuracy`` with the visual tokens first), so :class:`~astrea.train.ProgressiveAligner`
trains it in place of the tiny decoder.

:class:`AstreaForCausalLM` is the whole vision-language model: the Astrea front end, whose
fused tokens ``[B, T, D]`` are projected and spliced into the input embeddings where the
prompt holds its image placeholder token (one per sample, replaced by the ``T`` visual
tokens), with labels ``-100`` on the visual positions (and wherever the caller masks the
prompt, see :func:`answer_labels`); ``generate()`` runs the LM's own generation (KV cache)
from the spliced embeddings; ``save_pretrained``/``from_pretrained`` store the LM the
transformers way and the vision side in one safetensors file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from astrea.models.astrea import Astrea, AstreaOutput
from astrea.models.experts import EXPERTS
from astrea.models.hf_experts import VisionExpert

IGNORE_INDEX = -100
VISION_WEIGHTS = "astrea_vision.safetensors"
FORMAT = "astrea.AstreaForCausalLM/1"


def answer_labels(input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Labels that score only the answer: ``input_ids`` where ``answer_mask`` is true, ``-100``
    on the prompt (and padding)."""
    if answer_mask.shape != input_ids.shape:
        raise ValueError(f"answer_labels: answer_mask must have the shape of input_ids {tuple(input_ids.shape)}; "
                         f"got {tuple(answer_mask.shape)}")
    return input_ids.masked_fill(~answer_mask.bool(), IGNORE_INDEX)


class LlavaLanguageModel(nn.Module):
    """A transformers causal LM that reads Astrea's fused visual tokens.

    Args:
        language_model: a transformers causal LM (``PreTrainedModel`` with ``get_input_embeddings``).
        visual_dim: Astrea's token width ``D``.
        pad_id: the padding token (default the LM config's ``pad_token_id``); used where the
            aligner's interface receives padded prompts without an attention mask.
    """

    def __init__(self, language_model: nn.Module, visual_dim: int, pad_id: int | None = None):
        super().__init__()
        self.language_model = language_model
        hidden = language_model.get_input_embeddings().embedding_dim
        self.pad_id = language_model.config.pad_token_id if pad_id is None else pad_id
        # LLaVA-1.5's projector: Linear, GELU, Linear
        self.projector = nn.Sequential(nn.Linear(visual_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.instruction_proj = nn.Linear(hidden, visual_dim)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    def instruction_from_embeddings(self, embeddings: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The router's instruction input ``[B, D]``: the mean embedding over ``keep``, projected."""
        weights = keep.to(embeddings.dtype).unsqueeze(-1)
        mean = (embeddings * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.instruction_proj(mean.to(self.instruction_proj.weight.dtype))

    def instruction_embedding(self, instruction: torch.Tensor) -> torch.Tensor:
        """Instruction tokens ``[B, L]`` (padded with ``pad_id``) to the router's input ``[B, D]``."""
        return self.instruction_from_embeddings(self.embed(instruction), instruction != self.pad_id)

    def logits(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   use_cache=False).logits

    def forward(self, visual: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """As :class:`TinyDecoder`: logits ``[B, L, vocab]`` at the text positions of
        ``[projected visual tokens; tokens]``; row ``i`` predicts ``tokens[:, i + 1]``."""
        embeds = torch.cat([self.projector(visual).to(self.embed(tokens).dtype), self.embed(tokens)], dim=1)
        keep = torch.cat([torch.ones(visual.shape[:2], dtype=torch.bool, device=tokens.device),
                          tokens != self.pad_id], dim=1)
        return self.logits(embeds, keep.long())[:, visual.shape[1]:]

    def loss_and_accuracy(self, visual: torch.Tensor, prompts: torch.Tensor,
                          answer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`TinyDecoder.loss_and_accuracy`: teacher-forced cross-entropy on the answer
        tokens, the per-token hits and the per-sample exact match."""
        logits = self(visual, prompts[:, :-1]).float()
        target, scored = prompts[:, 1:], answer_mask[:, 1:]
        loss = F.cross_entropy(logits[scored], target[scored])
        hits = (logits.argmax(-1) == target) | ~scored
        return loss, (logits.argmax(-1) == target)[scored], hits.all(dim=1)


class AstreaForCausalLM(nn.Module):
    """Astrea's vision front end and a causal LM, LLaVA style.

    Args:
        vision: the :class:`~astrea.models.Astrea` front end.
        language: the :class:`LlavaLanguageModel` (or a transformers causal LM, wrapped here).
        image_token_id: the placeholder token; each prompt holds it exactly once, where the
            image's ``T`` visual tokens go.
    """

    def __init__(self, vision: Astrea, language: LlavaLanguageModel | nn.Module, image_token_id: int):
        super().__init__()
        if not isinstance(language, LlavaLanguageModel):
            language = LlavaLanguageModel(language, vision.config["dim"])
        vocab = language.language_model.get_input_embeddings().num_embeddings
        if not 0 <= image_token_id < vocab:
            raise ValueError(f"AstreaForCausalLM: image_token_id must be a token of the LM's vocabulary "
                             f"[0, {vocab}); got {image_token_id}")
        self.vision, self.language = vision, language
        self.image_token_id = image_token_id

    @classmethod
    def from_named_checkpoints(cls, experts: dict[str, str | dict], language_model: str, *,
                               image_token: str = "<image>", dim: int = 256, num_tokens: int = 64, heads: int = 8,
                               image_size: int = 224, vocab_size: int | None = None, lm_kwargs: dict | None = None,
                               **astrea_kwargs):
        """Astrea on pretrained checkpoints (hub names or local folders): ``experts`` maps each
        role to a vision checkpoint (see :func:`~astrea.models.hf_experts.pretrained_experts`),
        ``language_model`` names a causal LM and its tokenizer. ``image_token`` is added to the
        tokenizer (and the LM's embeddings resized) when missing. Returns ``(model, tokenizer)``.

        ``vocab_size``: the caption head's bag-of-words size for pre-alignment (default the
        tokenizer's); other keyword arguments go to :class:`~astrea.models.Astrea`.
        """
        import transformers

        from astrea.models.hf_experts import pretrained_experts

        tokenizer = transformers.AutoTokenizer.from_pretrained(language_model)
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
        lm = transformers.AutoModelForCausalLM.from_pretrained(language_model, **(lm_kwargs or {}))
        if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(len(tokenizer))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        vision = Astrea(vocab_size or len(tokenizer), pad if pad is not None else 0,
                        experts=pretrained_experts(experts), dim=dim, num_tokens=num_tokens, heads=heads,
                        image_size=image_size, **astrea_kwargs)
        language = LlavaLanguageModel(lm, dim, pad_id=pad)
        return cls(vision, language, tokenizer.convert_tokens_to_ids(image_token)), tokenizer

    @property
    def language_model(self) -> nn.Module:
        return self.language.language_model

    # -- splicing -------------------------------------------------------------------------

    def _placeholders(self, input_ids: torch.Tensor) -> torch.Tensor:
        found = input_ids == self.image_token_id
        per_row = found.sum(1)
        if not torch.all(per_row == 1):
            raise ValueError(f"AstreaForCausalLM: every prompt must hold the image token {self.image_token_id} "
                             f"exactly once; found {per_row.tolist()} per row")
        return found.long().argmax(1)

    def splice(self, visual: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               labels: torch.Tensor | None = None):
        """Replaces each row's image token by its ``T`` projected visual tokens ``visual [B, T, H]``.

        Returns ``(inputs_embeds [B, L - 1 + T, H], attention_mask, labels)``; the labels are
        ``-100`` on the visual positions (``None`` stays ``None``)."""
        batch, length = input_ids.shape
        count = visual.shape[1]
        where = self._placeholders(input_ids)  # [B]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # destination of every text position: shifted by T - 1 after the placeholder
        positions = torch.arange(length, device=input_ids.device).expand(batch, -1)
        destination = positions + (positions > where[:, None]) * (count - 1)
        text = ~(positions == where[:, None])
        rows = torch.arange(batch, device=input_ids.device)[:, None].expand(-1, length)
        embeds = self.language.embed(input_ids)
        out_len = length - 1 + count
        spliced = embeds.new_zeros(batch, out_len, embeds.shape[-1])
        spliced[rows[text], destination[text]] = embeds[text]
        visual_at = where[:, None] + torch.arange(count, device=input_ids.device)  # [B, T]
        spliced[torch.arange(batch, device=input_ids.device)[:, None], visual_at] = visual.to(embeds.dtype)
        mask = attention_mask.new_ones(batch, out_len)
        mask[rows[text], destination[text]] = attention_mask[text]
        if labels is not None:
            spliced_labels = labels.new_full((batch, out_len), IGNORE_INDEX)
            spliced_labels[rows[text], destination[text]] = labels[text]
            labels = spliced_labels.masked_fill(mask == 0, IGNORE_INDEX)
        return spliced, mask, labels

    def encode(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               offset: int = 0) -> tuple[AstreaOutput, torch.Tensor]:
        """Astrea's output, routed with the prompt as instruction, and its projected tokens ``[B, T, H]``."""
        keep = input_ids != self.image_token_id
        if attention_mask is not None:
            keep = keep & attention_mask.bool()
        instruction = self.language.instruction_from_embeddings(self.language.embed(input_ids), keep)
        fused = self.vision(images, instruction, offset)
        return fused, self.language.projector(fused.tokens)

    # -- training and generation ----------------------------------------------------------

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, offset: int = 0, **lm_kwargs):
        """The LM's output on the spliced embeddings (``loss`` when ``labels`` are given: its
        next-token cross-entropy over the positions whose label is not ``-100``), with
        ``vision`` (Astrea's output, for the balancing losses) and the spliced ``labels``
        added to it."""
        fused, visual = self.encode(images, input_ids, attention_mask, offset)
        embeds, mask, labels = self.splice(visual, input_ids, attention_mask, labels)
        output = self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **lm_kwargs)
        output["vision"] = fused
        output["labels"] = labels
        return output

    @torch.no_grad()
    def generate(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **generate_kwargs) -> torch.Tensor:
        """New tokens ``[B, new]`` from the LM's ``generate`` (KV cache on) after the spliced
        prompt; ``generate_kwargs`` go to it (``max_new_tokens``, ``do_sample``, ...). Prompts
        of unequal length must be left-padded."""
        fused, visual = self.encode(images, input_ids, attention_mask)
        embeds, mask, _ = self.splice(visual, input_ids, attention_mask)
        generate_kwargs.setdefault("use_cache", True)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)

    # -- save and load --------------------------------------------------------------------

    def save_pretrained(self, directory) -> None:
        """Writes ``language_model/`` (the LM's own ``save_pretrained``), ``experts/<role>/``
        (each transformers expert's config) and ``astrea_vision.safetensors`` (every other
        weight, with the configuration to rebuild the model in its metadata)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        self.language_model.save_pretrained(directory / "language_model")
        experts = {}
        for role in EXPERTS:
            expert = self.vision.experts[role]
            if isinstance(expert, VisionExpert):
                expert.backbone.config.save_pretrained(directory / "experts" / role)
                experts[role] = expert.settings()
            elif type(expert).__module__ == "astrea.models.experts":
                experts[role] = {"kind": "astrea-default"}
            else:
                raise ValueError(f"AstreaForCausalLM.save_pretrained: the {role} expert ({type(expert).__name__}) "
                                 "is neither a VisionExpert nor a default Astrea expert, so it cannot be rebuilt; "
                                 "wrap it in VisionExpert or save the state_dict yourself")
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                   if not k.startswith("language.language_model.")}
        metadata = {"format": FORMAT, "image_token_id": str(self.image_token_id),
                    "astrea": json.dumps(self.vision.config), "experts": json.dumps(experts),
                    "pad_id": json.dumps(self.language.pad_id)}
        save_file(tensors, str(directory / VISION_WEIGHTS), metadata=metadata)

    @classmethod
    def from_pretrained(cls, directory, **lm_kwargs) -> "AstreaForCausalLM":
        """Rebuilds what :meth:`save_pretrained` wrote; ``lm_kwargs`` go to the LM's
        ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``, ...)."""
        import transformers
        from safetensors import safe_open
        from safetensors.torch import load_file

        directory = Path(directory)
        weights = directory / VISION_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"AstreaForCausalLM.from_pretrained: {weights} not found (not a directory "
                                    "written by AstreaForCausalLM.save_pretrained)")
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"AstreaForCausalLM.from_pretrained: {weights} is not a {FORMAT} file "
                             f"(format {metadata.get('format')!r})")
        experts = {}
        for role, spec in json.loads(metadata["experts"]).items():
            if spec.get("kind") == "astrea-default":
                experts[role] = None
            else:
                config = transformers.AutoConfig.from_pretrained(directory / "experts" / role)
                experts[role] = VisionExpert.from_settings(config, spec)
        astrea_config = json.loads(metadata["astrea"])
        if any(module is None for module in experts.values()):
            from astrea.models.experts import default_experts

            defaults = default_experts(astrea_config["image_size"])
            experts = {role: defaults[role] if module is None else module for role, module in experts.items()}
        vision = Astrea(**astrea_config, experts=experts)
        lm = transformers.AutoModelForCausalLM.from_pretrained(directory / "language_model", **lm_kwargs)
        language = LlavaLanguageModel(lm, astrea_config["dim"], pad_id=json.loads(metadata["pad_id"]))
        model = cls(vision, language, int(metadata["image_token_id"]))
        missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
        missing = [k for k in missing if not k.startswith("language.language_model.")]
        if missing or unexpected:
            raise ValueError(f"AstreaForCausalLM.from_pretrained: {weights} does not match the model "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model
