"""The main job: train a small Astrea through every stage on the generated scenes and write
a run folder (metrics per stage, figures, a resumable checkpoint)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import torch

from astrea import distributed
from astrea.train.aligner import ProgressiveAligner
from astrea.train.config import AlignConfig
from astrea.train.plots import plot_router_probabilities, plot_stage_metrics

# The modules of the ``demo`` extra (pyproject.toml) the job imports, by their distribution.
DEMO_EXTRAS = {"tqdm": "tqdm", "matplotlib": "matplotlib", "safetensors": "safetensors", "sklearn": "scikit-learn"}
INSTALL_DEMO = "pip install 'astrea[demo]'"
CHECKPOINT = "checkpoint.safetensors"


def missing_demo_extras() -> list[str]:
    """The distributions of the ``demo`` extra that cannot be imported (without importing them)."""
    missing = []
    for module, distribution in DEMO_EXTRAS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(distribution)
    return missing


def require_demo_extras() -> None:
    """Raises ImportError naming the missing packages and ``pip install 'astrea[demo]'``."""
    missing = missing_demo_extras()
    if missing:
        raise ImportError(f"the demo needs the packages of the demo extra; missing: {', '.join(missing)}. "
                          f"Install them with: {INSTALL_DEMO}")

SUMMARY_METRICS = ("retrieval_top1", "classification_accuracy", "box_iou", "mask_iou", "caption_token_accuracy",
                   "qa_accuracy", "load_share", "load_cv")


@distributed.main_only  # data parallel: rank 0 writes the run folder
def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def run_demo(out, config: AlignConfig | None = None, *, resume=None, progress: bool = True,
             threads: int | None = 1) -> dict:
    """Trains (or resumes from the checkpoint ``resume``) and writes into ``out``:

    * ``config.json``; ``metrics/NN_<stage>.json`` after each stage (and ``00_init.json``
      for the untrained model); ``metrics.json`` with all of them;
    * ``metrics_across_stages.png`` (as the paper's Fig. 3) and
      ``router_probabilities.png`` (as Fig. 2);
    * ``checkpoint.safetensors``, rewritten after each stage (resume with ``resume=``).

    ``threads`` sets torch's CPU threads for the run (``None`` leaves them): one by default,
    which keeps the numbers independent of the machine's core count and is the fastest on
    a busy or 2-core CPU for models this small.

    Returns the final evaluation.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        return _train_and_report(Path(out), config, resume, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train_and_report(out: Path, config: AlignConfig | None, resume, progress: bool) -> dict:
    (out / "metrics").mkdir(parents=True, exist_ok=True)
    aligner = ProgressiveAligner.load(resume) if resume is not None else ProgressiveAligner(config or AlignConfig())
    _write_json(out / "config.json", dataclasses.asdict(aligner.config))
    clock = [time.perf_counter()]

    def write_last_stage(trained: ProgressiveAligner) -> None:
        entry = trained.history[-1]
        now = time.perf_counter()
        record = {**entry, "wall_seconds": round(now - clock[0], 2)}
        clock[0] = now
        _write_json(out / "metrics" / f"{len(trained.history) - 1:02d}_{entry['stage']}.json", record)
        trained.save(out / CHECKPOINT)

    if not aligner.history:
        aligner.record_initial_evaluation()
        write_last_stage(aligner)
    aligner.run(progress=progress and distributed.is_main(), on_stage_end=write_last_stage)

    _write_json(out / "metrics.json", aligner.history)
    final = aligner.history[-1]["eval"]
    if distributed.is_main():
        plot_stage_metrics(aligner.history, out / "metrics_across_stages.png")
        plot_router_probabilities(final["router_probs"], out / "router_probabilities.png")
    return final


def summary_lines(final: dict) -> list[str]:
    """The final metrics as ``name: value`` lines for the terminal."""
    lines = []
    for name in SUMMARY_METRICS:
        value = final[name]
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:.3f}" for k, v in value.items())
        else:
            value = f"{value:.3f}"
        lines.append(f"{name}: {value}")
    return lines
