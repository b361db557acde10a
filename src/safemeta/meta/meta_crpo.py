"""Meta-CRPO (Khattar et al., ICLR 2023) as the paper runs it, its baseline (c) (section 6).

Meta-CRPO is an online method: per revealed task it runs CRPO (Xu et al. 2021) from the current
initialisation, then moves the initialisation to "the meta-policy that has the minimal average
distance to the task-specific policies of all previous tasks" (the paper's section 1). The paper
runs it with "all training tasks provided before the meta-training" and no meta-training stage
(section 6; Figs. 1-2 and 4-5 show no meta-training curves for it). So, here:

1. From one common initial policy phi_0 (the same fresh policy the other methods start from),
   run `crpo_steps` CRPO iterations (operator `crpo`, one batch per iteration) on every
   training task j, giving task policies pi_j. With `crpo_steps: null` the number is chosen so
   that the data equal the other methods' meta-training data (the paper: "all the methods have
   the same data requirements"): round(2 * iterations * tasks_per_iteration / n_train_tasks)
   batches per task, as a meta-iteration of Alg. 4 or MAML collects two batches per task.
2. The meta-policy is the distillation (Khattar et al.'s eq. (3), in the reading of the
   reference: their text is not available)
       phi* = argmin_phi (1/N) sum_j E_{s ~ nu_j} KL(pi_j(.|s) || pi_phi(.|s)),
   nu_j the discounted state visitation of task j's policy. Exact (tabular): per state this is
   the visitation-weighted mixture pi*(.|s) = sum_j nu_j(s) pi_j(.|s) / sum_j nu_j(s), with the
   exact nu_j of pi_j. Sampled: nu_j is represented by `distill_states` states drawn (with
   replacement, probability proportional to gamma^t) from the batch that pi_j's last CRPO
   iteration learned from (collected by its predecessor; no new data), and phi* is fitted by
   full-batch L-BFGS (strong-Wolfe line search, `distill_iters` iterations) from the mean of the
   task policies' parameters (they share phi_0, so their mean is a meaningful start).
3. The meta-test (the shared adaptation loop) runs CRPO steps from phi*.

Not implemented: the online learning-rate update of Khattar et al. (the seed authors' code sets
CRPO's max_kl per task from the KL to previous policies); every CRPO step uses operator crpo's
fixed `max_kl`. The tasks run in groups of `tasks_per_iteration` (as many as the other methods'
meta-iterations observe), a group's CRPO runs in lockstep so that their rollouts are collected
as one batch (`observe_tasks`); every task's run draws from its own seeds, so its policies do
not depend on the grouping. The CRPO work is spread evenly over `iterations` records (record n
holds the steps n T / I .. (n+1) T / I of the T = N * crpo_steps, ordered by group, step, task:
`_rounds`), so a run checkpoints and resumes like the others; the last record holds the
distillation. The trace has
no evaluation variables: the meta-policy exists only after the last record (its meta-test
k = 0 and k = 1 are what the others' meta-training evaluations show).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..policies import NeuralPolicy, TabularSoftmaxPolicy, policy_from_checkpoint
from ..records import Var
from ..rollout import derived_seed
from ..tasks.tabular import evaluate
from .base import MetaLearner

RECORD_VARS: dict[str, Var] = {
    "n_violating": Var((), "CRPO iterations of the record that took the cost branch", "1"),
    "batch_reward": Var((), "mean reward of the task policies explored in the record (training tasks)", "return"),
    "batch_cost": Var(("constraint",), "max cost of the task policies explored in the record (training tasks)", "cost"),
    "crpo_steps": Var((), "CRPO iterations (batches) taken in the record", "1"),
    "tasks_done": Var((), "training tasks whose CRPO run is complete", "1"),
    "distill_kl": Var((), "mean over tasks of E_nu_j KL(pi_j || meta-policy) after the distillation", "nats"),
}


@dataclass(frozen=True)
class MetaCRPOSettings:
    """Options of Meta-CRPO (schema block `method_meta_crpo`) and the `metatrain` keys it reads."""

    block: ClassVar[str] = "method_meta_crpo"
    sections: ClassVar[tuple[str, ...]] = ("metatrain",)

    crpo_steps: int | None
    iterations: int
    tasks_per_iteration: int
    eval_tasks: int | None


@dataclass(frozen=True)
class SampledMetaCRPOSettings(MetaCRPOSettings):
    distill_states: int
    distill_iters: int


@dataclass
class MetaCRPOState:
    """Progress of the CRPO runs and the distilled meta-policy (checkpointed every record).

    Policies are tabular logits (exact) or policy checkpoint dicts (sampled); `task_data` holds
    what the distillation needs of each finished task: its exact visitation nu_j (exact) or
    its sampled states (sampled)."""

    iteration: int
    init: Any
    current: dict[int, Any] = field(default_factory=dict)   # task j -> its policy after its last step
    task_policies: list[Any] = field(default_factory=list)
    task_data: list[Any] = field(default_factory=list)
    meta: Any = None
    records: list[dict[str, Any]] = field(default_factory=list)


class MetaCRPO(MetaLearner):
    """Steps 1-2 of the module doc; subclasses say how a policy is stored and distilled."""

    name = "meta_crpo"
    operator = "crpo"
    State = MetaCRPOState
    record_vars = RECORD_VARS

    def steps_per_task(self) -> int:
        s = self.settings
        if s.crpo_steps is not None:
            return s.crpo_steps
        return max(1, round(2 * s.iterations * s.tasks_per_iteration / len(self.train_tasks)))

    def iteration(self, state: MetaCRPOState) -> None:
        settings, adapt, n = self.settings, self.adapt, state.iteration
        start, t_sampling = time.perf_counter(), 0.0
        record: dict[str, Any] = {"iteration": n}
        if n == settings.iterations:
            state.meta, record["distill_kl"] = self.distill(state)
            record["time_sampling"], record["time_compute"] = 0.0, time.perf_counter() - start
            state.records.append(record)
            state.iteration = n + 1
            return
        rewards, costs, cost_steps, last = [], [], 0, self.steps_per_task() - 1
        for round_ in self._rounds(n):           # the record's CRPO steps, a round of one group's tasks at a time
            policies = [self.load(state.init if k == 0 else state.current[j]) for j, k in round_]
            on_tasks = [adapt.start(self.train_tasks[j], pi, derived_seed(self.seed, j, 1))
                        for (j, _), pi in zip(round_, policies)]
            observed = adapt.observe_tasks(on_tasks, policies, [derived_seed(self.seed, j, k, 21) for j, k in round_])
            for (j, k), on_task, policy, obs in zip(round_, on_tasks, policies, observed):
                step = adapt.step(on_task, policy, obs)
                t_sampling += obs.time_sampling
                rewards.append(obs.reward)
                costs.append(obs.cost)
                cost_steps += int(step.record["cost_step"])
                if k == last:
                    state.task_policies.append(self.save(step.policy))
                    state.task_data.append(self.visitation(on_task, step.policy, obs, derived_seed(self.seed, j, 22)))
                    state.current.pop(j, None)
                else:
                    state.current[j] = self.save(step.policy)
        p = len(self.scenario.limits(self.train_tasks[0]))
        record.update(n_violating=cost_steps, crpo_steps=len(rewards), tasks_done=len(state.task_policies),
                      batch_reward=float(np.mean(rewards)) if rewards else np.nan,
                      batch_cost=np.max(costs, axis=0) if costs else np.full(p, np.nan))
        record["time_sampling"], record["time_compute"] = t_sampling, time.perf_counter() - start - t_sampling
        state.records.append(record)
        state.iteration = n + 1

    def _rounds(self, n: int) -> list[list[tuple[int, int]]]:
        """Record n's CRPO steps (task j, step k) as rounds: consecutive steps of one group's
        tasks at the same k, observed together. The schedule: groups of `tasks_per_iteration`
        consecutive tasks, each group's steps k = 0..K-1 in lockstep, tasks in order within a
        step; record n holds its steps n T / I .. (n + 1) T / I - 1 (T = N K, I = iterations)."""
        K, N, G = self.steps_per_task(), len(self.train_tasks), self.settings.tasks_per_iteration
        total, iterations = K * N, self.settings.iterations
        rounds: list[list[tuple[int, int]]] = []
        for g in range(n * total // iterations, (n + 1) * total // iterations):
            first = g // (G * K) * G                       # the group's first task
            size = min(G, N - first)
            k, j = divmod(g - first * K, size)
            if j > 0 and rounds and rounds[-1][-1] == (first + j - 1, k):   # the same group and step
                rounds[-1].append((first + j, k))
            else:
                rounds.append([(first + j, k)])
        return rounds

    def policy(self, state: MetaCRPOState) -> Any:
        """The distilled meta-policy (the common initial policy before the last record)."""
        return self.load(state.init if state.meta is None else state.meta)

    # what a kind provides
    def load(self, stored: Any) -> Any:
        raise NotImplementedError

    def save(self, policy: Any) -> Any:
        raise NotImplementedError

    def visitation(self, on_task: Any, policy: Any, observation: Any, seed: int) -> Any:
        raise NotImplementedError

    def distill(self, state: MetaCRPOState) -> tuple[Any, float]:
        raise NotImplementedError


class ExactMetaCRPO(MetaCRPO):
    """Exact CRPO runs and the per-state mixture (module doc, step 2); phi_0 is the uniform policy."""

    kinds = ("exact",)
    Settings = MetaCRPOSettings

    def initial_state(self) -> MetaCRPOState:
        m = self.scenario.distribution.cmdp(self.train_tasks[0])
        return MetaCRPOState(0, np.zeros((m.num_states, m.num_actions)))

    def load(self, stored: np.ndarray) -> TabularSoftmaxPolicy:
        return TabularSoftmaxPolicy(stored)

    def save(self, policy: TabularSoftmaxPolicy) -> np.ndarray:
        return np.log(policy.probs())

    def visitation(self, on_task, policy, observation, seed) -> np.ndarray:
        return evaluate(on_task.cmdp, policy.probs()).nu             # exact nu_j of pi_j

    def distill(self, state: MetaCRPOState) -> tuple[np.ndarray, float]:
        probs = np.exp(np.stack(state.task_policies))                 # [N, S, A]
        nu = np.stack(state.task_data)                                # [N, S]
        mass = nu.sum(0)
        weights = np.where(mass > 0, nu / np.where(mass > 0, mass, 1.0), 1.0 / len(nu))
        mixture = np.einsum("js,jsa->sa", weights, probs)
        log_mix = np.log(mixture)
        kl = np.mean([(n_j * (p_j * (np.log(p_j) - log_mix)).sum(-1)).sum() for n_j, p_j in zip(nu, probs)])
        return log_mix, float(kl)


class SampledMetaCRPO(MetaCRPO):
    """CRPO runs on rollouts and the L-BFGS distillation (module doc, step 2)."""

    kinds = ("sampled",)
    Settings = SampledMetaCRPOSettings

    def initial_state(self) -> MetaCRPOState:
        return MetaCRPOState(0, self.scenario.fresh_policy(self.train_tasks[0], self.seed, "sampled").to_checkpoint())

    def load(self, stored: dict) -> NeuralPolicy:
        return policy_from_checkpoint(stored).to(self.scenario.device)

    def save(self, policy: NeuralPolicy) -> dict:
        return policy.to_checkpoint()

    def visitation(self, on_task, policy, observation, seed) -> torch.Tensor:
        """`distill_states` states of the batch, drawn with probability proportional to gamma^t."""
        batch = observation.data
        weights = batch.visitation()[batch.alive].double().cpu()
        generator = torch.Generator().manual_seed(seed)
        idx = torch.multinomial(weights, self.settings.distill_states, replacement=True, generator=generator)
        return batch.obs[batch.alive][idx.to(batch.obs.device)].detach().cpu()

    def distill(self, state: MetaCRPOState) -> tuple[dict, float]:
        device = self.scenario.device
        policies = [self.load(p) for p in state.task_policies]
        states = [s.to(device) for s in state.task_data]
        with torch.no_grad():
            targets = [pi.distribution(s) for pi, s in zip(policies, states)]
        meta = self.load(state.init)
        meta.load_flat(torch.stack([pi.flat() for pi in policies]).mean(0))
        params = list(meta.parameters())

        def loss() -> torch.Tensor:
            return torch.stack([meta.kl(s, t).mean() for s, t in zip(states, targets)]).mean()

        optimiser = torch.optim.LBFGS(params, lr=1.0, max_iter=self.settings.distill_iters, history_size=20,
                                      tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            value = loss()
            value.backward()
            return value

        optimiser.step(closure)
        with torch.no_grad():
            final = float(loss())
        return meta.to_checkpoint(), final
