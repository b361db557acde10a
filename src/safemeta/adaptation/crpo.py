"""CRPO (Xu, Liang and Lan, ICML 2021) as one adaptation step: Meta-CRPO's within-task learner.

One CRPO iteration from the current policy pi_k on one task:
- estimate J_ci(pi_k) for every constraint i (exact values, or the batch's Monte-Carlo J_c);
- if J_ci <= d_i + eta_i for all i (`tolerance` eta), take one TRPO step that increases the reward;
- otherwise take one TRPO step that decreases J_ci of the most violated constraint (largest
  J_ci - d_i - eta_i; CRPO allows any violated one).
The TRPO step (`optim.trpo_step`): conjugate gradient on the Fisher of pi_k, scaled to the KL
radius `max_kl`, backtracking until the mean KL(pi_k || pi) <= max_kl and the chosen objective
improves (no step otherwise).
- Exact (tabular softmax, logits as parameters): exact objective, its exact gradient, the exact
  Fisher and KL weighted by pi_k's discounted visitation nu.
- Sampled (one batch of pi_k's rollouts): the importance-weighted surrogates
  sum (gamma^t / N) rho (Q_t - b_t) for the reward and -sum (gamma_c^t / N) rho (C_it - b_it) for
  cost i (rho = pi / pi_k, Q and C returns-to-go, b the per-step mean over rollouts), whose
  gradients at pi_k are grad J and -grad J_ci; Fisher and KL on the batch's states, nu-weighted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..optim import fisher_vector_product, flat_grad, mean_kl, softmax_fisher_vector_product, trpo_step
from ..records import Var
from ..tasks.tabular import evaluate_torch
from .base import Observation, Step
from .dual_pgd import as_vector
from .observation import ExactObserver, RolloutObserver


def crpo_branch(cost: np.ndarray, limits: np.ndarray, tolerance: float | list[float]) -> int:
    """-1 (reward step) when every J_ci <= d_i + eta_i, else the most violated constraint i."""
    cost = np.asarray(cost, dtype=np.float64)
    violation = cost - np.asarray(limits, dtype=np.float64) - as_vector(tolerance, cost.shape[0], "tolerance")
    return -1 if (violation <= 0).all() else int(np.argmax(violation))


@dataclass(frozen=True)
class CRPOSettings:
    """Options of the CRPO step (schema block `operator_crpo`), exact and sampled alike."""

    block: ClassVar[str] = "operator_crpo"

    max_kl: float
    tolerance: float | list[float]
    cg_iters: int
    cg_damping: float
    backtrack_steps: int


STEP_VARS = {
    "cost_step": Var((), "the step decreased the most violated cost (CRPO's cost branch)", "1"),
    "step_accepted": Var((), "the TRPO line search accepted the step", "1"),
}


class ExactCRPO(ExactObserver):
    """One CRPO iteration on a tabular CMDP with exact values (module doc)."""

    name = "crpo"
    kinds = ("exact",)
    Settings = CRPOSettings
    step_vars = STEP_VARS

    def step(self, state, policy, observation: Observation) -> Step:
        from ..policies import TabularSoftmaxPolicy

        s, cmdp, ev = self.settings, state.cmdp, observation.data
        i = crpo_branch(ev.Jc, cmdp.d, s.tolerance)
        logits = torch.log_softmax(torch.as_tensor(policy.logits, dtype=torch.float64), dim=-1)
        shape = logits.shape

        def value(flat: torch.Tensor) -> torch.Tensor:   # J, or -J_ci on the cost branch
            out = evaluate_torch(cmdp, torch.softmax(flat.reshape(shape), dim=-1))
            return out.J if i < 0 else -out.Jc[i]

        flat = logits.reshape(-1).clone().requires_grad_(True)
        grad = torch.autograd.grad(value(flat), flat)[0]
        probs = logits.exp().numpy()

        def objective(candidate: torch.Tensor) -> float:
            with torch.no_grad():
                return float(value(candidate))

        res = trpo_step(logits.reshape(-1), grad, softmax_fisher_vector_product(probs, ev.nu), objective,
                        lambda c: mean_kl(probs, ev.nu, c.reshape(shape).numpy()), s.max_kl, cg_iters=s.cg_iters,
                        damping=s.cg_damping, backtrack_steps=s.backtrack_steps)
        new = torch.log_softmax(res.params.reshape(shape), dim=-1)
        kl = float((torch.from_numpy(ev.nu) * (new.exp() * (new - logits)).sum(-1)).sum())   # E_nu KL(new || old)
        return Step(TabularSoftmaxPolicy(new.numpy(), normalized=True), np.full(cmdp.num_constraints, np.nan), kl,
                    {"cost_step": float(i >= 0), "step_accepted": float(res.accepted)}, res)


def surrogate_coefficients(batch, branch: int) -> torch.Tensor:
    """Per-sample weights c_m of the branch's surrogate sum_m c_m rho_m on a batch's alive steps:
    (gamma^t / N)(Q_t - b_t) for the reward (branch -1), -(gamma_c^t / N)(C_it - b_it) for cost i.
    At the behaviour policy, sum_m c_m grad log pi(a_m|s_m) estimates grad J, resp. -grad J_ci."""
    from ..rollout import time_baseline

    alive, n = batch.alive, batch.num_rollouts
    if branch < 0:
        coef = batch.discount[alive] / n * (batch.q_reward - time_baseline(batch.q_reward, alive))[alive]
    else:
        to_go = batch.cost_to_go[..., branch]
        coef = -batch.constraint_discount[alive] / n * (to_go - time_baseline(to_go, alive))[alive]
    return coef.detach()


class SampledCRPO(RolloutObserver):
    """One CRPO iteration from one batch of the policy's rollouts (module doc)."""

    name = "crpo"
    kinds = ("sampled",)
    Settings = CRPOSettings
    step_vars = STEP_VARS

    def step(self, state, policy, observation: Observation) -> Step:
        s, batch = self.settings, observation.data
        i = crpo_branch(observation.cost, state.limits, s.tolerance)
        alive = batch.alive
        obs, actions, old_logp = batch.obs[alive], batch.actions[alive], batch.log_prob[alive]
        coef = surrogate_coefficients(batch, i)

        def surrogate(params):
            return (coef * torch.exp(policy.log_prob(obs, actions, params) - old_logp)).sum()

        nu = batch.visitation()[alive]
        with torch.no_grad():
            reference = policy.distribution(obs)

        def objective(flat: torch.Tensor) -> float:
            with torch.no_grad():
                return float(surrogate(policy.unflatten(flat)))

        def kl(flat: torch.Tensor) -> float:   # E_nu KL(pi_k || pi), TRPO's trust region
            with torch.no_grad():
                return float((nu * policy.kl(obs, reference, policy.unflatten(flat))).sum())

        grad = flat_grad(surrogate(None), list(policy.parameters()))
        res = trpo_step(policy.flat(), grad, fisher_vector_product(policy, obs, nu), objective, kl, s.max_kl,
                        cg_iters=s.cg_iters, damping=s.cg_damping, backtrack_steps=s.backtrack_steps)
        adapted = type(policy).from_checkpoint(policy.to_checkpoint()).to(obs.device)
        adapted.load_flat(res.params)
        with torch.no_grad():
            new_kl = float((nu * policy.kl(obs, adapted.distribution(obs))).sum())   # E_nu KL(new || old)
        return Step(adapted, np.full(len(state.limits), np.nan), new_kl,
                    {"cost_step": float(i >= 0), "step_accepted": float(res.accepted)}, res)
