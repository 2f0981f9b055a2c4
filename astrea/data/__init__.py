"""Offline demo data: generated shape scenes (with scikit-learn's bundled handwritten
digits as real glyphs) with boxes, masks, labels, captions, questions and answers."""

from astrea.data.shapes import CAPTION_LEN, INSTRUCTION_LEN, PROMPT_LEN, TASKS, Scenes, generate_scenes
from astrea.data.text import CLASS_NAMES, Vocabulary

__all__ = ["CAPTION_LEN", "CLASS_NAMES", "INSTRUCTION_LEN", "PROMPT_LEN", "Scenes", "TASKS", "Vocabulary",
           "generate_scenes"]
