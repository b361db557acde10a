"""The meta-learner protocol, the meta-training loop, and the shared one-step evaluation.

A meta-learner owns its state, performs one meta-iteration at a time, and names the adaptation
operator its tasks are adapted with (its inner step, and what its meta-test uses unless
`metatest.adapter` names another). `train` runs iterations from a state to the end, calling a
hook after each (the CLI checkpoints there), so a run resumed from the state of iteration n
continues bit for bit when every draw of iteration n derives from (seed, n, ...) or from an RNG
state kept in the state.

What an implementer provides (subclass `MetaLearner`):
- `name` (the registry name in `meta/__init__.py`, the config's `methods.NAME.algorithm`),
  `kinds` (scenario kinds it runs on; exact and sampled versions are two classes of one name),
  `operator` (the registry name of its adaptation operator);
- `Settings`: a frozen dataclass WITHOUT defaults whose fields are the options it reads: its own
  options (schema block `method_<name>`) and the `metatrain` keys it uses; `config.settings`
  fills it from the validated config. An option set in the config that the class does not read
  is rejected, naming the key; `check_options(settings)` may reject values for this kind
  (`registry.OptionError`);
- `State`: a dataclass with at least `iteration` (the next iteration to run) and `records`
  (one dict per iteration), holding only tensors, arrays and plain values (checkpointed with
  `torch.save(vars(state))`);
- `initial_state()`, `iteration(state)` (runs iteration n = state.iteration, appends its record,
  advances state.iteration; n == settings.iterations evaluates the final meta-policy only) and
  `policy(state)` (the meta-policy, whose `to_checkpoint()` is policy.pt);
- `record_vars`: its own per-iteration variables (name -> records.Var, dims from ("task",
  "constraint")); the evaluation variables (`EVALUATION_VARS` plus the operator's step
  variables) and time_sampling / time_compute are common to all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import torch

from ..evaluate import adaptation_sequences
from ..optim import fisher_vector_product, flat_grad, trpo_step
from ..policies import TabularSoftmaxPolicy, policy_from_checkpoint
from ..records import Var
from ..rollout import derived_seed

if TYPE_CHECKING:
    from ..adaptation.base import AdaptationOperator
    from ..policies import NeuralPolicy
    from ..scenario import Scenario
    from ..tasks import Task

# Recorded by every meta-learner when it evaluates: the meta-policy and its one-step adaptation
# on each evaluation task (the paper's Fig. 1 columns 1-2), and the time split of the iteration.
EVALUATION_VARS: dict[str, Var] = {
    "reward": Var(("task",), "reward of the one-step adapted policy A^s(pi_phi)", "return"),
    "cost": Var(("task", "constraint"), "cost of the one-step adapted policy A^s(pi_phi)", "cost"),
    "meta_reward": Var(("task",), "reward of the meta-policy pi_phi", "return"),
    "meta_cost": Var(("task", "constraint"), "cost of the meta-policy pi_phi", "cost"),
    "cost_se": Var(("task", "constraint"), "standard error of cost (0: exact)", "cost"),
    "meta_cost_se": Var(("task", "constraint"), "standard error of meta_cost (0: exact)", "cost"),
    "u": Var(("task", "constraint"), "multipliers of the one-step adaptation", "1"),
    "adapt_kl": Var(("task",), "E_nu KL(A^s(pi_phi) || pi_phi) of the one-step adaptation", "nats"),
}
# Statistics of a meta-step (TRPO-based learners share them) and of the CRPO switch.
TRPO_STEP_VARS: dict[str, Var] = {
    "step_accepted": Var((), "the TRPO line search accepted a step", "1"),
    "step_kl": Var((), "mean KL of the accepted meta-step", "nats"),
    "step_improvement": Var((), "improvement of the batch objective by the meta-step", "return"),
    "grad_norm": Var((), "norm of the batch meta-gradient", "1"),
}
N_VIOLATING = Var((), "training tasks of the batch that took the cost-reduction step", "1")
# The training tasks of a sampled meta-iteration (their rollouts are the iteration's data).
BATCH_VARS: dict[str, Var] = {
    "batch_reward": Var((), "mean reward of the adapted policies on the iteration's training tasks", "return"),
    "batch_cost": Var(("constraint",), "max cost of the adapted policies on the iteration's training tasks", "cost"),
    "batch_meta_reward": Var((), "mean reward of the meta-policy on the iteration's training tasks", "return"),
    "batch_meta_cost": Var(("constraint",), "max cost of the meta-policy on the iteration's training tasks", "cost"),
    "batch_u": Var(("constraint",), "mean multipliers of the iteration's adaptations", "1"),
    "batch_adapt_kl": Var((), "mean E_nu KL(adapted || meta) of the iteration's adaptations", "nats"),
}
TIME_VARS: dict[str, Var] = {
    "time_sampling": Var((), "wall time spent collecting samples", "s"),
    "time_compute": Var((), "wall time spent computing (adaptation, gradients, step)", "s"),
}


def training_batch(seed: int, n: int, size: int, available: int) -> np.ndarray:
    """The indices of iteration n's `size` training tasks of `available` (drawn from (seed, n))."""
    return np.random.default_rng(derived_seed(seed, n, 3)).choice(available, size=size, replace=size > available)


