"""The Astrea model: heterogeneous vision experts, adapters, router and fusion."""

from astrea.models.astrea import Astrea, AstreaOutput, ExpertAdapter
from astrea.models.coordination import ExpertCoordination
from astrea.models.experts import EXPERTS, default_experts
from astrea.models.hf_experts import VisionExpert, pretrained_experts, tiny_experts
from astrea.models.language import TextEncoder, TinyDecoder
from astrea.models.llava import AstreaForCausalLM, LlavaLanguageModel, answer_labels

__all__ = ["EXPERTS", "Astrea", "AstreaForCausalLM", "AstreaOutput", "ExpertAdapter", "ExpertCoordination",
           "LlavaLanguageModel", "TextEncoder", "TinyDecoder", "VisionExpert", "answer_labels", "default_experts",
           "pretrained_experts", "tiny_experts"]
