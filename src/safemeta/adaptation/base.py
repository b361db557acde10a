"""The adaptation-operator protocol: ONE improvement step of a policy on one task.

An operator improves a policy on one task from data it collects itself. The adaptation loop
(`evaluate.adaptation_sequence`) drives it; the meta-test (from the meta-policy), the
single-task learners (from a fresh policy) and the meta-training evaluation (one step) all use
that loop. Per task, the loop calls

    state = op.start(task, policy, seed)            # once per adaptation sequence
    for k in 0..K:
        obs = op.observe(state, policy_k, seed_k)   # explore: rewards, costs, and the step's data
        if k < K:
            step = op.step(state, policy_k, obs)    # policy_{k+1} = step.policy

so an on-policy operator learns from the rollouts that `observe` collected for policy_k, an
off-policy one adds them to a replay buffer it keeps in `state` (critics too), and a
differentiable one may roll out again inside `step` and back-propagate through the dynamics.
The data of `observe` are also what the loop reports as the reward and cost of policy_k, so every
policy that explores the task is measured (anytime safety: k = 0 is the meta-policy itself).

What an implementer provides (subclass `AdaptationOperator`):
- `name`: the registry name (`adaptation/__init__.py`), the config's `adaptation.<name>` block
  and the `algorithm` of a learner or the `operator` of a meta-learner;
- `kinds`: the scenario kinds it runs on ("exact", "sampled", "differentiable"; see
  `TaskDistribution.kinds`). Exact and sampled variants of one operator are two classes with one
  name, both listed in the registry;
- `Settings`: a frozen dataclass WITHOUT defaults whose fields are the options it reads; the
  defaults live in the config schema's block `operator_<name>` only (`config.settings` builds
  it). An option the config sets that the chosen class does not read is rejected, naming the key;
- `step_vars`: extra per-step variables it records (name -> `records.Var`, dims drawn from
  ("constraint",)), returned in `Step.record`; the loop's own variables are reward, cost,
  cost_se, time_sampling (per policy) and u, kl, time (per step);
- `observe` and `step` (and `start` when it keeps per-task state). Every random draw comes from
  the seeds given, so a sequence is reproducible bit for bit.
- optionally `check_options(settings)` (a classmethod) raising `registry.OptionError(option,
  why)` for values that are valid in the schema but not for this kind.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..records import Var

if TYPE_CHECKING:
    from ..scenario import Scenario
    from ..tasks import Task


@dataclass
class Observation:
    """One policy explored on one task: what the loop records, and the data a step learns from."""

    reward: float            # mean undiscounted episode return (exact J on exact scenarios)
    cost: np.ndarray         # [p] constrained cost J_c, the quantity compared with d
    cost_se: np.ndarray      # [p] standard error of `cost` (0 for exact values)
    time_sampling: float     # seconds spent collecting (or evaluating exactly)
    env_steps: int = 0       # environment steps taken to observe (0 on exact scenarios)
    data: Any = None         # the operator's own data (a rollout Batch, an exact evaluation, ...)


@dataclass
class Step:
    """The outcome of one operator step."""

    policy: Any              # the improved policy (a new object; the input policy is unchanged)
    u: np.ndarray            # [p] Lagrange multipliers the step used (NaN where it has none)
    kl: float                # E_s KL(new || old) on the step's states (NaN if it cannot tell)
    record: dict[str, Any] = field(default_factory=dict)   # values of the operator's step_vars
    result: Any = None       # the operator's full result (for meta-learners built on it)


class AdaptationOperator:
    """Base class of adaptation operators (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ()
    Settings: ClassVar[type]
    step_vars: ClassVar[dict[str, Var]] = {}

    def __init__(self, scenario: "Scenario", settings: Any) -> None:
        self.scenario, self.settings = scenario, settings

    @classmethod
    def check_options(cls, settings: Any, given: frozenset[str] = frozenset()) -> None:
        """Raise registry.OptionError(option, why) for a value this implementation cannot use;
        `given` names the options the config sets explicitly (the others are defaults)."""

    @classmethod
    def ignored(cls, settings: Any) -> dict[str, str]:
        """Options without effect under the others' values (option -> why): setting one is an
        error, and stage configs leave them out."""
        return {}

    def start(self, task: "Task", policy: Any, seed: int) -> Any:
        """Per-sequence state for adapting `policy` on `task` (a buffer, critics, ...)."""
        del policy, seed
        return SimpleNamespace(task=task, limits=self.scenario.limits(task))

    def observe(self, state: Any, policy: Any, seed: int) -> Observation:
        raise NotImplementedError

    def step(self, state: Any, policy: Any, observation: Observation) -> Step:
        raise NotImplementedError

    def return_kind(self) -> str:
        """What `Observation.reward` and `cost` mean (stored with every trace)."""
        sampling = self.scenario.sampling
        return (f"mean undiscounted episode return over {sampling.rollouts} rollouts; cost is the constrained J_c, "
                f"the mean of sum_t {sampling.constraint_gamma:g}^t c_t")

    def with_settings(self, **changes: Any) -> "AdaptationOperator":
        """The same operator with some options replaced (e.g. the meta-test's delta)."""
        import dataclasses

        return type(self)(self.scenario, dataclasses.replace(self.settings, **changes))
