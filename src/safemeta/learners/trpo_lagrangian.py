"""TRPO-Lagrangian trained from scratch on each task: the primal-dual reference of CVPO's claims.

The operator `trpo_lagrangian` (`adaptation/trpo_lagrangian.py`) repeated from a fresh policy:
per iteration the scenario's `rollouts` episodes of the current policy, a multiplier step on
J_c - d and one TRPO step on the Lagrangian, the same data per iteration as the CVPO learner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Learner


@dataclass(frozen=True)
class TRPOLagrangianLearnerSettings:
    block: ClassVar[str] = "learner_trpo_lagrangian"

    iterations: int
    n_tasks: int | None


class TRPOLagrangianFromScratch(Learner):
    name = "trpo_lagrangian"
    kinds = ("sampled",)
    operator = "trpo_lagrangian"
    Settings = TRPOLagrangianLearnerSettings
