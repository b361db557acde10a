"""CGPO (Dai et al. 2024, Alg. 1) trained from scratch: the `cgpo` operator repeated.

pi_[0] is a freshly initialised network, pi_[k+1] = one CGPO iteration from pi_[k] (GBE on one
reparameterised rollout of `rollouts` episodes, the three-case step, the radius of eq. (18),
the critics' fit), K = `iterations` (Table 4's num_epochs). The critics and the radius live in
the operator's per-task state, so they carry over from one iteration to the next. Every policy's
reward and cost in the trace are those of its own GBE rollout (fresh samples, before it is
updated), and `env_steps` counts them, so Conv. Steps (App. F.2) are cumulative env_steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Learner


@dataclass(frozen=True)
class CGPOLearnerSettings:
    block: ClassVar[str] = "learner_cgpo"

    iterations: int
    n_tasks: int | None


class CGPOLearner(Learner):
    name = "cgpo"
    kinds = ("differentiable",)
    operator = "cgpo"
    Settings = CGPOLearnerSettings