class MetaLearner:
    """Base class of meta-learners (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ()
    operator: ClassVar[str] = ""
    Settings: ClassVar[type]
    State: ClassVar[type]
    record_vars: ClassVar[dict[str, Var]] = {}

    def __init__(self, scenario: "Scenario", operator: "AdaptationOperator", settings: Any,
                 train: list["Task"], evaluation: list["Task"], seed: int) -> None:
        self.scenario, self.adapt, self.settings = scenario, operator, settings
        self.train_tasks, self.evaluation, self.seed = train, evaluation, int(seed)

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
        """Every per-iteration variable of this learner's meta-training trace."""
        own_step = {name: Var(("task", *v.dims), v.long_name, v.units) for name, v in operator.step_vars.items()}
        return {**EVALUATION_VARS, **own_step, **cls.record_vars, **TIME_VARS}

    def initial_state(self) -> Any:
        raise NotImplementedError

    def iteration(self, state: Any) -> None:
        raise NotImplementedError

    def policy(self, state: Any) -> Any:
        raise NotImplementedError


@dataclass
class TabularMetaState:
    """The checkpointed state of a tabular meta-learner: the meta-policy's logits."""

    iteration: int
    logits: np.ndarray
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class NeuralMetaState:
    """The checkpointed state of a sampled meta-learner: the meta-policy's checkpoint dict."""

    iteration: int
    policy: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


class TabularMetaLearner(MetaLearner):
    """Shared by the exact meta-learners: the training tasks' CMDPs, the uniform meta-policy
    (phi = 0) as the start, a tabular softmax policy of the state's logits."""

    State = TabularMetaState

    def __init__(self, scenario, operator, settings, train, evaluation, seed):
        super().__init__(scenario, operator, settings, train, evaluation, seed)
        self.train_cmdps = [scenario.distribution.cmdp(t) for t in train]

    def initial_state(self) -> TabularMetaState:
        m = self.train_cmdps[0]
        return TabularMetaState(0, np.zeros((m.num_states, m.num_actions)))

    def policy(self, state: Any) -> TabularSoftmaxPolicy:
        return TabularSoftmaxPolicy(state.logits)


class NeuralMetaLearner(MetaLearner):
    """Shared by the sampled meta-learners: a freshly initialised meta-policy (weights from a
    generator of the seed) as the start, the policy of the state's checkpoint dict."""

    State = NeuralMetaState

    def initial_state(self) -> NeuralMetaState:
        return NeuralMetaState(0, self.scenario.fresh_policy(self.train_tasks[0], self.seed, "sampled").to_checkpoint())

    def policy(self, state: NeuralMetaState) -> "NeuralPolicy":
        return policy_from_checkpoint(state.policy)

    def observe_training_tasks(self, meta: "NeuralPolicy", n: int) -> tuple[np.ndarray, list[int], list, list]:
        """Iteration n's training tasks and their batches on `meta`, observed together: the task
        indices, each task's seed derived_seed(seed, n, 5, j), its operator state and its
        observation (explored with derived_seed(task seed, 0))."""
        ids = training_batch(self.seed, n, self.settings.tasks_per_iteration, len(self.train_tasks))
        seeds = [derived_seed(self.seed, n, 5, j) for j in range(len(ids))]
        states = [self.adapt.start(self.train_tasks[k], meta, s) for k, s in zip(ids, seeds)]
        observed = self.adapt.observe_tasks(states, [meta] * len(states), [derived_seed(s, 0) for s in seeds])
        return ids, seeds, states, observed

    def evaluate_if_due(self, meta: "NeuralPolicy", n: int, record: dict[str, Any]) -> float:
        """At every `eval_every`-th iteration and the last, the one-step evaluation of `meta` on
        the evaluation tasks into `record`; returns the time it spent sampling."""
        settings = self.settings
        if n % settings.eval_every and n != settings.iterations:
            return 0.0
        eval_seed = derived_seed(self.seed, n, 7)
        evaluation, t_sampling = evaluate_one_step(self.adapt, self.evaluation, meta,
                                                   lambda j, k: derived_seed(eval_seed, j, k))
        record.update(evaluation)
        return t_sampling


def crpo_switch(branches: list[str], switch: str) -> list[int]:
    """Which tasks' directions a batch step combines (Alg. 2 lines 4-12 with a batch of tasks):
    `branches[j]` is "meta" for a task that offers its meta-gradient, anything else for one that
    offers a cost-reduction direction. switch "any": if any task offers a cost reduction, only
    those (CRPO on problem (2)'s constraints); "per_task": every task's own branch."""
    if switch == "any" and any(b != "meta" for b in branches):
        return [j for j, b in enumerate(branches) if b != "meta"]
    return list(range(len(branches)))


