"""User data: a folder of images with captions, boxes, masks, labels and question-answer pairs.

Layout: images anywhere under ``root``, and one annotation file (by default the first of
``annotations.jsonl``, ``annotations.json`` in ``root``), either

* JSON Lines (or a JSON list) of one record per image, every field but ``image`` optional::

    {"image": "images/0001.jpg",            # path relative to root
     "caption": "a cat on a mat",           # or "captions": [...]
     "label": "cat",                        # image-level class
     "boxes": [[x0, y0, x1, y1], ...],      # pixels of the image file
     "box_labels": ["cat", ...],            # class per box
     "mask": "masks/0001.png",              # foreground mask image (non-zero = foreground)
     "qa": [{"question": "what is on the mat", "answer": "a cat"}]}   # or [["q", "a"], ...]

* or COCO-style JSON: ``images`` (``id``, ``file_name``), ``annotations`` (``image_id`` and
  ``bbox`` ``[x, y, w, h]`` with ``category_id`` and optional ``segmentation`` polygons or
  uncompressed RLE, or ``caption`` as in COCO's captions files), ``categories`` (``id``,
  ``name``); an image entry may add ``qa`` and ``label`` as above.

:class:`ImageFolderDataset` reads it (images resized to a square, boxes normalised to
``[0, 1]`` ``(x0, y0, x1, y1)``, masks rasterised); :func:`to_scenes` turns it into the
:class:`~astrea.data.Scenes` that :class:`~astrea.train.ProgressiveAligner` trains on.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import torch

from astrea.data.shapes import CAPTION_LEN, INSTRUCTION_LEN, PROMPT_LEN, TASKS, Scenes
from astrea.data.text import SPECIALS, Vocabulary

ANNOTATION_FILES = ("annotations.jsonl", "annotations.json")


@dataclasses.dataclass
class Record:
    """The annotations of one image (boxes and polygons in the image file's pixels)."""

    image: Path
    captions: list[str] = dataclasses.field(default_factory=list)
    label: str | None = None
    boxes: list[list[float]] = dataclasses.field(default_factory=list)  # xyxy pixels
    box_labels: list[str] = dataclasses.field(default_factory=list)
    mask: Path | None = None  # a mask image
    polygons: list[list[float]] = dataclasses.field(default_factory=list)  # COCO polygons, pixels
    rles: list[dict] = dataclasses.field(default_factory=list)  # COCO uncompressed RLE
    qa: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _qa_pairs(value, where: str) -> list[tuple[str, str]]:
    pairs = []
    for item in value or []:
        if isinstance(item, dict) and "question" in item and "answer" in item:
            pairs.append((str(item["question"]), str(item["answer"])))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            pairs.append((str(item[0]), str(item[1])))
        else:
            raise ValueError(f"{where}: a qa entry must be {{'question': ..., 'answer': ...}} or [question, answer]; "
                             f"got {item!r}")
    return pairs


def _record(entry: dict, root: Path, where: str) -> Record:
    if "image" not in entry:
        raise ValueError(f"{where}: a record needs an 'image' path; got keys {sorted(entry)}")
    captions = list(entry.get("captions", [])) + ([entry["caption"]] if "caption" in entry else [])
    boxes = [list(map(float, box)) for box in entry.get("boxes", [])]
    if any(len(box) != 4 for box in boxes):
        raise ValueError(f"{where}: boxes must be [x0, y0, x1, y1]; got {entry['boxes']}")
    box_labels = [str(label) for label in entry.get("box_labels", [])]
    if box_labels and len(box_labels) != len(boxes):
        raise ValueError(f"{where}: {len(box_labels)} box_labels for {len(boxes)} boxes")
    return Record(image=root / entry["image"], captions=[str(c) for c in captions], label=entry.get("label"),
                  boxes=boxes, box_labels=box_labels, mask=root / entry["mask"] if entry.get("mask") else None,
                  qa=_qa_pairs(entry.get("qa"), where))


def _coco_records(coco: dict, root: Path, where: str) -> list[Record]:
    categories = {c["id"]: str(c["name"]) for c in coco.get("categories", [])}
    records, by_id = [], {}
    for image in coco["images"]:
        record = Record(image=root / image["file_name"], label=image.get("label"),
                        qa=_qa_pairs(image.get("qa"), f"{where} image {image['id']}"))
        by_id[image["id"]] = record
        records.append(record)
    for ann in coco.get("annotations", []):
        record = by_id.get(ann.get("image_id"))
        if record is None:
            raise ValueError(f"{where}: annotation {ann.get('id')} refers to unknown image_id {ann.get('image_id')}")
        if "caption" in ann:
            record.captions.append(str(ann["caption"]))
        if "bbox" in ann:
            x, y, w, h = map(float, ann["bbox"])
            record.boxes.append([x, y, x + w, y + h])
            category = ann.get("category_id")
            if category is not None and category not in categories:
                raise ValueError(f"{where}: annotation {ann.get('id')} has unknown category_id {category}")
            record.box_labels.append(categories.get(category, "object"))
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list):
            record.polygons.extend(list(map(float, polygon)) for polygon in segmentation)
        elif isinstance(segmentation, dict):
            if not isinstance(segmentation.get("counts"), list):
                raise ValueError(f"{where}: annotation {ann.get('id')} has a compressed RLE mask; only polygons and "
                                 "uncompressed RLE (counts as a list) are read (decode it with pycocotools first)")
            record.rles.append(segmentation)
    return records


