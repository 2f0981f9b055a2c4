"""Progressive pre-alignment: stage order and scope, one step per stage, exact resume from a
checkpoint, the configuration's command-line form, and the demo command."""

import argparse
import json

import pytest
import torch

from astrea.cli import main
from astrea.models import EXPERTS
from astrea.train import STAGES, AlignConfig, ProgressiveAligner
from astrea.train.config import add_arguments, overrides
from tests.test_model import _one_thread  # noqa: F401  (autouse fixture: single-threaded torch)
from tests.utils import UNIT_ROUNDOFF

ONE_STEP = dict(steps_caption=1, steps_classification=1, steps_detection=1, steps_segmentation=1, steps_instruct=1)


def test_stage_order_and_widening_scope():
    assert STAGES == ("caption", "classification", "detection", "segmentation", "instruct")
    assert AlignConfig().stages == STAGES
    assert AlignConfig(schedule="instruct-only").stages == ("instruct",)
    aligner = ProgressiveAligner(AlignConfig.quick(**ONE_STEP))
    seen = []
    while not aligner.finished:
        seen.append((aligner.stage, aligner.scope()))
        aligner.train_step()
    assert seen == [
        ("caption", ("caption",)),
        ("classification", ("caption", "classification")),
        ("detection", ("caption", "classification", "detection")),
        ("segmentation", ("caption", "classification", "detection", "segmentation")),
        ("instruct", ("caption", "classification", "detection", "segmentation")),
    ]
    assert [entry["stage"] for entry in aligner.history] == list(STAGES)
    with pytest.raises(RuntimeError, match="all stages are done"):
        aligner.train_step()


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_one_step_per_stage_trains_what_the_stage_owns():
    aligner = ProgressiveAligner(AlignConfig.quick(**ONE_STEP))
    model = aligner.model
    for stage in STAGES:
        experts = {name: _snapshot(model.experts[name]) for name in EXPERTS}
        adapters = {name: _snapshot(model.adapters[name]) for name in EXPERTS}
        router, decoder = _snapshot(model.router), _snapshot(aligner.net["decoder"])
        coordination = _snapshot(model.coordination)
        queue_ptr = {name: int(aligner.net["contrast"][name].ptr) for name in EXPERTS}
        losses = aligner.train_step()
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), (stage, losses)
        if stage == "instruct":
            assert set(losses) == {"loss", "lm_loss", "balance_loss"}
            assert all(not _changed(experts[name], model.experts[name]) for name in EXPERTS), "experts are frozen"
            assert all(not _changed(adapters[name], model.adapters[name]) for name in EXPERTS), "adapters too"
            assert _changed(router, model.router) and _changed(decoder, aligner.net["decoder"])
            assert _changed(coordination, model.coordination), "the coordination matrix trains with the fusion"
        else:
            assert set(losses) == {"loss", "contrastive_loss", "task_loss"}
            scope = STAGES[: STAGES.index(stage) + 1]
            for name in EXPERTS:
                assert bool(_changed(experts[name], model.experts[name])) == (name in scope), (stage, name)
                assert bool(_changed(adapters[name], model.adapters[name])) == (name in scope), (stage, name)
            assert not _changed(router, model.router) and not _changed(decoder, aligner.net["decoder"])
            assert not _changed(coordination, model.coordination)
            batch = aligner.config.batch_size
            for name in EXPERTS:
                moved = int(aligner.net["contrast"][name].ptr) != queue_ptr[name]
                assert moved == (name in scope), f"{stage}: the queue of {name} {'did not move' if moved else 'moved'}"
            assert int(aligner.net["contrast"][stage].ptr) == batch % aligner.config.queue_size
    final = aligner.history[-1]["eval"]
    assert set(final["retrieval_top1"]) == set(EXPERTS)
    # E shares count_e / total, each rounded once in fp32, summed by Python in float64.
    share_error = len(EXPERTS) * UNIT_ROUNDOFF[torch.float32] + len(EXPERTS) * UNIT_ROUNDOFF[torch.float64]
    assert abs(sum(final["load_share"].values()) - 1.0) <= share_error, final["load_share"]
    assert set(final["router_probs"]) == {"caption", "color", "shape", "position"}


