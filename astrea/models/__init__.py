"""The Astrea model: heterogeneous vision experts, adapters, router and fusion."""

from astrea.models.astrea import Astrea, AstreaOutput, ExpertAdapter
from astrea.models.experts import EXPERTS, default_experts
from astrea.models.hf_experts import VisionExpert, pretrained_experts, tiny_experts
from astrea.models.language import TextEncoder, TinyDecoder

__all__ = ["EXPERTS", "Astrea", "AstreaOutput", "ExpertAdapter", "TextEncoder", "TinyDecoder", "VisionExpert",
           "default_experts", "pretrained_experts", "tiny_experts"]
