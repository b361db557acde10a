"""SHAC-Lag (CGPO's Table 1 baseline, App. F.1) trained from scratch: the `shac_lag` operator
repeated, one GBE rollout and one primal-dual iteration per step; the multiplier and Adam's
moments carry over from one iteration to the next in the operator's per-task state."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Learner


@dataclass(frozen=True)
class ShacLagLearnerSettings:
    block: ClassVar[str] = "learner_shac_lag"

    iterations: int
    n_tasks: int | None


class ShacLagLearner(Learner):
    name = "shac_lag"
    kinds = ("differentiable",)
    operator = "shac_lag"
    Settings = ShacLagLearnerSettings
