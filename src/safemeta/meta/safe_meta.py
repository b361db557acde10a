"""Alg. 4: safe meta-training on sampled tasks (Gaussian or categorical policies, MC Q values).

Per iteration (lines 1-14):
- draw `tasks_per_iteration` training tasks; on each, roll out the meta-policy pi_phi (line 3)
  and estimate its constrained cost J_c (the tasks' rollouts as one batch, and so the adapted
  policies' of line 6: `observe_tasks`, the same samples as task by task);
- a task within d + delta (line 4; its cost estimate plus the operator's margin of kappa
  standard errors, so the meta-policy is pushed to be safe with the same margin its adaptations
  aim at) is adapted by the sampled A^s (Alg. 3, line 5), the adapted
  policy is rolled out (line 6) and contributes the meta-gradient of line 7,
      (1/N) sum_{n,t} gamma^t [grad f_phi(s_t, a_t) - E_{a~pi^tau}[grad f_phi(s_t, a)]] (Q^tau_t - b_t),
  at the adapted policy's samples, f_phi = log pi_phi. Centring the score (the expectation is
  -grad KL(pi^tau || pi_phi)(s), analytic for our policies) is what Lemma 3 needs for the
  estimate to be unbiased with Q (and lets the per-step baseline b_t reduce variance). As in
  the paper, the eta^-1 grad Qbar term of eq. (6) is dropped (it needs grad_phi Q^{pi_phi} at
  the adapted policy's samples);
- a task that violates (lines 10-11) contributes minus the gradient of its most violated J_c.
- `constrain_adapted` (beyond the paper): a task whose one-step adapted policy (line 6) exceeds
  d + delta by the same margin contributes, in place of its meta-gradient, minus the first-order
  gradient of that policy's J_c in phi, so the meta-policy is kept where one adaptation stays
  safe (problem (2) with the adapted policy's constraint, as Meta-CPO's meta-constraint).
- `meta_gradient: full` adds to line 7 the grad u* term of Prop. 3 (`with_multiplier_term`).
The per-task directions combine as in the exact Alg. 2 (`switch`: "any" makes the step a pure
cost step when any task of the batch violates; "per_task" averages every task's branch), and
one TRPO step (lines 8/12) follows: Fisher and mean KL of the meta-policy on the batch's own
samples, and an importance-weighted surrogate of the combined objective for the line search.

All draws are derived from (seed, iteration, task), so a run resumed from its checkpoint of
iteration n continues bit for bit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..adaptation.base import Step
from ..adaptation.dual_pgd import as_vector
from ..optim import flat_grad
from ..policies import NeuralPolicy, policy_from_checkpoint
from ..registry import OptionError
from ..rollout import Batch, derived_seed, time_baseline
from .base import (BATCH_VARS, N_VIOLATING, TRPO_STEP_VARS, NeuralMetaLearner, NeuralMetaState, batch_record, crpo_switch,
                   trpo_meta_step)


@dataclass(frozen=True)
class SampledMetaTrainSettings:
    """Options of Alg. 4: `methods.NAME.meta_gradient` and the `metatrain` keys it reads."""

    block: ClassVar[str] = "method_safemeta"
    sections: ClassVar[tuple[str, ...]] = ("metatrain",)

    meta_gradient: str
    constrain_adapted: bool
    iterations: int
    tasks_per_iteration: int
    switch: str
    max_kl: float
    cg_iters: int
    cg_damping: float
    fisher_subsample: float
    backtrack_steps: int
    eval_every: int
    eval_tasks: int | None
    kl_limit: float


# --------------------------------------------------------------------------- per-task directions
def _samples(batch: Batch):
    alive = batch.alive
    return batch.obs[alive], batch.actions[alive], batch.log_prob[alive]


def _adapted_surrogate(meta: NeuralPolicy, adapted: NeuralPolicy, adapted_batch: Batch, values: torch.Tensor,
                       weight: torch.Tensor) -> Callable[[dict | None], torch.Tensor]:
    """params -> sum weight [rho_params(a|s) + KL(pi^tau || pi_params)(s)] (values - b)(s, a) on
    the adapted policy's samples, rho = pi_params / pi_phi: at phi, its gradient is the
    first-order (line 7) gradient of the adapted policy's return of `values` w.r.t. phi, with
    the score centred under pi^tau (module doc); its value drives the TRPO line search."""
    obs, actions, _ = _samples(adapted_batch)
    alive = adapted_batch.alive
    adv = (values - time_baseline(values, alive))[alive]
    weight = weight[alive] / adapted_batch.num_rollouts
    with torch.no_grad():
        logp_phi = meta.log_prob(obs, actions)
        tau_dist = adapted.distribution(obs)

    def surrogate(params: dict | None) -> torch.Tensor:
        ratio = torch.exp(meta.log_prob(obs, actions, params) - logp_phi)
        return (weight * (ratio + meta.kl(obs, tau_dist, params)) * adv).sum()

    return surrogate


def meta_gradient_surrogate(meta: NeuralPolicy, adapted: NeuralPolicy, adapted_batch: Batch) -> Callable[[dict | None], torch.Tensor]:
    """Alg. 4 line 7: sum_{n,t} (gamma^t / N) [rho + KL] (Q^tau - b) on the adapted samples."""
    return _adapted_surrogate(meta, adapted, adapted_batch, adapted_batch.q_reward, adapted_batch.discount)


def adapted_cost_surrogate(meta: NeuralPolicy, adapted: NeuralPolicy, adapted_batch: Batch, i: int):
    """The same for J_ci of the adapted policy (constraint_gamma^t weights, cost-to-go)."""
    return _adapted_surrogate(meta, adapted, adapted_batch, adapted_batch.cost_to_go[..., i],
                              adapted_batch.constraint_discount)


def with_multiplier_term(meta: NeuralPolicy, adapted: Step, adapted_batch: Batch,
                         surrogate: Callable[[dict | None], torch.Tensor]) -> Callable[[dict | None], torch.Tensor]:
    """`meta_gradient: full`: line 7 plus the term the paper drops, dJ/du* du*/dphi.

    On the constraints active at u* the adapted step satisfies predicted(u*, phi) = limit, so by
    the implicit function theorem du*_A/dphi = -M_AA^-1 c_A, with M = d predicted / du (the
    step model's `Sensitivity`) and c_i = d predicted_i / dphi taken, as line 7 takes dJ/dphi,
    at first order: the gradient of J_ci(pi^tau) in phi (`adapted_cost_surrogate`). With
    s_j = v' d dtheta / du_j, v the line-7 vector, the term is -(M_AA^-T s_A)' c_A.
    """
    sens = adapted.result.sensitivity
    active = np.flatnonzero(sens.active) if sens is not None else np.array([], dtype=int)
    if active.size == 0:
        return surrogate
    v = flat_grad(surrogate(None), list(meta.parameters()))
    s = np.array([float(v @ sens.dtheta_du[j]) for j in active])
    w = np.linalg.solve(sens.dpred_du[np.ix_(active, active)].T, s)
    costs = [adapted_cost_surrogate(meta, adapted.policy, adapted_batch, int(j)) for j in active]
    return lambda params: surrogate(params) - sum(float(wk) * c(params) for wk, c in zip(w, costs))


def cost_surrogate(meta: NeuralPolicy, batch: Batch, i: int) -> Callable[[dict | None], torch.Tensor]:
    """params -> -sum (constraint_gamma^t / N) rho_params (C_t - b_t): minus the importance-weighted
    surrogate of J_ci (Alg. 4 line 11); its gradient at phi is -grad J_ci."""
    obs, actions, logp_phi = _samples(batch)
    alive = batch.alive
    weight = batch.constraint_discount[alive] / batch.num_rollouts
    adv = (batch.cost_to_go[..., i] - time_baseline(batch.cost_to_go[..., i], alive))[alive]

    def surrogate(params: dict | None) -> torch.Tensor:
        return -(weight * torch.exp(meta.log_prob(obs, actions, params) - logp_phi) * adv).sum()

    return surrogate


# --------------------------------------------------------------------------- Alg. 4
class SampledSafeMeta(NeuralMetaLearner):
    """Alg. 4 (module docstring); the adaptations are the sampled A^s operator's steps.

    Records as the exact version; the evaluation variables are NaN between evaluations
    (`eval_every`), and `batch_*` describe the iteration's training tasks.
    """

    name = "safemeta"
    kinds = ("sampled",)
    operator = "dual_pgd"
    Settings = SampledMetaTrainSettings
    record_vars = {**BATCH_VARS, "n_violating": N_VIOLATING, **TRPO_STEP_VARS}

    @classmethod
    def check_options(cls, settings: SampledMetaTrainSettings, given: frozenset[str] = frozenset()) -> None:
        if settings.meta_gradient not in ("first_order", "full"):
            raise OptionError("meta_gradient", f"meta_gradient {settings.meta_gradient!r} is not available on sampled "
                              f"scenarios (available: first_order, Alg. 4 line 7; full, with the grad u* term)")

    def iteration(self, state: NeuralMetaState) -> None:
        settings, adapt, seed = self.settings, self.adapt, self.seed
        meta = policy_from_checkpoint(state.policy).to(self.scenario.device)
        n = state.iteration
        record: dict[str, Any] = {"iteration": n}
        t_sampling = 0.0
        start = time.perf_counter()
        t_sampling += self.evaluate_if_due(meta, n, record)
        if n == settings.iterations:
            record["time_sampling"], record["time_compute"] = t_sampling, time.perf_counter() - start - t_sampling
            state.records.append(record)
            state.iteration = n + 1
            return

        batch_ids, task_seeds, on_tasks, meta_obs = self.observe_training_tasks(meta, n)   # line 3, all tasks at once
        entries: list = [None] * len(batch_ids)   # per task j: (branch, surrogate, meta batch)
        batch_stats: dict[str, list] = {k: [] for k in ("reward", "cost", "meta_reward", "meta_cost", "u", "kl")}
        adapted: dict[int, Any] = {}
        for j, (k, on_task, obs) in enumerate(zip(batch_ids, on_tasks, meta_obs)):
            t_sampling += obs.time_sampling
            batch_stats["meta_reward"].append(obs.reward)
            batch_stats["meta_cost"].append(obs.cost)
            violation = (obs.cost + adapt.settings.kappa * obs.cost_se - on_task.limits
                         - as_vector(adapt.settings.delta, len(obs.cost), "delta"))
            if (violation <= 0).all():                                                     # line 4
                adapted[j] = adapt.step(on_task, meta, obs)                                    # line 5
                _check(n, "adaptation KL", adapted[j].kl, settings.kl_limit, k)
            else:                                                                          # lines 10-11
                entries[j] = ("cost", cost_surrogate(meta, obs.data, int(np.argmax(violation))), obs.data)
        adapted_obs = adapt.observe_tasks([on_tasks[j] for j in adapted], [a.policy for a in adapted.values()],
                                          [derived_seed(task_seeds[j], 1) for j in adapted])   # line 6
        for (j, step), obs in zip(adapted.items(), adapted_obs):
            t_sampling += obs.time_sampling
            overshoot = (obs.cost + adapt.settings.kappa * obs.cost_se - on_tasks[j].limits
                         - as_vector(adapt.settings.delta, len(obs.cost), "delta"))
            if settings.constrain_adapted and (overshoot > 0).any():   # lower J_c(A^s(pi_phi)) instead
                lowers = adapted_cost_surrogate(meta, step.policy, obs.data, int(np.argmax(overshoot)))
                entries[j] = ("cost", lambda prm, f=lowers: -f(prm), meta_obs[j].data)
            else:
                surrogate = meta_gradient_surrogate(meta, step.policy, obs.data)
                if settings.meta_gradient == "full":
                    surrogate = with_multiplier_term(meta, step, obs.data, surrogate)
                entries[j] = ("meta", surrogate, meta_obs[j].data)
            batch_stats["reward"].append(obs.reward)
            batch_stats["cost"].append(obs.cost)
            batch_stats["u"].append(step.u)
            batch_stats["kl"].append(step.kl)
        n_violating = sum(e[0] == "cost" for e in entries)
        entries = [entries[j] for j in crpo_switch([e[0] for e in entries], settings.switch)]
        step, grad_norm = trpo_meta_step(meta, entries, settings, n, fisher_subsample=settings.fisher_subsample,
                                         seed=derived_seed(seed, n, 9))
        record.update(batch_record(batch_stats), n_violating=n_violating, step_accepted=step.accepted,
                      step_kl=step.kl, step_improvement=step.improvement, grad_norm=grad_norm)
        record["time_sampling"], record["time_compute"] = t_sampling, time.perf_counter() - start - t_sampling
        state.records.append(record)
        state.iteration, state.policy = n + 1, meta.to_checkpoint()


def _check(n: int, name: str, value: float, limit: float, task: int) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"meta-training iteration {n}: {name} is {value} on training task {task}")
    if value > limit:
        raise FloatingPointError(f"meta-training iteration {n}: {name} {value:.3g} exceeds kl_limit {limit:g} "
                                 f"on training task {task} (raise lam / lam_c or lower the step)")