def read_annotations(root, annotations=None) -> list[Record]:
    """The records of the annotation file ``annotations`` (a path; default: the first of
    :data:`ANNOTATION_FILES` in ``root``), with image and mask paths resolved against ``root``."""
    root = Path(root)
    if annotations is None:
        found = [root / name for name in ANNOTATION_FILES if (root / name).is_file()]
        if not found:
            raise FileNotFoundError(f"read_annotations: no {' or '.join(ANNOTATION_FILES)} in {root}")
        annotations = found[0]
    path = Path(annotations)
    text = path.read_text()
    if path.suffix == ".jsonl":
        entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        records = [_record(entry, root, f"{path}:{n + 1}") for n, entry in enumerate(entries)]
    else:
        data = json.loads(text)
        if isinstance(data, dict) and "images" in data:
            records = _coco_records(data, root, str(path))
        elif isinstance(data, list):
            records = [_record(entry, root, f"{path}[{n}]") for n, entry in enumerate(data)]
        else:
            raise ValueError(f"read_annotations: {path} must hold a list of records or a COCO dict with 'images'")
    missing = [str(r.image) for r in records if not r.image.is_file()]
    if missing:
        raise FileNotFoundError(f"read_annotations: images listed in {path} are missing: {missing[:5]}")
    if not records:
        raise ValueError(f"read_annotations: {path} holds no images")
    return records


def _decode_rle(rle: dict) -> np.ndarray:
    """COCO uncompressed RLE: alternating background/foreground run lengths, column-major."""
    height, width = rle["size"]
    flat = np.zeros(height * width, dtype=bool)
    position = 0
    for run, count in enumerate(rle["counts"]):
        if run % 2:
            flat[position:position + count] = True
        position += count
    return flat.reshape(width, height).T


class ImageFolderDataset(torch.utils.data.Dataset):
    """The images of a folder with their annotations (:func:`read_annotations`).

    Each item is a dict: ``image`` ``[3, S, S]`` float in ``[0, 1]`` (resized to
    ``image_size``, aspect ratio not kept, so normalised boxes stay exact), ``boxes``
    ``[n, 4]`` normalised ``(x0, y0, x1, y1)``, ``box_labels``, ``mask`` ``[S, S]`` (the
    union of the record's masks; ``has_mask`` says whether it had any), ``label``,
    ``captions`` and ``qa``.
    """

    def __init__(self, root, annotations=None, image_size: int = 224):
        if image_size < 1:
            raise ValueError(f"ImageFolderDataset: image_size must be >= 1; got {image_size}")
        self.records = read_annotations(root, annotations)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image, ImageDraw

        record = self.records[index]
        size = self.image_size
        with Image.open(record.image) as opened:
            image = opened.convert("RGB")
        width, height = image.size
        pixels = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        scale = np.array([width, height, width, height], dtype=np.float32)
        boxes = np.clip(np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4) / scale, 0.0, 1.0)
        full = np.zeros((height, width), dtype=bool)
        if record.mask is not None:
            with Image.open(record.mask) as opened:
                full |= np.asarray(opened.convert("L").resize((width, height), Image.NEAREST)) > 0
        if record.polygons:
            canvas = Image.new("L", (width, height), 0)
            draw = ImageDraw.Draw(canvas)
            for polygon in record.polygons:
                draw.polygon(list(zip(polygon[0::2], polygon[1::2])), fill=1)
            full |= np.asarray(canvas) > 0
        for rle in record.rles:
            full |= _decode_rle(rle)
        has_mask = record.mask is not None or bool(record.polygons) or bool(record.rles)
        mask = Image.fromarray(full.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
        return {"image": torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), "boxes": torch.from_numpy(boxes),
                "box_labels": list(record.box_labels), "mask": torch.from_numpy(np.asarray(mask) > 0).float(),
                "has_mask": has_mask, "label": record.label, "captions": list(record.captions),
                "qa": list(record.qa)}


# -- the aligner's scenes from user data -------------------------------------------------------

