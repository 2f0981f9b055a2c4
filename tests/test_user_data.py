"""User data: a folder of images with JSONL or COCO-style annotations, read into items and
into the aligner's scenes."""

import json

import numpy as np
import pytest
import torch

from astrea.data.folder import ImageFolderDataset, read_annotations, to_scenes, vocabulary_for
from astrea.data.shapes import CAPTION_LEN, PROMPT_LEN, TASKS
from tests.test_model import _one_thread  # noqa: F401  (autouse fixture: single-threaded torch)

PIL = pytest.importorskip("PIL.Image")


def _write_image(path, width, height, box=None, colour=(255, 0, 0)):
    """A black image with a filled rectangle ``box`` (pixels, xyxy)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(pixels).save(path)
    return pixels


@pytest.fixture
def jsonl_folder(tmp_path):
    _write_image(tmp_path / "images" / "a.png", 64, 32, box=(8, 8, 24, 24))
    _write_image(tmp_path / "images" / "b.png", 32, 32, box=(16, 0, 32, 16), colour=(0, 0, 255))
    mask = np.zeros((32, 32), np.uint8)
    mask[0:16, 16:32] = 255
    PIL.fromarray(mask).save(tmp_path / "b_mask.png")
    records = [
        {"image": "images/a.png", "caption": "A red Square, on black!", "boxes": [[8, 8, 24, 24], [40, 4, 60, 28]],
         "box_labels": ["square", "ghost"], "qa": [{"question": "what colour is it", "answer": "red"}]},
        {"image": "images/b.png", "captions": ["a blue square"], "label": "square", "mask": "b_mask.png",
         "qa": [["where is the square", "top right"], ["is it blue", "yes"]]},
    ]
    (tmp_path / "annotations.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return tmp_path


def test_folder_reader_reads_images_boxes_masks_captions_and_qa(jsonl_folder):
    data = ImageFolderDataset(jsonl_folder, image_size=16)
    assert len(data) == 2
    first, second = data[0], data[1]
    assert first["image"].shape == (3, 16, 16) and first["image"].dtype == torch.float32
    assert 0.0 <= float(first["image"].min()) and float(first["image"].max()) <= 1.0
    assert torch.allclose(first["boxes"], torch.tensor([[8 / 64, 8 / 32, 24 / 64, 24 / 32],
                                                        [40 / 64, 4 / 32, 60 / 64, 28 / 32]]))
    assert first["box_labels"] == ["square", "ghost"] and first["captions"] == ["A red Square, on black!"]
    assert first["qa"] == [("what colour is it", "red")] and not first["has_mask"]
    assert second["has_mask"] and second["label"] == "square"
    expected = torch.zeros(16, 16)
    expected[0:8, 8:16] = 1.0
    assert torch.equal(second["mask"], expected), "the mask image, resized"
    assert second["image"][2, 2, 12] == 1.0 and second["image"][0, 2, 12] == 0.0, "blue top right"
    assert second["qa"] == [("where is the square", "top right"), ("is it blue", "yes")]


def test_folder_reader_accepts_coco_annotations(tmp_path):
    _write_image(tmp_path / "img" / "1.png", 20, 10)
    coco = {
        "images": [{"id": 7, "file_name": "img/1.png", "width": 20, "height": 10,
                    "qa": [{"question": "how many", "answer": "two"}]}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 10, 10],
             "segmentation": [[0, 0, 9, 0, 9, 9, 0, 9]]},
            # uncompressed RLE (column-major): columns 12..19 of rows 0..4 are foreground
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [12, 0, 8, 5],
             "segmentation": {"size": [10, 20], "counts": [120] + [5, 5] * 8}},
            {"id": 3, "image_id": 7, "caption": "a cat and a dog"},
        ],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    records = read_annotations(tmp_path)
    assert len(records) == 1 and records[0].box_labels == ["cat", "dog"]
    assert records[0].boxes == [[0, 0, 10, 10], [12, 0, 20, 5]] and records[0].captions == ["a cat and a dog"]
    item = ImageFolderDataset(tmp_path, image_size=20)[0]
    expected = torch.zeros(20, 20)
    expected[0:20, 0:10] = 1.0  # the polygon (pixel rows 0..9 of the 10-row image, resized to 20)
    expected[0:10, 12:20] = 1.0  # the RLE
    assert torch.equal(item["mask"], expected)
    assert item["qa"] == [("how many", "two")]
    coco["annotations"][1]["segmentation"] = {"size": [10, 20], "counts": "compressedstring"}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="compressed RLE"):
        read_annotations(tmp_path)


def test_folder_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no annotations.jsonl or annotations.json"):
        read_annotations(tmp_path)
    (tmp_path / "annotations.jsonl").write_text(json.dumps({"image": "missing.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match="missing"):
        read_annotations(tmp_path)
    _write_image(tmp_path / "x.png", 8, 8)
    (tmp_path / "annotations.jsonl").write_text(json.dumps({"image": "x.png", "boxes": [[1, 2, 3]]}) + "\n")
    with pytest.raises(ValueError, match=r"annotations.jsonl:1: boxes must be \[x0, y0, x1, y1\]"):
        read_annotations(tmp_path)


def test_user_data_becomes_the_aligners_scenes(jsonl_folder):
    data = ImageFolderDataset(jsonl_folder, image_size=32)
    vocabulary, classes = vocabulary_for(data)
    assert classes == ("ghost", "square")
    scenes = to_scenes(data, vocabulary, classes)
    assert len(scenes) == 2 and scenes.images.shape == (2, 3, 32, 32)
    assert scenes.captions.shape == (2, CAPTION_LEN) and scenes.prompts.shape == (2, len(TASKS), PROMPT_LEN)
    assert vocabulary.decode(scenes.captions[0].tolist()) == "a red square on black"
    assert scenes.labels.tolist() == [classes.index("square"), classes.index("square")]
    assert torch.allclose(scenes.boxes[0], data[0]["boxes"]), "two boxes, left to right"
    assert torch.equal(scenes.boxes[1], torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)), "no box: the whole image"
    answers = [vocabulary.decode(p[m].tolist()) for p, m in zip(scenes.prompts[1], scenes.answer_mask[1])]
    assert answers == ["a blue square", "top right", "yes", "top right"], "caption, then the QA pairs cycled"
    assert scenes.masks[0].sum() == 8 * 16 + 10 * 24, "without masks: the boxes filled (64x32 squeezed to 32x32)"


def test_aligner_trains_on_a_folder_and_resumes_exactly(jsonl_folder, tmp_path):
    from astrea.train import AlignConfig
    from astrea.train.demo import aligner_class

    kind = aligner_class("astrea", jsonl_folder)
    config = AlignConfig.quick(steps_caption=1, steps_classification=1, steps_detection=1, steps_segmentation=1,
                               steps_instruct=3, queue_size=20, train_scenes=8, eval_scenes=4)
    uninterrupted = kind(config)
    assert len(uninterrupted.train_set) == 2 and uninterrupted.classes == ("ghost", "square")
    assert uninterrupted.model.heads["caption"].vocab_size == len(uninterrupted.vocab)
    for _ in range(5):  # into the Instruct stage: every head, encoder and the decoder has trained
        uninterrupted.train_step()
    path = tmp_path / "ckpt.safetensors"
    uninterrupted.save(path)
    expected = [uninterrupted.train_step() for _ in range(2)]
    resumed = kind.load(path)
    assert [resumed.train_step() for _ in range(2)] == expected
    assert set(resumed.history[-1]["eval"]["qa_accuracy"]) == set(TASKS[1:])
    with pytest.raises(ValueError, match="give data too"):
        aligner_class("astrea", annotations="a.json")


def test_demo_command_on_a_data_folder(jsonl_folder, tmp_path):
    from astrea.cli import main

    out = tmp_path / "run"
    steps = [f"--steps-{stage}=1" for stage in ("caption", "classification", "detection", "segmentation", "instruct")]
    assert main(["demo", "--out", str(out), "--quick", "--no-progress", "--data", str(jsonl_folder),
                 "--train-scenes", "8", "--eval-scenes", "4", *steps]) == 0
    final = json.loads((out / "metrics" / "05_instruct.json").read_text())["eval"]
    assert set(final["qa_accuracy"]) == set(TASKS[1:])
    resumed = main(["demo", "--out", str(out), "--no-progress", "--resume", str(out / "checkpoint.safetensors"),
                    "--data", str(jsonl_folder)])
    assert resumed == 0, "a finished run resumes (and stops at once) on the same data"
