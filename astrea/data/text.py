"""The closed word vocabulary of the demo data and its tokenizer."""

from __future__ import annotations

import torch

PAD, BOS, SEP, EOS = "<pad>", "<bos>", "<sep>", "<eos>"
SPECIALS = (PAD, BOS, SEP, EOS)

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Object classes: the three shapes, then the ten handwritten digits.
CLASS_NAMES = SHAPES + tuple(f"digit {w}" for w in DIGIT_WORDS)
RELATIONS = ("left", "right")
FUNCTION_WORDS = ("a", "of", "what", "color", "is", "the", "object", "where", "describe", "image", "digit")

WORDS = SPECIALS + COLORS + SHAPES + DIGIT_WORDS + RELATIONS + FUNCTION_WORDS


class Vocabulary:
    """Word-level tokenizer over :data:`WORDS` (fixed order, so ids never change)."""

    def __init__(self, words: tuple[str, ...] = WORDS):
        if len(set(words)) != len(words):
            raise ValueError("Vocabulary: words must be unique")
        self.words = words
        self.ids = {w: i for i, w in enumerate(words)}
        self.pad, self.bos, self.sep, self.eos = (self.ids[s] for s in SPECIALS)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[w] for w in text.split()]
        except KeyError as exc:
            raise ValueError(f"Vocabulary.encode: word {exc.args[0]!r} of {text!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        return " ".join(self.words[i] for i in ids if i not in (self.pad, self.bos, self.sep, self.eos))

    def pad_to(self, ids: list[int], length: int) -> torch.Tensor:
        if len(ids) > length:
            raise ValueError(f"Vocabulary.pad_to: {len(ids)} tokens do not fit in length {length}")
        return torch.tensor(ids + [self.pad] * (length - len(ids)), dtype=torch.long)
