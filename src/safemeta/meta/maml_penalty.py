"""MAML with a constraint penalty, the paper's baseline (a) (section 6): second-order MAML
(Finn et al. 2017) on the penalised objective, with a TRPO outer step.

Meta-objective of a task tau: L_w(pi_theta'(phi)) with theta'(phi) = phi + alpha grad L_w(pi_phi)
the inner step of `adaptation/pg_penalty.py` and L_w = J - sum_i w_i max(0, J_ci - d_i) the same
penalised objective (the penalty is in the inner and the outer loss). The meta-policy itself is
not constrained: the penalty is all the baseline does about safety.

Meta-gradient: the true derivative through the inner step,
    d/dphi L_w(theta'(phi)) = (I + alpha Hess_phi L_w(phi)) grad L_w(theta'),
by automatic differentiation through `torch.func.grad` (no first-order approximation; the
Hessian-vector product is what the paper's Hessian-free method avoids).
- Exact (tabular): exact values and gradients (`exact_meta_gradient`).
- Sampled (MAML-TRPO, as pytorch-maml-rl): per task, a batch D on pi_phi gives theta'; a batch
  D' on pi_theta' gives the outer surrogate sum_m coef'_m pi_theta'(phi)(a_m|s_m) / pi_theta'_old(a_m|s_m),
  whose gradient through theta'(phi) estimates the meta-gradient (`maml_objective`). As in
  MAML-TRPO, the dependence of the sampled data on phi (the score terms of DiCE / ProMP) is
  not differentiated, and the hinge's indicators come from the batches' Monte-Carlo J_c.
  The iteration's tasks are observed together (`observe_tasks`: all D, then all D'), the same
  batches as task by task.
Outer step (as Alg. 2/4 take it for the paper's method, without the CRPO switch): the mean
meta-gradient over `tasks_per_iteration` training tasks, one TRPO step with the Fisher of the
meta-policy on the batch's states (exact: visitation-weighted), its mean KL as the trust region
(`max_kl`, App. D.2's delta for the paper's method), and a line search on the meta-objective
re-adapted at each candidate. Every draw derives from (seed, iteration, task), so a resumed run continues bit for bit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..adaptation.dual_pgd import as_vector
from ..adaptation.pg_penalty import PGData, exact_inner_step, inner_step, penalised, pg_data
from ..optim import mean_kl, softmax_fisher_vector_product, trpo_step
from ..policies import NeuralPolicy, TabularSoftmaxPolicy, policy_from_checkpoint
from ..records import Var
from ..rollout import derived_seed
from ..tasks.tabular import TabularCMDP, evaluate, evaluate_torch
from .base import (TRPO_STEP_VARS, NeuralMetaLearner, NeuralMetaState, TabularMetaLearner, TabularMetaState,
                   evaluate_one_step, training_batch, trpo_meta_step)

N_PENALISED = Var((), "training tasks whose adapted policy violated d (hinge active in the outer loss)", "1")
BATCH_VARS: dict[str, Var] = {
    "batch_objective": Var((), "mean penalised objective L_w of the adapted policies on the iteration's training tasks",
                           "return"),
    "batch_reward": Var((), "mean reward of the adapted policies on the iteration's training tasks", "return"),
    "batch_cost": Var(("constraint",), "max cost of the adapted policies on the iteration's training tasks", "cost"),
    "batch_meta_reward": Var((), "mean reward of the meta-policy on the iteration's training tasks", "return"),
    "batch_meta_cost": Var(("constraint",), "max cost of the meta-policy on the iteration's training tasks", "cost"),
    "batch_adapt_kl": Var((), "mean E_nu KL(adapted || meta) of the iteration's inner steps", "nats"),
}


# --------------------------------------------------------------------------- exact (tabular)
@dataclass
class ExactMetaGradient:
    value: float          # L_w(A(pi_phi)) on the task
    grad: np.ndarray      # [S, A] its derivative in phi, through the inner step
    nu: np.ndarray        # [S] visitation of the meta-policy (weights of the Fisher)
    adapted_cost: np.ndarray   # [p] J_c of the adapted policy
    adapted_reward: float


def exact_meta_objective(cmdp: TabularCMDP, phi: torch.Tensor, adaptation) -> tuple[torch.Tensor, Any]:
    """L_w(softmax(theta'(phi))) and the adapted policy's exact evaluation (differentiable in phi)."""
    theta = exact_inner_step(cmdp, phi, adaptation)
    ev = evaluate_torch(cmdp, torch.softmax(theta, dim=-1))
    w = as_vector(adaptation.penalty, cmdp.num_constraints, "penalty")
    return penalised(ev.J, ev.Jc, cmdp.d, w, adaptation.penalty_form), ev


def exact_meta_gradient(cmdp: TabularCMDP, logits: np.ndarray, adaptation) -> ExactMetaGradient:
    """The exact second-order MAML meta-gradient of one task (module doc)."""
    phi = torch.tensor(np.asarray(logits), dtype=torch.float64, requires_grad=True)
    value, ev = exact_meta_objective(cmdp, phi, adaptation)
    grad = torch.autograd.grad(value, phi)[0]
    nu = evaluate(cmdp, torch.softmax(phi.detach(), -1).numpy()).nu
    return ExactMetaGradient(float(value.detach()), grad.numpy(), nu, ev.Jc.detach().numpy(), float(ev.J.detach()))


@dataclass(frozen=True)
class ExactMAMLSettings:
    """Options of exact MAML + penalty: the `metatrain` keys it reads (no own options)."""

    block: ClassVar[str] = "method_maml_penalty"
    sections: ClassVar[tuple[str, ...]] = ("metatrain",)

    iterations: int
    tasks_per_iteration: int
    max_kl: float
    cg_iters: int
    cg_damping: float
    backtrack_steps: int
    eval_tasks: int | None


class ExactMAMLPenalty(TabularMetaLearner):
    """MAML + penalty on tabular CMDPs with exact values (module doc); the meta-policy starts uniform."""

    name = "maml_penalty"
    kinds = ("exact",)
    operator = "pg_penalty"
    Settings = ExactMAMLSettings
    record_vars = {"n_violating": N_PENALISED, **BATCH_VARS, **TRPO_STEP_VARS}

    def iteration(self, state: TabularMetaState) -> None:
        settings, adaptation, n = self.settings, self.adapt.settings, state.iteration
        t0 = time.perf_counter()
        logits = state.logits
        evaluation, _ = evaluate_one_step(self.adapt, self.evaluation, TabularSoftmaxPolicy(logits), lambda j, k: 0)
        record: dict[str, Any] = {"iteration": n, **evaluation}
        if n == settings.iterations:
            record["time_compute"] = time.perf_counter() - t0
            state.records.append(record)
            state.iteration = n + 1
            return
        tasks = [self.train_cmdps[k] for k in training_batch(self.seed, n, settings.tasks_per_iteration, len(self.train_cmdps))]
        grads = [exact_meta_gradient(cmdp, logits, adaptation) for cmdp in tasks]
        grad = np.mean([g.grad for g in grads], axis=0)
        if not np.isfinite(grad).all():
            raise FloatingPointError(f"meta-training iteration {n}: the meta-gradient has non-finite entries")
        probs = np.exp(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
        weights = np.mean([g.nu for g in grads], axis=0)

        def objective(flat: torch.Tensor) -> float:
            with torch.no_grad():
                phi = flat.reshape(logits.shape)
                return float(np.mean([float(exact_meta_objective(cmdp, phi, adaptation)[0]) for cmdp in tasks]))

        step = trpo_step(torch.from_numpy(logits.reshape(-1)), torch.from_numpy(grad.reshape(-1)),
                         softmax_fisher_vector_product(probs, weights), objective,
                         lambda flat: mean_kl(probs, weights, flat.reshape(logits.shape).numpy()),
                         settings.max_kl, cg_iters=settings.cg_iters, damping=settings.cg_damping,
                         backtrack_steps=settings.backtrack_steps)
        meta_evals = [evaluate(cmdp, probs) for cmdp in tasks]
        record.update(
            n_violating=sum(bool((g.adapted_cost > cmdp.d).any()) for g, cmdp in zip(grads, tasks)),
            batch_objective=float(np.mean([g.value for g in grads])),
            batch_reward=float(np.mean([g.adapted_reward for g in grads])),
            batch_cost=np.max([g.adapted_cost for g in grads], axis=0),
            batch_meta_reward=float(np.mean([ev.J for ev in meta_evals])),
            batch_meta_cost=np.max([ev.Jc for ev in meta_evals], axis=0),
            step_accepted=step.accepted, step_kl=step.kl, step_improvement=step.improvement,
            grad_norm=float(np.linalg.norm(grad)), time_compute=time.perf_counter() - t0)
        state.records.append(record)
        state.iteration = n + 1
        state.logits = step.params.reshape(logits.shape).numpy().copy()


# --------------------------------------------------------------------------- sampled (MAML-TRPO)
def maml_objective(meta: NeuralPolicy, inner: PGData, outer: PGData, inner_lr: float) -> Callable[[dict | None], torch.Tensor]:
    """params -> sum_m coef'_m pi_theta'(params)(a_m|s_m) / pi_theta'_old(a_m|s_m) on the outer batch,
    theta'(params) the inner step on the inner batch (differentiable: second order). `None`: the
    meta-policy's own parameters (its gradient is then the MAML meta-gradient)."""

    def objective(params: dict | None) -> torch.Tensor:
        theta = inner_step(meta, inner, inner_lr, meta.named_params() if params is None else params)
        ratio = torch.exp(meta.log_prob(outer.obs, outer.actions, theta) - outer.behaviour_log_prob)
        return (outer.coef * ratio).sum()

    return objective


@dataclass(frozen=True)
class SampledMAMLSettings:
    """Options of sampled MAML + penalty: the `metatrain` keys it reads (no own options)."""

    block: ClassVar[str] = "method_maml_penalty"
    sections: ClassVar[tuple[str, ...]] = ("metatrain",)

    iterations: int
    tasks_per_iteration: int
    max_kl: float
    cg_iters: int
    cg_damping: float
    backtrack_steps: int
    eval_every: int
    eval_tasks: int | None
    kl_limit: float


class SampledMAMLPenalty(NeuralMetaLearner):
    """MAML-TRPO + penalty on sampled scenarios (module doc); two batches per training task."""

    name = "maml_penalty"
    kinds = ("sampled",)
    operator = "pg_penalty"
    Settings = SampledMAMLSettings
    record_vars = {"n_violating": N_PENALISED, **BATCH_VARS, **TRPO_STEP_VARS}

    def iteration(self, state: NeuralMetaState) -> None:
        settings, adapt, n = self.settings, self.adapt, state.iteration
        meta = policy_from_checkpoint(state.policy).to(self.scenario.device)
        record: dict[str, Any] = {"iteration": n}
        t_sampling, start = 0.0, time.perf_counter()
        t_sampling += self.evaluate_if_due(meta, n, record)
        if n == settings.iterations:
            record["time_sampling"], record["time_compute"] = t_sampling, time.perf_counter() - start - t_sampling
            state.records.append(record)
            state.iteration = n + 1
            return

        op = adapt.settings
        entries, stats = [], {k: [] for k in ("objective", "reward", "cost", "meta_reward", "meta_cost", "kl", "active")}
        batch_ids, task_seeds, on_tasks, meta_obs = self.observe_training_tasks(meta, n)   # D on pi_phi, all tasks at once
        steps = []
        for k, on_task, obs in zip(batch_ids, on_tasks, meta_obs):
            steps.append(adapt.step(on_task, meta, obs))                                       # theta'
            _check_kl(n, steps[-1].kl, settings.kl_limit, int(k))
        adapted_obs = adapt.observe_tasks(on_tasks, [step.policy for step in steps],         # D' on pi_theta'
                                          [derived_seed(s, 1) for s in task_seeds])
        for on_task, obs, step, adapted in zip(on_tasks, meta_obs, steps, adapted_obs):
            t_sampling += obs.time_sampling + adapted.time_sampling
            outer = pg_data(adapted.data, on_task.limits, op.penalty, op.penalty_form, normalize=False)
            entries.append(("meta", maml_objective(meta, step.result, outer, op.inner_lr), obs.data))
            w = as_vector(op.penalty, len(on_task.limits), "penalty")
            stats["objective"].append(float(penalised(torch.tensor(adapted.reward), torch.from_numpy(adapted.cost),
                                                      on_task.limits, w, op.penalty_form)))
            stats["reward"].append(adapted.reward)
            stats["cost"].append(adapted.cost)
            stats["meta_reward"].append(obs.reward)
            stats["meta_cost"].append(obs.cost)
            stats["kl"].append(step.kl)
            stats["active"].append(bool((adapted.cost > on_task.limits).any()))
        meta_step, grad_norm = trpo_meta_step(meta, entries, settings, n)
        record.update(n_violating=sum(stats["active"]), batch_objective=float(np.mean(stats["objective"])),
                      batch_reward=float(np.mean(stats["reward"])), batch_cost=np.max(stats["cost"], axis=0),
                      batch_meta_reward=float(np.mean(stats["meta_reward"])),
                      batch_meta_cost=np.max(stats["meta_cost"], axis=0), batch_adapt_kl=float(np.mean(stats["kl"])),
                      step_accepted=meta_step.accepted, step_kl=meta_step.kl, step_improvement=meta_step.improvement,
                      grad_norm=grad_norm)
        record["time_sampling"], record["time_compute"] = t_sampling, time.perf_counter() - start - t_sampling
        state.records.append(record)
        state.iteration, state.policy = n + 1, meta.to_checkpoint()


def _check_kl(n: int, kl: float, limit: float, task: int) -> None:
    if not math.isfinite(kl) or kl > limit:
        raise FloatingPointError(f"meta-training iteration {n}: the inner step's KL {kl:.3g} on training task {task} "
                                 f"is not finite or exceeds kl_limit {limit:g} (lower adaptation.pg_penalty.inner_lr)")
