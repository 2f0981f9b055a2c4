"""Training of Astrea: progressive contrastive pre-alignment and the demo job."""

from astrea.train.aligner import ProgressiveAligner
from astrea.train.config import SCHEDULES, STAGES, AlignConfig

__all__ = ["SCHEDULES", "STAGES", "AlignConfig", "ProgressiveAligner"]