def train(learner: MetaLearner, state: Any, on_iteration: Callable[[Any], None] | None = None) -> Any:
    """Meta-iterations from `state` to the end; `on_iteration(state)` after each step taken
    (not after the final evaluation). A finished state is returned unchanged."""
    last = learner.settings.iterations
    while state.iteration <= last:
        final = state.iteration == last
        learner.iteration(state)
        if not final and on_iteration is not None:
            on_iteration(state)
    return state


def evaluate_one_step(operator: "AdaptationOperator", tasks: list["Task"], policy: Any,
                      seed_of: Callable[[int, int], int]) -> tuple[dict[str, np.ndarray], float]:
    """The meta-policy and its one-step adaptation on each task (EVALUATION_VARS and the
    operator's step variables), through the adaptation loop with K = 1; and the sampling time.

    Task j explores pi_[k] with seed `seed_of(j, k)`; the tasks step together.
    """
    out: dict[str, list] = {name: [] for name in (*EVALUATION_VARS, *operator.step_vars)}
    t_sampling = 0.0
    sequences = adaptation_sequences(operator, tasks, [policy] * len(tasks), 1,
                                     [lambda k, j=j: seed_of(j, k) for j in range(len(tasks))], [0] * len(tasks))
    for seq in sequences:
        out["meta_reward"].append(seq["reward"][0])
        out["meta_cost"].append(seq["cost"][0])
        out["reward"].append(seq["reward"][1])
        out["cost"].append(seq["cost"][1])
        out["meta_cost_se"].append(seq["cost_se"][0])
        out["cost_se"].append(seq["cost_se"][1])
        out["u"].append(seq["u"][1])
        out["adapt_kl"].append(seq["kl"][1])
        for name in operator.step_vars:
            out[name].append(seq[name][1])
        t_sampling += float(seq["time_sampling"].sum())
    return {k: np.asarray(v) for k, v in out.items()}, t_sampling


def trpo_meta_step(meta: "NeuralPolicy", entries: list, settings: Any, n: int, *,
                   fisher_subsample: float = 1.0, seed: int | None = None):
    """One TRPO step on the mean of the entries' surrogates (lines 8 / 12); also the outer step of
    other TRPO-based meta-learners. An entry is (branch, surrogate(params | None), batch on pi_phi):
    the Fisher and mean KL are the meta-policy's on the entries' batches (visitation-weighted),
    and `settings` gives max_kl, cg_iters, cg_damping and backtrack_steps. `fisher_subsample` < 1
    estimates the Fisher on that fraction of the states, drawn with `seed` (optim.py)."""
    params = list(meta.parameters())
    objective_at = lambda prm: sum(e[1](prm) for e in entries) / len(entries)  # noqa: E731
    grad = flat_grad(objective_at(None), params)
    if not torch.isfinite(grad).all():
        raise FloatingPointError(f"meta-training iteration {n}: the meta-gradient has non-finite entries")
    states = [e[2].obs[e[2].alive] for e in entries]
    weights = [e[2].visitation()[e[2].alive] / len(entries) for e in entries]
    obs, w = torch.cat(states), torch.cat(weights)
    with torch.no_grad():
        reference = meta.distribution(obs)
    phi = meta.flat()

    def objective(flat: torch.Tensor) -> float:
        with torch.no_grad():
            return float(objective_at(meta.unflatten(flat)))

    def kl(flat: torch.Tensor) -> float:
        with torch.no_grad():
            return float((w * meta.kl(obs, reference, meta.unflatten(flat))).sum())

    fvp = fisher_vector_product(meta, obs, w, subsample=fisher_subsample, seed=seed)
    step = trpo_step(phi, grad.detach(), fvp, objective, kl, settings.max_kl,
                     cg_iters=settings.cg_iters, damping=settings.cg_damping, backtrack_steps=settings.backtrack_steps)
    meta.load_flat(step.params)
    return step, float(grad.norm())


def batch_record(stats: dict[str, list]) -> dict[str, Any]:
    """Statistics of the training tasks of one iteration (adapted ones for reward, cost, u, KL)."""
    nan_p = np.full(len(stats["meta_cost"][0]), np.nan)
    return {
        "batch_reward": float(np.mean(stats["reward"])) if stats["reward"] else np.nan,
        "batch_cost": np.max(stats["cost"], axis=0) if stats["cost"] else nan_p,
        "batch_meta_reward": float(np.mean(stats["meta_reward"])),
        "batch_meta_cost": np.max(stats["meta_cost"], axis=0),
        "batch_u": np.nanmean(stats["u"], axis=0) if stats["u"] else nan_p,   # NaN: a recovery step
        "batch_adapt_kl": float(np.mean(stats["kl"])) if stats["kl"] else np.nan,
    }
