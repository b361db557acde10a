"""The single-task learner protocol: an adaptation operator repeated from a fresh policy.

The `single_task` stage trains a learner from scratch on each test task of a scenario (the
per-task reference that adaptation from a meta-policy is compared with). A learner names its
operator and, by default, runs the adaptation loop (`evaluate.adaptation_sequence`) for
`settings.iterations` steps from `scenario.fresh_policy`, so its trace has the same variables
as a meta-test.

What an implementer provides (subclass `Learner`): `name` (registry name in
`learners/__init__.py`, the config's `learners.NAME.algorithm`), `kinds`, `operator` (registry
name of the operator it repeats), `Settings` (a frozen dataclass WITHOUT defaults, at least
`iterations` and `n_tasks`; defaults in the schema block `learner_<name>`), and optionally its own
`run_task` (e.g. evaluation points every N environment steps rather than every step) with its
`trace_vars`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from ..evaluate import adaptation_sequence, sequence_vars, stack
from ..records import Var
from ..registry import kind_of
from ..rollout import derived_seed

if TYPE_CHECKING:
    from ..adaptation.base import AdaptationOperator
    from ..scenario import Scenario
    from ..tasks import Task

class Learner:
    """Base class of single-task learners (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ()
    operator: ClassVar[str] = ""
    Settings: ClassVar[type]

    def __init__(self, scenario: "Scenario", operator: "AdaptationOperator", settings: Any) -> None:
        self.scenario, self.adapt, self.settings = scenario, operator, settings

    @classmethod
    def check_options(cls, settings: Any, given: frozenset[str] = frozenset()) -> None:
        """Raise registry.OptionError(option, why) for a value this implementation cannot use;
        `given` names the options the config sets explicitly (the others are defaults)."""

    @classmethod
    def ignored(cls, settings: Any) -> dict[str, str]:
        """Options without effect under the others' values (option -> why): setting one is an
        error, and stage configs leave them out."""
        return {}

    @classmethod
    def trace_vars(cls, operator: type["AdaptationOperator"]) -> dict[str, Var]:
        return sequence_vars(operator)

    def tasks(self, test: list["Task"]) -> list["Task"]:
        """The test tasks it trains on: the first `n_tasks` (all when null)."""
        return test[: self.settings.n_tasks or len(test)]

    def run_task(self, task: "Task", seed: int) -> dict[str, np.ndarray]:
        """Train from scratch on one task: the loop from a fresh policy, K = iterations."""
        kind = kind_of(type(self.adapt), self.scenario.kinds)
        policy = self.scenario.fresh_policy(task, derived_seed(seed, 0), kind)
        return adaptation_sequence(self.adapt, task, policy, self.settings.iterations,
                                   lambda k: derived_seed(seed, 1, k), start_seed=derived_seed(seed, 2))

    def run(self, test: list["Task"], seed: int,
            on_task: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> dict[str, np.ndarray]:
        """Every task of `tasks(test)`, stacked with a leading task axis; `on_task(j, sequence)`
        after each (progress)."""
        sequences = []
        for j, task in enumerate(self.tasks(test)):
            sequences.append(self.run_task(task, derived_seed(seed, j)))
            if on_task is not None:
                on_task(j, sequences[-1])
        return stack(sequences)
