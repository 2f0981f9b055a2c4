"""The draw of a stochastic residual: keep probability, Philox key and mask units.

Training: ``m ~ Bernoulli(p)`` per mask unit, drawn inside the kernels from Philox keyed by
``(seed, offset + unit)`` and never stored. Units: each ``[..., D]`` row of the flattened
``[-1, D]`` view (``granularity="token"``) or each sample along dim 0 (``"sample"``). The
draw of unit ``i`` depends only on ``seed`` and ``offset + i``, so a caller that advances
``offset`` by the number of units per call gets fresh, non-overlapping streams under one
seed. Eval, or ``p == 1``: no draw, exactly ``y + r``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from astrea._validation import check_choice, check_int

GRANULARITIES = ("token", "sample")
# seed and offset + unit are int64 counters.
MAX_COUNTER = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class ResidualDraw:
    """One stochastic residual's draw; ``as_args()`` is how the registered ops take it."""

    p: float = 1.0
    seed: int = 0
    offset: int = 0
    granularity: str = "token"
    training: bool = True

    @classmethod
    def checked(cls, op: str, p, seed, offset, granularity, training) -> ResidualDraw:
        """The draw of user arguments, each validated with an error naming ``op`` and the argument."""
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise TypeError(f"{op}: p must be a float in (0, 1], got {type(p).__name__}")
        if not 0.0 < p <= 1.0:  # also rejects NaN
            raise ValueError(f"{op}: p (the keep probability) must be in (0, 1]; got {p}")
        check_int(op, "seed", seed, low=0, high=MAX_COUNTER)
        check_int(op, "offset", offset, low=0, high=MAX_COUNTER)
        check_choice(op, "granularity", granularity, GRANULARITIES)
        if not isinstance(training, bool):
            raise TypeError(f"{op}: training must be a bool, got {type(training).__name__}")
        return cls(float(p), seed, offset, granularity, training)

    def as_args(self) -> tuple[float, int, int, str, bool]:
        return self.p, self.seed, self.offset, self.granularity, self.training

    @property
    def stochastic(self) -> bool:
        """Whether a mask is drawn at all (training with p < 1)."""
        return self.training and self.p < 1.0

    def units(self, shape) -> tuple[int, int]:
        """(mask units, ``[..., D]`` rows per unit) of a ``[B, ..., D]`` tensor of ``shape``."""
        rows = math.prod(shape[:-1])
        if self.granularity == "token":
            return rows, 1
        samples = shape[0]
        return samples, rows // samples if samples else 1

    def kernel_args(self) -> dict:
        """The draw as every Triton kernel of the residual takes it (1/p computed once, in double)."""
        return {"seed": self.seed, "offset": self.offset, "keep_p": self.p, "inv_p": 1.0 / self.p,
                "stochastic": self.stochastic}
