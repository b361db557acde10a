"""What every algorithm is given about the scenario it runs on.

A `Scenario` bundles a scenario's task distribution with the settings the config gives it for
all algorithms alike: how a policy is sampled (`rollouts`, `gamma`, `constraint_gamma`), the
policy network of sampled scenarios, and the torch device. The CLI builds it from the validated
config; algorithms receive it and never read config files themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .rollout import Batch, SamplingSettings, derived_seed, rollout_policies, rollout_policy
from .tasks import Task, TaskDistribution


@dataclass
class Scenario:
    name: str                          # the scenario's key in the config
    distribution: TaskDistribution
    sampling: SamplingSettings
    policy_options: dict[str, Any] = field(default_factory=dict)   # `policy:` (hidden, init_log_std)
    device: Any = "cpu"

    @property
    def kinds(self) -> tuple[str, ...]:
        """How algorithms may use the tasks, in order of preference (see TaskDistribution.kinds)."""
        return self.distribution.kinds

    @staticmethod
    def limits(task: Task) -> np.ndarray:
        """The task's cost limits d [p]."""
        return np.asarray(task.params["d"], dtype=np.float64)

    def rollout(self, task: Task, policy: Any, seed: int) -> Batch:
        """`sampling.rollouts` episodes of `policy` on `task`, every draw from `seed`."""
        return rollout_policy(self.distribution, task, policy, self.sampling, seed, self.device)

    def rollout_tasks(self, tasks: list[Task], policies: list[Any], seeds: list[int]) -> list[Batch]:
        """`rollout` of each (task, policy, seed), all tasks stepped as one batch (the same Batches)."""
        return rollout_policies(self.distribution, tasks, policies, self.sampling, seeds, self.device)

    def fresh_policy(self, task: Task, seed: int, kind: str):
        """A newly initialised policy for the task's spaces: the uniform tabular softmax (exact
        scenarios) or the configured network with weights drawn from `seed` (sampled ones)."""
        from .policies import TabularSoftmaxPolicy, policy_for

        if kind == "exact":
            cmdp = self.distribution.cmdp(task)
            return TabularSoftmaxPolicy(np.zeros((cmdp.num_states, cmdp.num_actions)))
        env = self.distribution.make_env(task, 1, derived_seed(seed, 10), "cpu")
        with torch.random.fork_rng():
            torch.manual_seed(derived_seed(seed, 11))
            return policy_for(env.observation_space, env.action_space, tuple(self.policy_options["hidden"]),
                              self.policy_options["init_log_std"])
