"""MAML's inner step with a constraint penalty: the paper's baseline (a) (section 6, Finn et al. 2017).

The paper adds "a weighted penalty term for constraint violation to the loss function of the
MAML" and gives neither its form nor its weight. We take the hinge (the literal reading of
"violation"; `penalty_form: hinge`),

    L_w(pi) = J(pi) - sum_i w_i max(0, J_ci(pi) - d_i),

whose gradient is grad J - sum_i w_i 1[J_ci > d_i] grad J_ci, and offer the fixed Lagrangian
(`linear`: J - sum_i w_i J_ci, i.e. policy gradient on r - w.c; it ignores d). One step is
vanilla policy-gradient ascent with a fixed step size alpha (`inner_lr`), MAML's inner update

    theta' = theta + alpha grad_theta L_w(pi_theta).

Exact (tabular softmax, theta the logits): grad L_w is the exact policy gradient of the linear
solves in `tasks.tabular.evaluate_torch`; `exact_inner_step` is differentiable in theta, so a
meta-learner gets the second-order MAML gradient through it.

Sampled (one batch of pi_theta's rollouts): grad J ~ (1/N) sum_{n,t} gamma^t grad log pi (Q_t - b_t),
grad J_ci ~ (1/N) sum_{n,t} gamma_c^t grad log pi (C_it - b_it), with Q the discounted and C the
constrained (constraint_gamma) returns-to-go and b the per-step mean over rollouts (an
action-independent baseline); the indicator uses the batch's Monte-Carlo J_ci. Per sample the
direction is (gamma^t / N) Abar_t grad log pi with the penalised advantage
Abar_t = (Q_t - b_t) - sum_i w_i 1[J_ci > d_i] (gamma_c / gamma)^t (C_it - b_it). With
`normalize_advantages` it is divided by sum_{n,t} gamma^t / N and by the nu-weighted standard
deviation of Abar (both detached), so alpha is a step in units of E_nu[grad log pi Abar / std(Abar)]:
pytorch-maml-rl's normalisation of the (here penalised) advantage, which keeps the step's size
comparable across scenarios whose rewards and costs have different scales (point_circle: episode
reward about 1, cost about 50), while w keeps its meaning in return units.
The inner step treats the data as fixed: `inner_step` differentiates the surrogate
sum coef * log pi_params (torch.func.grad over functional_call), as MAML-TRPO does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..tasks.tabular import TabularCMDP, evaluate_torch
from .base import Observation, Step
from .dual_pgd import as_vector
from .observation import ExactObserver, RolloutObserver

if TYPE_CHECKING:
    from ..policies import NeuralPolicy
    from ..rollout import Batch

PENALTY_FORMS = ("hinge", "linear")


def penalty_weights(cost: np.ndarray, limits: np.ndarray, penalty: float | list[float], form: str) -> np.ndarray:
    """The weight of grad J_ci in the step [p]: w_i 1[J_ci > d_i] (hinge) or w_i (linear)."""
    cost, limits = np.asarray(cost, dtype=np.float64), np.asarray(limits, dtype=np.float64)
    w = as_vector(penalty, cost.shape[0], "penalty")
    return w * (cost > limits) if form == "hinge" else w


def penalised(J: torch.Tensor, Jc: torch.Tensor, limits: np.ndarray, penalty: np.ndarray, form: str) -> torch.Tensor:
    """L_w = J - sum_i w_i max(0, J_ci - d_i) (hinge) or J - sum_i w_i J_ci (linear)."""
    w = torch.as_tensor(penalty, dtype=Jc.dtype)
    if form == "hinge":
        return J - (w * torch.relu(Jc - torch.as_tensor(limits, dtype=Jc.dtype))).sum()
    return J - (w * Jc).sum()


# --------------------------------------------------------------------------- exact (tabular)
def exact_penalised(cmdp: TabularCMDP, logits: torch.Tensor, penalty: float | list[float], form: str) -> torch.Tensor:
    """L_w(softmax(logits)) exactly (differentiable in the logits [S, A])."""
    ev = evaluate_torch(cmdp, torch.softmax(logits, dim=-1))
    return penalised(ev.J, ev.Jc, cmdp.d, as_vector(penalty, cmdp.num_constraints, "penalty"), form)


def exact_inner_step(cmdp: TabularCMDP, logits: torch.Tensor, settings) -> torch.Tensor:
    """theta' = theta + alpha grad_theta L_w(softmax(theta)) with the exact gradient.

    When `logits` require grad, theta' is a differentiable function of them (torch.func.grad
    keeps the graph): the second-order MAML meta-gradient flows through this step.
    """
    grad = torch.func.grad(lambda th: exact_penalised(cmdp, th, settings.penalty, settings.penalty_form))(logits)
    return logits + settings.inner_lr * grad


# --------------------------------------------------------------------------- sampled
@dataclass
class PGData:
    """One batch as a penalised policy-gradient surrogate uses it (every tensor detached).

    surrogate(params) = sum_m coef_m log pi_params(a_m|s_m) has, at the behaviour policy, the
    gradient scale * (grad J - sum_i weights_i grad J_ci) (module doc).
    """

    obs: torch.Tensor
    actions: torch.Tensor
    behaviour_log_prob: torch.Tensor
    coef: torch.Tensor
    weights: np.ndarray       # [p] effective penalty weights (w_i 1[J_ci > d_i] for the hinge)
    cost: np.ndarray          # [p] the batch's Monte-Carlo J_c
    scale: float              # 1, or the normalisation of `normalize_advantages`


def pg_data(batch: "Batch", limits: np.ndarray, penalty: float | list[float], form: str, normalize: bool) -> PGData:
    """The per-sample coefficients of the penalised policy gradient on one batch (module doc)."""
    from ..rollout import time_baseline

    alive, n = batch.alive, batch.num_rollouts
    adv = (batch.q_reward - time_baseline(batch.q_reward, alive))[alive]
    con = (batch.cost_to_go - time_baseline(batch.cost_to_go, alive))[alive]             # [M, p]
    cost = batch.constraint_value.detach().double().cpu().numpy()
    weights = penalty_weights(cost, limits, penalty, form)
    coef_r = batch.discount[alive] / n * adv
    coef_c = batch.constraint_discount[alive] / n * (con * torch.as_tensor(weights, dtype=con.dtype,
                                                                           device=con.device)).sum(-1)
    coef = coef_r - coef_c
    scale = 1.0
    if normalize:   # coef = (gamma^t / N) * Abar, Abar the penalised advantage: E_nu[grad log pi Abar] / std_nu(Abar)
        nu = batch.visitation()[alive]
        horizon = float(batch.discount.sum()) / n
        penalised_adv = coef / (batch.discount[alive] / n)
        std = float(torch.sqrt((nu * (penalised_adv - (nu * penalised_adv).sum()) ** 2).sum()))
        scale = 1.0 / (horizon * std) if std > 0 else 1.0 / horizon
    return PGData(batch.obs[alive], batch.actions[alive], batch.log_prob[alive], (scale * coef).detach(),
                  weights, cost, scale)


def surrogate(policy: "NeuralPolicy", data: PGData, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """sum_m coef_m log pi_params(a_m|s_m): its gradient is the step direction of the module doc."""
    return (data.coef * policy.log_prob(data.obs, data.actions, params)).sum()


def inner_step(policy: "NeuralPolicy", data: PGData, inner_lr: float,
               params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """theta' = theta + alpha grad_theta surrogate(theta), parameters as a dict.

    torch.func.grad over functional_call: with `params` requiring grad, theta' is differentiable
    in them (the second-order MAML meta-gradient); with detached ones it is the plain step.
    """
    grad = torch.func.grad(lambda p: surrogate(policy, data, p))(params)
    return {name: value + inner_lr * grad[name] for name, value in params.items()}


# --------------------------------------------------------------------------- the operators
@dataclass(frozen=True)
class ExactPGPenaltySettings:
    """Options of the exact step (schema block `operator_pg_penalty`)."""

    block: ClassVar[str] = "operator_pg_penalty"

    inner_lr: float
    penalty: float | list[float]
    penalty_form: str


@dataclass(frozen=True)
class SampledPGPenaltySettings:
    """Options of the sampled step (schema block `operator_pg_penalty`)."""

    block: ClassVar[str] = "operator_pg_penalty"

    inner_lr: float
    penalty: float | list[float]
    penalty_form: str
    normalize_advantages: bool


class ExactPGPenalty(ExactObserver):
    """One exact penalised policy-gradient step on a tabular CMDP (`exact_inner_step`)."""

    name = "pg_penalty"
    kinds = ("exact",)
    Settings = ExactPGPenaltySettings

    def step(self, state, policy, observation: Observation) -> Step:
        from ..policies import TabularSoftmaxPolicy

        ev = observation.data
        with torch.no_grad():
            old = torch.log_softmax(torch.as_tensor(policy.logits, dtype=torch.float64), dim=-1)
        new = torch.log_softmax(exact_inner_step(state.cmdp, old, self.settings).detach(), dim=-1)
        kl = float((torch.from_numpy(ev.nu) * (new.exp() * (new - old)).sum(-1)).sum())   # E_nu KL(new || old)
        weights = penalty_weights(ev.Jc, state.cmdp.d, self.settings.penalty, self.settings.penalty_form)
        return Step(TabularSoftmaxPolicy(new.numpy(), normalized=True), weights, kl)


class SampledPGPenalty(RolloutObserver):
    """One penalised policy-gradient step from one batch of the policy's rollouts (`inner_step`)."""

    name = "pg_penalty"
    kinds = ("sampled",)
    Settings = SampledPGPenaltySettings

    def step(self, state, policy, observation: Observation) -> Step:
        s = self.settings
        data = pg_data(observation.data, state.limits, s.penalty, s.penalty_form, s.normalize_advantages)
        params = {name: p.detach() for name, p in policy.named_params().items()}
        new = inner_step(policy, data, s.inner_lr, params)
        adapted = type(policy).from_checkpoint(policy.to_checkpoint()).to(data.obs.device)
        adapted.load_flat(torch.cat([v.reshape(-1) for v in new.values()]))
        nu = observation.data.visitation()[observation.data.alive]
        with torch.no_grad():
            kl = float((nu * policy.kl(data.obs, adapted.distribution(data.obs))).sum())   # E_nu KL(new || old)
        return Step(adapted, data.weights, kl, result=data)
