"""The one configuration of progressive pre-alignment, and its command-line form."""

from __future__ import annotations

import argparse
import dataclasses

STAGES = ("caption", "classification", "detection", "segmentation", "instruct")
SCHEDULES = {"progressive": STAGES, "instruct-only": ("instruct",)}


@dataclasses.dataclass
class AlignConfig:
    """Everything a run depends on; two runs with equal configs are identical.

    The defaults are the demo (all stages on a 2-core CPU in a few minutes);
    :meth:`quick` is a seconds-long run for tests.
    """

    schedule: str = "progressive"  # "progressive" or "instruct-only" (the ablation: no pre-alignment)
    steps_caption: int = 200
    steps_classification: int = 200
    steps_detection: int = 200
    steps_segmentation: int = 200
    steps_instruct: int = 1000
    batch_size: int = 32
    lr_align: float = 2e-3
    lr_instruct: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    queue_size: int = 1024
    momentum: float = 0.99
    temperature: float = 0.07
    residual_p: float = 0.5
    balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    top_k: int = 2
    dim: int = 64
    num_tokens: int = 16
    image_size: int = 32
    train_scenes: int = 4096
    eval_scenes: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"AlignConfig: schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        for stage in STAGES:
            if self.stage_steps(stage) < 1:
                raise ValueError(f"AlignConfig: steps_{stage} must be >= 1; got {self.stage_steps(stage)}")
        if not 0.0 < self.residual_p <= 1.0:
            raise ValueError(f"AlignConfig: residual_p must be in (0, 1]; got {self.residual_p}")
        if self.queue_size < self.batch_size:
            raise ValueError(f"AlignConfig: queue_size ({self.queue_size}) must be >= batch_size ({self.batch_size})")

    @property
    def stages(self) -> tuple[str, ...]:
        return SCHEDULES[self.schedule]

    def stage_steps(self, stage: str) -> int:
        return getattr(self, f"steps_{stage}")

    @classmethod
    def quick(cls, **overrides) -> "AlignConfig":
        """A few steps per stage on a small data set: seconds on a CPU."""
        small = dict(steps_caption=2, steps_classification=2, steps_detection=2, steps_segmentation=2,
                     steps_instruct=3, batch_size=8, warmup_steps=1, queue_size=32, dim=32, num_tokens=4,
                     train_scenes=64, eval_scenes=16)
        return cls(**{**small, **overrides})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` option per config field, defaulting to "not given"."""
    group = parser.add_argument_group("run configuration (AlignConfig)")
    for field in dataclasses.fields(AlignConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = type(field.default)
        choices = tuple(SCHEDULES) if field.name == "schedule" else None
        metavar = None if choices else kind.__name__.upper()
        group.add_argument(flag, dest=field.name, type=kind, default=None, choices=choices, metavar=metavar,
                           help=f"default {field.default}")


def overrides(args: argparse.Namespace) -> dict:
    """The config fields given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(AlignConfig) if getattr(args, f.name) is not None}
