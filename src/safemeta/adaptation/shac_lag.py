"""SHAC-Lag: the Lagrangian baseline of CGPO's Table 1 (Dai et al. 2024, App. F.1, eqs. 76-78, 81-82).

The same gradients as CGPO (GBE through the dynamics in SHAC windows with time-conditioned
critics, `gbe.py`), but the sub-problem max_delta g.delta s.t. c + q.delta <= 0 (eq. 76, no
trust region) is solved by primal-dual iteration on L(delta, lambda) = -g.delta + lambda (c + q.delta)
(eqs. 77-78), one iteration per operator step:

    theta_{k+1} = theta_k + Adam(g - lambda_k q)          (ascent on J_R - lambda J_C)
    lambda_{k+1} = max(0, lambda_k + lambda_lr (J_C(theta_k) - b))

Adam (as SHAC's actor) keeps its moments in the operator's per-task state; lambda starts at
`lambda_init`. actor_lr and lambda_lr are not in the paper (the safety-brax prototype's
shac_lag.yml uses a multiplier learning rate of 0.003).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..records import Var
from ..rollout import derived_seed
from .base import AdaptationOperator, Observation, Step
from .cgpo import moved_policy, mean_kl
from .gbe import Critics, CriticSettings, estimate


@dataclass(frozen=True)
class ShacLagSettings:
    """Options of SHAC-Lag (schema block `operator_shac_lag`)."""

    block: ClassVar[str] = "operator_shac_lag"

    window: int
    actor_lr: float
    lambda_lr: float
    lambda_init: float
    critic_hidden: list[int]
    critic_lr: float
    critic_batch: int
    critic_updates: int
    td_lambda: float

    def critics(self) -> CriticSettings:
        return CriticSettings(tuple(self.critic_hidden), self.critic_lr, self.critic_batch, self.critic_updates,
                              self.td_lambda)


class ShacLag(AdaptationOperator):
    """One primal-dual iteration of SHAC-Lag on a task with differentiable dynamics."""

    name = "shac_lag"
    kinds = ("differentiable",)
    Settings = ShacLagSettings
    step_vars = {"predicted_cost": Var(("constraint",), "J_C of pi_[k] predicted at the step, J_C + q.delta "
                                                        "(realised: cost)", "cost")}
    ADAM = (0.9, 0.999, 1e-8)   # Adam's beta1, beta2, epsilon (torch's defaults)

    def start(self, task, policy, seed: int):
        state = super().start(task, policy, seed)
        if state.limits.shape != (1,):
            raise ValueError(f"shac_lag handles one constraint; task {task.params} has {state.limits.shape[0]}")
        probe = self.scenario.distribution.make_env(task, 1, derived_seed(seed, 0), "cpu")
        theta = policy.flat()
        state.critics = Critics(probe.observation_space.shape[0], probe.horizon, self.settings.critics(),
                                derived_seed(seed, 1), self.scenario.device, theta.dtype)
        state.seed, state.iteration = seed, 0
        state.multiplier = float(self.settings.lambda_init)
        state.moment1, state.moment2 = torch.zeros_like(theta), torch.zeros_like(theta)
        return state

    def observe(self, state, policy, seed: int) -> Observation:
        start = time.perf_counter()
        env = self.scenario.distribution.make_env(state.task, self.scenario.sampling.rollouts, derived_seed(seed, 0),
                                                  self.scenario.device)
        est = estimate(env, policy, state.critics, self.settings.window, torch.Generator().manual_seed(derived_seed(seed, 1)))
        return Observation(est.reward, np.array([est.cost]), np.array([est.cost_se]), time.perf_counter() - start,
                           est.env_steps, est)

    def step(self, state, policy, observation: Observation) -> Step:
        est, s = observation.data, self.settings
        used = state.multiplier
        ascent = est.g - used * est.q                              # grad of J_R - lambda J_C
        beta1, beta2, eps = self.ADAM
        state.iteration += 1
        state.moment1 = beta1 * state.moment1 + (1 - beta1) * ascent
        state.moment2 = beta2 * state.moment2 + (1 - beta2) * ascent ** 2
        m_hat = state.moment1 / (1 - beta1 ** state.iteration)
        v_hat = state.moment2 / (1 - beta2 ** state.iteration)
        delta = (s.actor_lr * m_hat / (v_hat.sqrt() + eps)).double().cpu().numpy()
        limit = float(state.limits[0])
        state.multiplier = max(0.0, used + s.lambda_lr * (est.cost - limit))   # dual ascent (eq. 78)
        new = moved_policy(policy, delta)
        state.critics.fit(est.windows, torch.Generator().manual_seed(derived_seed(state.seed, 2, state.iteration)))
        q = est.q.double().cpu().numpy()
        return Step(new, np.array([used]), mean_kl(policy, new, est.states),
                    {"predicted_cost": [est.cost + float(q @ delta)]})

    def return_kind(self) -> str:
        return (f"mean undiscounted episode return over {self.scenario.sampling.rollouts} reparameterised rollouts "
                f"(the GBE rollout); cost is the mean undiscounted episode cost J_C")
