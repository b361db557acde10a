"""TRPO-Lagrangian: a primal-dual baseline (the TRPO-Lag of CVPO's Sec. 4.2, Ray et al. 2019).

One step from pi_k on the rollouts `observe` collected for it:
1. multiplier (dual gradient ascent on J_c - d): nu_i <- max(0, nu_i + lagrange_lr (J_ci(pi_k) - d_i) / |d_i|)
   with J_ci the batch's constrained cost (|d_i| replaced by 1 when d_i = 0), so lagrange_lr is
   the change of nu per step at a violation of the whole limit; nu starts at 0 on every task
   and is kept over the task's sequence;
2. one TRPO step (`optim.trpo_step`: natural direction, KL radius max_kl, backtracking) on the
   Lagrangian surrogate
       L(theta) = E_nu[rho_theta (A_hat - sum_i nu_i A_hat_ci)] / (1 + sum_i nu_i),
   rho_theta = pi_theta / pi_k, with A the discounted returns-to-go minus a per-step baseline (the
   Q estimates of App. E.1, as A^s uses), each advantage divided by its own standard deviation
   under nu (so nu weighs standardised reward against standardised cost improvement), nu the
   normalised discounted visitation. Dividing by 1 + sum nu keeps the step's scale as nu grows
   (safety-starter-agents' TRPO-Lag does the same).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..records import Var
from .base import AdaptationOperator, Observation, Step


@dataclass(frozen=True)
class TRPOLagrangianSettings:
    """Options (schema block `operator_trpo_lagrangian`)."""

    block: ClassVar[str] = "operator_trpo_lagrangian"

    max_kl: float
    lagrange_lr: float
    cg_iters: int
    cg_damping: float
    backtrack_steps: int


def _standardised(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x / std_w(x) (x unchanged when its spread is 0); w sums to 1."""
    std = torch.sqrt((w * (x - (w * x).sum()) ** 2).sum())
    return x / std if std > 0 else x


class TRPOLagrangian(AdaptationOperator):
    name = "trpo_lagrangian"
    kinds = ("sampled",)
    Settings = TRPOLagrangianSettings
    step_vars = {"accepted": Var((), "the TRPO line search accepted a step", "1")}

    def start(self, task, policy, seed: int):
        state = super().start(task, policy, seed)
        state.nu = np.zeros(len(state.limits))
        return state

    def observe(self, state, policy, seed: int) -> Observation:
        batch = self.scenario.rollout(state.task, policy, seed)
        return Observation(float(batch.episode_reward.mean()), batch.constraint_value.double().cpu().numpy(),
                           batch.constraint_value_se.double().cpu().numpy(), batch.sampling_time,
                           int(batch.alive.sum()), batch)

    def step(self, state, policy, observation: Observation) -> Step:
        from ..optim import fisher_vector_product, flat_grad, trpo_step
        from ..rollout import time_baseline

        s, batch = self.settings, observation.data
        d = state.limits
        scale = np.where(np.abs(d) > 0, np.abs(d), 1.0)
        state.nu = np.maximum(0.0, state.nu + s.lagrange_lr * (observation.cost - d) / scale)    # 1.
        nu = torch.as_tensor(state.nu, dtype=batch.obs.dtype)

        alive = batch.alive
        obs, actions, old_logp = batch.obs[alive], batch.actions[alive], batch.log_prob[alive]
        w = batch.visitation()[alive]
        adv = _standardised((batch.q_reward - time_baseline(batch.q_reward, alive))[alive], w)
        adv_c = (batch.q_cost - time_baseline(batch.q_cost, alive))[alive]
        adv_c = torch.stack([_standardised(adv_c[:, i], w) for i in range(adv_c.shape[1])], dim=1)
        combined = ((adv - adv_c @ nu) / (1.0 + nu.sum())).detach()

        def surrogate(flat=None) -> torch.Tensor:                                                # 2.
            logp = policy.log_prob(obs, actions, None if flat is None else policy.unflatten(flat))
            return (w * torch.exp(logp - old_logp) * combined).sum()

        params = list(policy.parameters())
        grad = flat_grad(surrogate(), params)
        with torch.no_grad():
            reference = policy.distribution(obs)

        def objective(flat) -> float:
            with torch.no_grad():
                return float(surrogate(flat))

        def mean_kl(flat) -> float:
            with torch.no_grad():
                return float((w * policy.kl(obs, reference, policy.unflatten(flat))).sum())

        result = trpo_step(policy.flat(), grad, fisher_vector_product(policy, obs, w), objective, mean_kl, s.max_kl,
                           cg_iters=s.cg_iters, damping=s.cg_damping, backtrack_steps=s.backtrack_steps)
        adapted = type(policy).from_checkpoint(policy.to_checkpoint())
        adapted.load_flat(result.params)
        with torch.no_grad():   # E_nu KL(new || old), the loop's convention
            kl = float((w * policy.kl(obs, adapted.distribution(obs))).sum())
        return Step(adapted, state.nu.copy(), kl, {"accepted": float(result.accepted)})
