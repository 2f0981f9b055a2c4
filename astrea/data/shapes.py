"""Generated shape scenes with exact annotations, for the offline demo.

Each scene holds two objects on a dark canvas, one in the left half and one in the right
half: a coloured circle, square or triangle, or a coloured handwritten digit from
scikit-learn's bundled ``load_digits`` (real images; even-indexed glyphs for the training
split, odd-indexed ones for evaluation). Every scene comes with

* ``labels``: the class of the left object (:data:`~astrea.data.text.CLASS_NAMES`),
* ``boxes``: ``[2, 4]`` normalised ``(x0, y0, x1, y1)`` of the left and right objects,
* ``masks``: the foreground mask,
* ``captions``: e.g. "a red circle left of a blue digit seven",
* ``prompts``: one instruction/answer sequence per task of :data:`TASKS`.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from astrea.data.text import CLASS_NAMES, COLORS, SHAPES, Vocabulary

TASKS = ("caption", "color", "shape", "position")
CAPTION_LEN = 12
INSTRUCTION_LEN = 6
PROMPT_LEN = 20

_RGB = {"red": (1.0, 0.15, 0.15), "green": (0.15, 0.9, 0.2), "blue": (0.2, 0.35, 1.0), "yellow": (1.0, 0.9, 0.1)}
_DIGIT_PROBABILITY = 0.3


@functools.lru_cache(maxsize=1)
def _digit_glyphs() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits in [0, 1], and their labels (shipped with the package)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


@dataclasses.dataclass
class Scenes:
    """A set of scenes as stacked tensors (first dimension: scene)."""

    images: torch.Tensor  # [N, 3, S, S] float32 in [0, 1]
    labels: torch.Tensor  # [N] int64, class of the left object
    boxes: torch.Tensor  # [N, 2, 4] float32, normalised xyxy of the left and right objects
    masks: torch.Tensor  # [N, S, S] float32 foreground
    captions: torch.Tensor  # [N, CAPTION_LEN] int64 tokens, padded
    instructions: torch.Tensor  # [N, len(TASKS), INSTRUCTION_LEN] int64 tokens, padded
    prompts: torch.Tensor  # [N, len(TASKS), PROMPT_LEN] int64: <bos> instruction <sep> answer <eos> <pad>...
    answer_mask: torch.Tensor  # [N, len(TASKS), PROMPT_LEN] bool: answer and <eos> positions of prompts

    def __len__(self) -> int:
        return self.images.shape[0]

    def select(self, index: torch.Tensor) -> "Scenes":
        return Scenes(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})


@functools.lru_cache(maxsize=None)
def _object_mask(kind: int, size: int, glyph_index: int) -> np.ndarray:
    """Intensity in [0, 1] of one object drawn in a ``size x size`` box (``glyph_index`` for digits)."""
    centre = (np.arange(size) + 0.5) / size - 0.5
    y, x = np.meshgrid(centre, centre, indexing="ij")
    if kind >= len(SHAPES):
        image = torch.from_numpy(_digit_glyphs()[0][glyph_index])[None, None]
        scaled = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        return np.clip(scaled[0, 0].numpy() * 1.4, 0.0, 1.0) * (scaled[0, 0].numpy() > 0.35)
    name = SHAPES[kind]
    if name == "circle":
        return (x**2 + y**2 <= 0.25).astype(np.float32)
    if name == "square":
        return np.ones((size, size), np.float32)
    return (np.abs(x) <= (y + 0.5) / 2).astype(np.float32)  # triangle, apex up


def _name(kind: int) -> str:
    return CLASS_NAMES[kind]


def generate_scenes(count: int, *, seed: int, image_size: int = 32, split: str = "train") -> Scenes:
    """``count`` scenes drawn deterministically from ``seed``; ``split`` picks the digit glyphs."""
    if split not in ("train", "eval"):
        raise ValueError(f"generate_scenes: split must be 'train' or 'eval'; got {split!r}")
    if image_size < 24:
        raise ValueError(f"generate_scenes: image_size must be at least 24; got {image_size}")
    glyphs, glyph_labels = _digit_glyphs()
    pool = np.arange(0 if split == "train" else 1, len(glyphs), 2)
    by_digit = [pool[glyph_labels[pool] == d] for d in range(10)]
    rng = np.random.default_rng(seed)
    vocab = Vocabulary()
    half = image_size // 2
    min_size, max_size = image_size * 9 // 32, image_size * 13 // 32

    images = np.empty((count, 3, image_size, image_size), np.float32)
    masks = np.zeros((count, image_size, image_size), np.float32)
    boxes = np.zeros((count, 2, 4), np.float32)
    labels = np.zeros(count, np.int64)
    captions, instructions, prompts, answer_masks = [], [], [], []
    for n in range(count):
        canvas = rng.uniform(0.0, 0.08, size=(3, image_size, image_size)).astype(np.float32)
        objects = []
        while len(objects) < 2:
            kind = len(SHAPES) + int(rng.integers(10)) if rng.random() < _DIGIT_PROBABILITY else int(rng.integers(3))
            color = COLORS[int(rng.integers(len(COLORS)))]
            if objects and objects[0] == (kind, color):
                continue  # two identical objects would make "where is the ..." ambiguous
            objects.append((kind, color))
        for side, (kind, color) in enumerate(objects):
            size = int(rng.integers(min_size, max_size + 1))
            x0 = int(rng.integers(1, half - size + 1)) + side * (half - 1)
            y0 = int(rng.integers(1, image_size - size))
            glyph_index = -1
            if kind >= len(SHAPES):
                candidates = by_digit[kind - len(SHAPES)]
                glyph_index = int(candidates[int(rng.integers(len(candidates)))])
            alpha = _object_mask(kind, size, glyph_index)
            region = (slice(y0, y0 + size), slice(x0, x0 + size))
            rgb = np.asarray(_RGB[color], np.float32)[:, None, None]
            canvas[(slice(None),) + region] = canvas[(slice(None),) + region] * (1 - alpha) + rgb * alpha
            masks[n][region] = np.maximum(masks[n][region], (alpha > 0).astype(np.float32))
            ys, xs = np.nonzero(alpha > 0)
            boxes[n, side] = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1)
        images[n] = canvas
        labels[n] = objects[0][0]

        first = int(rng.integers(2))
        (kind_a, color_a), (kind_b, color_b) = objects[first], objects[1 - first]
        relation = "left" if first == 0 else "right"
        caption = f"a {color_a} {_name(kind_a)} {relation} of a {color_b} {_name(kind_b)}"
        asked_side = int(rng.integers(2))
        kind_q, color_q = objects[asked_side]
        side_word = ("left", "right")[asked_side]
        pairs = [
            ("describe the image", caption),
            (f"what color is the {side_word} object", color_q),
            (f"what is the {side_word} object", _name(kind_q)),
            (f"where is the {color_q} {_name(kind_q)}", side_word),
        ]
        captions.append(vocab.pad_to(vocab.encode(caption), CAPTION_LEN))
        instructions.append(torch.stack([vocab.pad_to(vocab.encode(q), INSTRUCTION_LEN) for q, _ in pairs]))
        rows, answers = [], []
        for question, answer in pairs:
            q_ids, a_ids = vocab.encode(question), vocab.encode(answer) + [vocab.eos]
            ids = [vocab.bos] + q_ids + [vocab.sep] + a_ids
            rows.append(vocab.pad_to(ids, PROMPT_LEN))
            is_answer = torch.zeros(PROMPT_LEN, dtype=torch.bool)
            is_answer[len(ids) - len(a_ids): len(ids)] = True
            answers.append(is_answer)
        prompts.append(torch.stack(rows))
        answer_masks.append(torch.stack(answers))

    boxes /= image_size
    return Scenes(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        boxes=torch.from_numpy(boxes),
        masks=torch.from_numpy(masks),
        captions=torch.stack(captions),
        instructions=torch.stack(instructions),
        prompts=torch.stack(prompts),
        answer_mask=torch.stack(answer_masks),
    )


__all__ = ["CAPTION_LEN", "INSTRUCTION_LEN", "PROMPT_LEN", "Scenes", "TASKS", "generate_scenes"]
