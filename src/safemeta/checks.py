"""Checks of a meta-training run: stop a degenerate run, warn about one that learns nothing.

They read the records a meta-learner appends (one per iteration), so they apply to every
meta-learner that records these variables, and they judge a run resumed from a checkpoint as
the uninterrupted one (`RunChecks.replay` goes over the records so far):
- infeasible adaptations: the operator's step variable `feasible` (dual_pgd declares it: 0 when
  problem (1) has no solution, its multipliers at their cap u_max, or a recovery step) on the
  evaluation tasks. More than `max_infeasible_share` of them infeasible at
  `infeasible_evaluations` evaluations in a row stops the run (`RunStopped`): the limit d is
  out of reach of every policy near the meta-policy, so no meta-step can be safe;
- stalled meta-steps: `step_accepted` (the TRPO line search) false in `stalled_iterations`
  iterations in a row is a warning (once per stretch), with the gradient norm: zero gradients
  (one rollout per task makes every advantage zero) or a line search that never improves.
Options come from the config section `checks` (schema block "checks").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class CheckSettings:
    block: ClassVar[str] = "checks"

    max_infeasible_share: float
    infeasible_evaluations: int
    stalled_iterations: int


class RunStopped(RuntimeError):
    """A meta-training run was stopped as degenerate; the message says why and what to change."""


class RunChecks:
    """Checks records one at a time: `observe(record)` returns warning lines or raises RunStopped.

    `where` names the run in messages (scenario, method, seed); `limits` are the evaluation
    tasks' limits d [tasks, p].
    """

    def __init__(self, settings: CheckSettings, where: str, limits: np.ndarray) -> None:
        self.settings, self.where, self.limits = settings, where, np.asarray(limits, dtype=np.float64)
        self._infeasible_streak = 0
        self._stalled_since: int | None = None
        self._warned_stall = False

    def replay(self, records: list[dict[str, Any]]) -> None:
        """Go over the records of a resumed run (their warnings were printed by that run)."""
        for record in records:
            self.observe(record)

    def observe(self, record: dict[str, Any]) -> list[str]:
        return [*self._infeasible(record), *self._stalled(record)]

    def _infeasible(self, record: dict[str, Any]) -> list[str]:
        feasible = np.asarray(record.get("feasible", np.nan), dtype=np.float64).reshape(-1)
        if not np.isfinite(feasible).all():     # no evaluation at this iteration (or no such variable)
            return []
        infeasible = int((feasible == 0).sum())
        if infeasible <= self.settings.max_infeasible_share * feasible.size:
            self._infeasible_streak = 0
            return []
        self._infeasible_streak += 1
        if self._infeasible_streak < self.settings.infeasible_evaluations:
            return []
        d = self.limits
        limit = f"d = {d.min():.4g}" if np.ptp(d) == 0 else f"d = {d.min():.4g} .. {d.max():.4g}"
        raise RunStopped(
            f"{self.where}: stopped at iteration {int(record['iteration'])}: the one-step adaptation is infeasible "
            f"(problem (1) has no solution: `feasible` 0) on {infeasible} of {feasible.size} evaluation tasks, at "
            f"{self._infeasible_streak} evaluations in a row, with {limit}: no policy near the meta-policy meets the "
            f"limit. Raise it (task_options cost_limit or limit_fraction) or the operator's delta; "
            f"checks.max_infeasible_share: 1 lets the run go on")

    def _stalled(self, record: dict[str, Any]) -> list[str]:
        accepted = record.get("step_accepted")
        if accepted is None or not np.isfinite(float(accepted)):   # the final evaluation, or no TRPO step
            return []
        n = int(record["iteration"])
        if accepted:
            self._stalled_since, self._warned_stall = None, False
            return []
        if self._stalled_since is None:
            self._stalled_since = n
        if self._warned_stall or n - self._stalled_since + 1 < self.settings.stalled_iterations:
            return []
        self._warned_stall = True
        grad = record.get("grad_norm")
        why = (" with a zero meta-gradient (one rollout per task makes every advantage zero; use rollouts >= 2)"
               if grad is not None and float(grad) == 0.0 else
               f" (gradient norm {float(grad):.3g}: the line search finds no improving step within max_kl)"
               if grad is not None else "")
        return [f"{self.where}: warning: no meta-step accepted in iterations {self._stalled_since}-{n}{why}; "
                f"the meta-policy is not learning"]
