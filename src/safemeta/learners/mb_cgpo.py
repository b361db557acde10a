"""MB-CGPO (CGPO App. F.4, Alg. 3) trained from scratch: the `mb_cgpo` operator repeated.

Each iteration samples `rollouts` real episodes (the trace's reward, cost and env_steps), fits the
world model on every transition so far, and takes the CGPO step with gradients through the
model. Runs on any sampled scenario (e.g. function_env_floor, whose floor term has no gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Learner


@dataclass(frozen=True)
class MBCGPOLearnerSettings:
    block: ClassVar[str] = "learner_mb_cgpo"

    iterations: int
    n_tasks: int | None


class MBCGPOLearner(Learner):
    name = "mb_cgpo"
    kinds = ("sampled",)
    operator = "mb_cgpo"
    Settings = MBCGPOLearnerSettings
