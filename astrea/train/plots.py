"""The demo's figures: metrics across the alignment stages, and router contribution
probabilities per task type (matplotlib, Agg backend)."""

from __future__ import annotations

from astrea.models.experts import EXPERTS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_curves(history: list[dict]) -> dict[str, list[float]]:
    """Metric name -> value after each entry of ``history`` (percent, higher is better)."""
    curves: dict[str, list[float]] = {}
    for entry in history:
        ev = entry["eval"]
        points = {
            **{f"retrieval top-1 ({name})": ev["retrieval_top1"][name] for name in EXPERTS},
            "classification accuracy": ev["classification_accuracy"],
            "box IoU": ev["box_iou"],
            "mask IoU": ev["mask_iou"],
            "caption token accuracy": ev["caption_token_accuracy"],
            "QA accuracy": sum(ev["qa_accuracy"].values()) / len(ev["qa_accuracy"]),
        }
        for name, value in points.items():
            curves.setdefault(name, []).append(100.0 * value)
    return curves


def plot_stage_metrics(history: list[dict], path) -> None:
    """One line per metric over the stages (as the paper's Fig. 3)."""
    plt = _pyplot()
    stages = [entry["stage"] for entry in history]
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, values in stage_curves(history).items():
        ax.plot(range(len(stages)), values, marker="o", linestyle="--" if "retrieval" in name else "-", label=name)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_xlabel("after stage")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title("Evaluation metrics across progressive pre-alignment")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_router_probabilities(router_probs: dict[str, list[float]], path) -> None:
    """Grouped bars: the router's mean contribution probability of each expert per task type
    (as the paper's Fig. 2)."""
    plt = _pyplot()
    tasks = list(router_probs)
    width = 0.8 / len(EXPERTS)
    fig, ax = plt.subplots(figsize=(7, 4))
    for e, name in enumerate(EXPERTS):
        xs = [t + (e - (len(EXPERTS) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar(xs, [router_probs[task][e] for task in tasks], width, label=name)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_xlabel("task type")
    ax.set_ylabel("router contribution probability")
    ax.set_ylim(0, 1)
    ax.set_title("Router contribution probabilities per task type")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
