"""How operators observe a policy on a task: exactly (tabular scenarios) or by rollouts.

Every operator of one scenario kind explores a policy the same way, so the loop records the
same quantities whatever the operator; operators subclass one of these and add their `step`.
- `ExactObserver`: the task's CMDP (built once per task object) and the exact evaluation of the
  policy (`Observation.data` is the `tasks.tabular.Evaluation`).
- `RolloutObserver`: `scenario.rollouts` episodes of the policy (`Observation.data` is the
  rollout `Batch`); reward is the mean undiscounted episode return, cost the constrained J_c
  with its standard error over rollouts.
"""
from __future__ import annotations

import time

import numpy as np

from .base import AdaptationOperator, Observation


class ExactObserver(AdaptationOperator):
    """Observation = exact evaluation on the task's CMDP (`state.cmdp`)."""

    def start(self, task, policy, seed):
        state = super().start(task, policy, seed)
        state.cmdp = self.cmdp(task)
        return state

    def cmdp(self, task):
        """The task's CMDP, built once per task object (meta-training evaluates the same tasks often)."""
        cache = self.__dict__.setdefault("_cmdps", {})
        if id(task) not in cache:
            cache[id(task)] = (task, self.scenario.distribution.cmdp(task))   # the task is kept alive
        return cache[id(task)][1]

    def return_kind(self) -> str:
        return "exact expected discounted return from rho (tabular, no sampling)"

    def observe(self, state, policy, seed: int) -> Observation:
        from ..tasks.tabular import evaluate

        t0 = time.perf_counter()
        ev = evaluate(state.cmdp, policy.probs())
        return Observation(ev.J, ev.Jc, np.zeros_like(ev.Jc), time.perf_counter() - t0, 0, ev)


class RolloutObserver(AdaptationOperator):
    """Observation = one batch of the policy's rollouts on the task (`scenario.rollout`)."""

    def observe(self, state, policy, seed: int) -> Observation:
        batch = self.scenario.rollout(state.task, policy, seed)
        return Observation(float(batch.episode_reward.mean()), batch.constraint_value.double().cpu().numpy(),
                           batch.constraint_value_se.double().cpu().numpy(), batch.sampling_time,
                           int(batch.alive.sum()), batch)
