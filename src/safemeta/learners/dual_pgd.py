"""The paper's A^s iterated from a fresh policy: the adaptation sequence without meta-learning.

pi_[0] is the uniform softmax (exact scenarios) or a freshly initialised network, pi_[k+1] =
A^s(pi_[k]) (Alg. 1 exact, Alg. 3 sampled), K = `iterations`. It is the reference a meta-policy
start is compared with: the same operator and data per step, without the meta-learned prior.
An unsafe start makes problem (1) infeasible; A^s then returns its u_max closed form, a step
that reduces the violated cost (`adaptation/dual_pgd.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Learner


@dataclass(frozen=True)
class DualPGDLearnerSettings:
    block: ClassVar[str] = "learner_dual_pgd"

    iterations: int
    n_tasks: int | None


class DualPGDFromScratch(Learner):
    name = "dual_pgd"
    kinds = ("exact", "sampled")
    operator = "dual_pgd"
    Settings = DualPGDLearnerSettings
