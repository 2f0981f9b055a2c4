"""The main job: train a small Astrea through every stage on the generated scenes and write
a run folder (metrics per stage, figures, a resumable checkpoint).

``experts="transformers"`` runs the same pipeline on small random transformers models: OWLv2
vision (detection), SegFormer (segmentation), DINOv2 (classification) and SigLIP vision
(captioning) experts, and a Qwen2 causal LM in the LLaVA-style wrapper in place of the tiny
decoder (:class:`TransformersAligner`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import torch

from astrea import distributed
from astrea.data import PROMPT_LEN
from astrea.data.text import CLASS_NAMES
from astrea.models import EXPERTS, Astrea
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

EXPERT_KINDS = ("astrea", "transformers")


class TransformersAligner(ProgressiveAligner):
    """:class:`ProgressiveAligner`, unchanged, on transformers models: small random experts
    (:func:`astrea.models.tiny_experts`) and a small random Qwen2 causal LM read through
    :class:`~astrea.models.llava.LlavaLanguageModel`. Its checkpoints load with
    :meth:`TransformersAligner.load`."""

    def __init__(self, config: AlignConfig):
        super().__init__(config)
        from astrea.models.hf_experts import tiny_experts

        vocab, dim = self.vocab, config.dim
        self.net["model"] = Astrea(len(vocab), vocab.pad, experts=tiny_experts(config.image_size, width=dim),
                                   image_size=config.image_size, num_classes=len(CLASS_NAMES), dim=dim,
                                   num_tokens=config.num_tokens, top_k=config.top_k, residual_p=config.residual_p,
                                   seed=config.seed)
        self.net["decoder"] = _decoder(TransformersAligner, vocab, config)
        distributed.global_batchnorm(self.net)
        self.optimizer = self._make_optimizer()


class _FolderData:
    """Mixed into an aligner class: trains and evaluates on a folder of user data
    (:mod:`astrea.data.folder`) instead of the generated scenes. The vocabulary and the class
    names come from the data, so the caption and classification heads, the text encoders and
    the decoder are rebuilt for them. Every tenth image is held out for evaluation (all of
    them are, besides training, when there are fewer than ten)."""

    data_folder: str
    annotations: str | None = None

    def __init__(self, config: AlignConfig):
        super().__init__(config)
        import copy

        from astrea.data.folder import ImageFolderDataset, to_scenes, vocabulary_for
        from astrea.data.shapes import CAPTION_LEN
        from astrea.models.experts import CaptionHead, LabelHead
        from astrea.models.language import TextEncoder

        dataset = ImageFolderDataset(self.data_folder, self.annotations, image_size=config.image_size)
        vocab, classes = vocabulary_for(dataset)
        held_out = [i for i in range(len(dataset)) if i % 10 == 9]
        kept = [i for i in range(len(dataset)) if i % 10 != 9] if held_out else list(range(len(dataset)))
        self.vocab, self.classes = vocab, classes
        self.train_set = to_scenes(dataset, vocab, classes, kept)
        self.eval_set = to_scenes(dataset, vocab, classes, held_out or kept)
        model = self.net["model"]
        width = {name: head.classify[0].normalized_shape[0] for name, head in model.heads.items()
                 if name in ("caption", "classification")}
        model.heads["caption"] = CaptionHead(width["caption"], len(vocab), vocab.pad)
        model.heads["classification"] = LabelHead(width["classification"], len(classes))
        model.config.update(vocab_size=len(vocab), pad_id=vocab.pad, num_classes=len(classes))
        text = TextEncoder(len(vocab), config.dim, CAPTION_LEN, vocab.pad)
        self.net["text"], self.net["text_key"] = text, copy.deepcopy(text).requires_grad_(False)
        self.net["decoder"] = _decoder(type(self), vocab, config)
        distributed.global_batchnorm(self.net)
        self.optimizer = self._make_optimizer()


def _decoder(kind: type, vocab, config: AlignConfig) -> torch.nn.Module:
    """The language side of an aligner class for ``vocab``."""
    from astrea.models.language import TinyDecoder

    if not issubclass(kind, TransformersAligner):
        return TinyDecoder(len(vocab), config.dim, config.num_tokens + PROMPT_LEN, vocab.pad)
    import transformers

    from astrea.models.llava import LlavaLanguageModel

    dim = config.dim
    lm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(vocab), hidden_size=2 * dim, intermediate_size=4 * dim, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=config.num_tokens + PROMPT_LEN,
        pad_token_id=vocab.pad, bos_token_id=vocab.bos, eos_token_id=vocab.eos))
    return LlavaLanguageModel(lm, dim, pad_id=vocab.pad)


def aligner_class(experts: str = "astrea", data=None, annotations=None) -> type[ProgressiveAligner]:
    """The aligner of an expert kind, ``"astrea"`` (the default tiny experts and decoder) or
    ``"transformers"`` (:class:`TransformersAligner`), on the generated scenes or, with
    ``data`` (a folder, and optionally its ``annotations`` file), on user data."""
    if experts not in EXPERT_KINDS:
        raise ValueError(f"experts must be one of {', '.join(EXPERT_KINDS)}; got {experts!r}")
    if annotations is not None and data is None:
        raise ValueError("annotations name the annotation file of a data folder; give data too")
    base = TransformersAligner if experts == "transformers" else ProgressiveAligner
    if data is None:
        return base
    attributes = {"data_folder": str(data), "annotations": None if annotations is None else str(annotations)}
    return type(f"Folder{base.__name__}", (_FolderData, base), attributes)


def checkpoint_experts(path) -> str:
    """The expert kind a checkpoint was trained with (from its tensor names)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        transformers_lm = any(key.startswith("net.decoder.language_model.") for key in handle.keys())
    return "transformers" if transformers_lm else "astrea"


