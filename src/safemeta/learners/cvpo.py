"""CVPO trained from scratch on each task (the per-task safe-RL reference; Liu et al. 2022, Alg. 2).

pi_[0] is a freshly initialised Gaussian policy; every iteration collects the scenario's
`rollouts` episodes with the current (stochastic) policy, adds them to the task's replay buffer
and runs the operator's updates (critics, E-step, M-step; `adaptation/cvpo.py`), so iteration k
is an evaluation point after (k + 1) x rollouts x horizon environment steps. The trace records,
per point, the exploration policy's reward and cost (the training episodes themselves: their
costs are the violations during training), `env_steps`, and the step's E-step eta, lam (`u`),
KL and planned cost and M-step KLs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Learner


@dataclass(frozen=True)
class CVPOLearnerSettings:
    block: ClassVar[str] = "learner_cvpo"

    iterations: int
    n_tasks: int | None


class CVPOFromScratch(Learner):
    name = "cvpo"
    kinds = ("sampled",)
    operator = "cvpo"
    Settings = CVPOLearnerSettings