@pytest.mark.parametrize("stop_after", [3, 9], ids=["mid-alignment", "mid-instruct"])
def test_checkpoint_resumes_exactly(tmp_path, stop_after):
    config = AlignConfig.quick(steps_caption=2, steps_classification=2, steps_detection=2, steps_segmentation=2,
                               steps_instruct=4, queue_size=20)
    uninterrupted = ProgressiveAligner(config)
    for _ in range(stop_after):
        uninterrupted.train_step()
    path = tmp_path / "ckpt.safetensors"
    uninterrupted.save(path)
    position = (uninterrupted.stage_index, uninterrupted.step, uninterrupted.global_step)
    expected = [uninterrupted.train_step() for _ in range(2)]

    resumed = ProgressiveAligner.load(path)
    assert (resumed.stage_index, resumed.step, resumed.global_step) == position
    saved = ProgressiveAligner.load(path)
    for name in EXPERTS:
        assert int(saved.net["contrast"][name].ptr) == int(resumed.net["contrast"][name].ptr)
    assert any(int(saved.net["contrast"][name].ptr) != 0 for name in EXPERTS), "a queue pointer was saved"
    assert [resumed.train_step() for _ in range(2)] == expected
    for key, value in uninterrupted.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key


def test_load_rejects_foreign_checkpoints(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="is not a astrea.ProgressiveAligner"):
        ProgressiveAligner.load(path)


def test_config_validation_and_command_line_overrides():
    with pytest.raises(ValueError, match="schedule must be one of"):
        AlignConfig(schedule="random")
    with pytest.raises(ValueError, match="steps_detection must be >= 1"):
        AlignConfig(steps_detection=0)
    with pytest.raises(ValueError, match="queue_size"):
        AlignConfig(queue_size=4, batch_size=8)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--steps-instruct", "7", "--lr-align", "0.01", "--schedule", "instruct-only"])
    assert overrides(args) == {"steps_instruct": 7, "lr_align": 0.01, "schedule": "instruct-only"}
    assert AlignConfig(**overrides(args)).steps_instruct == 7


def test_demo_command_writes_a_resumable_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress", "--seed", "3"]) == 0
    assert "final metrics:" in capsys.readouterr().out
    names = sorted(p.name for p in (out / "metrics").iterdir())
    assert names == ["00_init.json", "01_caption.json", "02_classification.json", "03_detection.json",
                     "04_segmentation.json", "05_instruct.json"]
    stage = json.loads((out / "metrics" / "03_detection.json").read_text())
    for key in ("retrieval_top1", "contrastive_loss", "classification_accuracy", "box_iou", "mask_iou",
                "caption_token_accuracy", "load_share", "load_cv"):
        assert key in stage["eval"], key
    assert "contrastive_loss" in stage["train"]
    for png in ("metrics_across_stages.png", "router_probabilities.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["seed"] == 3
    history = json.loads((out / "metrics.json").read_text())
    finished = ProgressiveAligner.load(out / "checkpoint.safetensors")
    assert finished.finished and finished.history == history

    with pytest.raises(SystemExit, match="--resume continues the saved configuration"):
        main(["demo", "--out", str(out), "--resume", str(out / "checkpoint.safetensors"), "--seed", "1"])


def test_instruct_steps_draw_disjoint_residual_mask_counters(monkeypatch):
    """Consecutive Instruct steps place their batches at non-overlapping Philox offsets, so
    no token row reuses another step's residual mask draw."""
    from astrea.models.astrea import Astrea

    spans = []
    original = Astrea.fuse

    def recording_fuse(self, adapted, instruction=None, offset=0):
        if self.training:
            batch, tokens = next(iter(adapted.values())).shape[:2]
            spans.append((offset, offset + batch * tokens))
        return original(self, adapted, instruction, offset)

    monkeypatch.setattr(Astrea, "fuse", recording_fuse)
    aligner = ProgressiveAligner(AlignConfig.quick(schedule="instruct-only", steps_instruct=3))
    for _ in range(3):
        aligner.train_step()
    assert len(spans) == 3
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), spans


def test_demo_without_the_demo_extras_names_the_install_command(tmp_path):
    """Without scikit-learn (blocked from importing here) the demo stops with a message
    naming the extra to install, not a ModuleNotFoundError traceback."""
    import subprocess
    import sys

    script = ("import sys; sys.modules['sklearn'] = None\n"
              "from astrea.cli import main\n"
              f"sys.exit(main(['demo', '--out', {str(tmp_path / 'run')!r}, '--quick', '--no-progress']))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "pip install 'astrea[demo]'" in result.stderr and "scikit-learn" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