SUMMARY_METRICS = ("retrieval_top1", "classification_accuracy", "box_iou", "mask_iou", "caption_token_accuracy",
                   "qa_accuracy", "load_share", "load_cv")


@distributed.main_only  # data parallel: rank 0 writes the run folder
def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def run_demo(out, config: AlignConfig | None = None, *, resume=None, progress: bool = True,
             threads: int | None = 1, experts: str = "astrea", data=None, annotations=None) -> dict:
    """Trains (or resumes from the checkpoint ``resume``) and writes into ``out``:

    * ``config.json``; ``metrics/NN_<stage>.json`` after each stage (and ``00_init.json``
      for the untrained model); ``metrics.json`` with all of them;
    * ``metrics_across_stages.png`` (as the paper's Fig. 3) and
      ``router_probabilities.png`` (as Fig. 2);
    * ``coordination_matrix.png`` and ``coordination.json``: the learned expert coordination
      matrix (when the model has one);
    * ``checkpoint.safetensors``, rewritten after each stage (resume with ``resume=``).

    ``threads`` sets torch's CPU threads for the run (``None`` leaves them): one by default,
    which keeps the numbers independent of the machine's core count and is the fastest on
    a busy or 2-core CPU for models this small.

    ``experts``: ``"astrea"`` (default) or ``"transformers"`` (:class:`TransformersAligner`);
    a resumed run continues with the kind its checkpoint was trained with. ``data``: a folder
    of user data (:mod:`astrea.data.folder`; ``annotations``, its annotation file when not the
    default) to train on instead of the generated scenes; a resumed run needs it again.

    Returns the final evaluation.
    """
    kind = aligner_class(checkpoint_experts(resume) if resume is not None else experts, data, annotations)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        return _train_and_report(Path(out), config, resume, progress, kind)
    finally:
        torch.set_num_threads(previous_threads)


def _train_and_report(out: Path, config: AlignConfig | None, resume, progress: bool,
                      kind: type[ProgressiveAligner]) -> dict:
    (out / "metrics").mkdir(parents=True, exist_ok=True)
    aligner = kind.load(resume) if resume is not None else kind(config or AlignConfig())
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
        if aligner.model.coordination is not None:
            coupling = aligner.model.coordination.coupling.detach().cpu()
            _write_json(out / "coordination.json", {"experts": list(EXPERTS), "coupling": coupling.tolist()})
            plot_coordination(coupling, out / "coordination_matrix.png")
    return final


def plot_coordination(coupling: torch.Tensor, path) -> None:
    """Heat map of the coordination matrix ``C`` (row ``e``: what expert ``e`` takes from each expert)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.2))
    bound = max(float(coupling.abs().max()), 1e-6)
    image = ax.imshow(coupling.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax.set_xticks(range(len(EXPERTS)), EXPERTS, rotation=30)
    ax.set_yticks(range(len(EXPERTS)), EXPERTS)
    ax.set_xlabel("from expert j")
    ax.set_ylabel("to expert e")
    for e in range(len(EXPERTS)):
        for j in range(len(EXPERTS)):
            value = float(coupling[e, j])
            ax.text(j, e, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(value) > bound / 2 else "black")
    ax.set_title("Expert coordination matrix C[e, j]")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