def words(text: str) -> str:
    """Lower-case words (letters and digits) joined by spaces: the word tokenizer's input."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


_TEMPLATE = "describe the image what is left right object where and a"


def _item_texts(item: dict) -> tuple[str, list[tuple[str, str]], str, list[str]]:
    """(caption, three QA pairs, image label, left/right object labels) of one item, as words."""
    order = item["boxes"][:, [0, 2]].mean(1).argsort().tolist() if len(item["boxes"]) else []
    objects = [words(item["box_labels"][i]) if item["box_labels"] else "object" for i in order]
    label = words(item["label"]) if item["label"] else (objects[0] if objects else "object")
    caption = words(item["captions"][0]) if item["captions"] else " and ".join(f"a {o}" for o in objects) or label
    pairs = [(words(q), words(a)) for q, a in item["qa"]]
    if not pairs:
        left, right = (objects[0], objects[-1]) if objects else (label, label)
        pairs = [("what is the left object", left), ("what is the right object", right),
                 (f"where is the {left}", "left")]
    pairs = [pairs[i % len(pairs)] for i in range(len(TASKS) - 1)]
    return caption, pairs, label, objects


def vocabulary_for(dataset: ImageFolderDataset) -> tuple[Vocabulary, tuple[str, ...]]:
    """The word vocabulary of the dataset's captions, QA pairs and labels (plus the question
    templates), and its class names (sorted image and box labels)."""
    found, classes = set(_TEMPLATE.split()), set()
    for index in range(len(dataset)):
        record = dataset.records[index]
        texts = record.captions + [t for pair in record.qa for t in pair] + record.box_labels
        texts += [record.label] if record.label else []
        found.update(w for text in texts for w in words(text).split())
        classes.update(words(label) for label in record.box_labels + ([record.label] if record.label else []))
    return Vocabulary(SPECIALS + tuple(sorted(found - set(SPECIALS)))), tuple(sorted(classes)) or ("object",)


def to_scenes(dataset: ImageFolderDataset, vocabulary: Vocabulary, classes: tuple[str, ...],
              indices=None) -> Scenes:
    """The :class:`~astrea.data.Scenes` the aligner trains on, from ``dataset[indices]``.

    The scenes' fixed layout is filled as follows: ``labels``, the image label (else that of
    its leftmost box) as an index of ``classes``; ``boxes``, two boxes ordered left to right
    (the two largest; one box is repeated; none: the whole image); ``masks``, the masks'
    union (else the boxes filled); ``captions``, the first caption (else "a <label> and a
    <label>") cut to ``CAPTION_LEN`` words. The four prompt slots of ``TASKS`` hold
    "describe the image" with the caption, then the record's first three QA pairs (cycled;
    without QA pairs, questions about the left and right objects), so with user data the
    evaluation's ``qa_accuracy`` entries "color", "shape", "position" are QA pairs 1, 2, 3.
    Questions are cut to ``INSTRUCTION_LEN`` words and answers to what fits ``PROMPT_LEN``.
    """
    indices = range(len(dataset)) if indices is None else indices
    class_index = {name: i for i, name in enumerate(classes)}
    fields = {name: [] for name in ("images", "labels", "boxes", "masks", "captions", "instructions", "prompts",
                                    "answer_mask")}
    for index in indices:
        item = dataset[index]
        caption, pairs, label, _ = _item_texts(item)
        boxes = item["boxes"]
        if len(boxes) == 0:
            boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        largest = (boxes[:, 2:] - boxes[:, :2]).prod(-1).argsort(descending=True)[:2]
        chosen = boxes[largest.sort().values]
        chosen = chosen[chosen[:, [0, 2]].mean(1).argsort()]
        if len(chosen) == 1:
            chosen = chosen.repeat(2, 1)
        mask = item["mask"]
        if not item["has_mask"]:
            size = mask.shape[-1]
            for x0, y0, x1, y1 in (boxes * size).round().long().tolist():
                mask[y0:y1, x0:x1] = 1.0
        fields["images"].append(item["image"])
        fields["labels"].append(torch.tensor(class_index.get(label, 0)))
        fields["boxes"].append(chosen)
        fields["masks"].append(mask)
        fields["captions"].append(vocabulary.pad_to(vocabulary.encode(caption)[:CAPTION_LEN], CAPTION_LEN))
        instructions, prompts, answers = [], [], []
        for question, answer in [("describe the image", caption)] + pairs:
            q_ids = vocabulary.encode(question)[:INSTRUCTION_LEN]
            a_ids = vocabulary.encode(answer)[:PROMPT_LEN - len(q_ids) - 3] + [vocabulary.eos]
            ids = [vocabulary.bos] + q_ids + [vocabulary.sep] + a_ids
            instructions.append(vocabulary.pad_to(q_ids, INSTRUCTION_LEN))
            prompts.append(vocabulary.pad_to(ids, PROMPT_LEN))
            is_answer = torch.zeros(PROMPT_LEN, dtype=torch.bool)
            is_answer[len(ids) - len(a_ids): len(ids)] = True
            answers.append(is_answer)
        fields["instructions"].append(torch.stack(instructions))
        fields["prompts"].append(torch.stack(prompts))
        fields["answer_mask"].append(torch.stack(answers))
    return Scenes(**{name: torch.stack(values) for name, values in fields.items()})
