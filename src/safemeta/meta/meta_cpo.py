"""Meta-CPO (Cho & Sun, AAAI 2024): MAML-style meta-training through one CPO step per task.

Per task tau, the adapted policy is one CPO step from the meta-policy, theta'_tau = T_tau(phi)
(operator `cpo`, Achiam et al. 2017: the linearised problem max g.x s.t. c + b.x <= 0,
1/2 x'Fx <= max_kl in closed form through its dual, the recovery step when it is infeasible).
The meta-objective is the mean of J_tau(T_tau(phi)) over a batch of training tasks and the
meta-constraint the mean of J_c,tau(T_tau(phi)) - d_tau <= 0 (the adapted policies' costs, as
the method's "constrained bilevel problem" puts it, the paper's section 1). Per iteration:

1. for each task of the batch: roll out pi_phi, take the CPO step T_tau(phi) in the autograd
   graph of phi, roll out the adapted policy (the tasks' rollouts of pi_phi, then of the adapted
   policies, are collected together: `observe_tasks`), and differentiate its reward and cost surrogates
   through T_tau: the second-order meta-gradient g_tau = (dT_tau/dphi)^T grad J_tau(theta'_tau)
   and the meta-cost gradient b_tau likewise (reverse mode through the closed form of the
   dual; F^-1 by the implicit function theorem, see `adaptation/cpo.py`). The branch of the
   closed form and the inner line search's fraction are constants of the graph (the active
   KKT piece is differentiated, which is also what the official code's cvxpylayers returns);
2. the outer step is a CPO step on (mean g_tau, mean b_tau, c = mean J_c,tau(theta'_tau) - d_tau)
   with the meta-policy's Fisher on the batch's states and the KL radius `metatrain.max_kl`,
   backtracked (ratio 0.5, `metatrain.backtrack_steps` trials, as the paper's method) until the
   mean KL holds, the meta-constraint holds (or does not worsen when violated), and, when it
   holds, the meta-objective improves. The objective and constraint of a trial are those of
   the re-adapted policies: T_tau(phi_trial) on the same data (importance-weighted surrogates,
   as MAML-TRPO re-adapts in its line search; exact values on tabular scenarios).

Where the official code (Mgineer117/Meta-CPO, reference/baselines.md section 4) departs from
its paper, we follow the paper: the trust region is the Fisher norm of CPO, not a Euclidean
ball on unit-normalised gradients; the per-parameter backward loop with its diagonal "correction"
(one backward pass per parameter) is replaced by the exact reverse-mode derivative; every task
adapts from phi (the official `local_policy` aliases the meta-policy); the inner step uses the
task's fresh rollouts; the outer step is a line-searched CPO step (official: a Euclidean
projection on the cost half-space and a fixed step 0.1, no line search); one inner step
(official: local_num = 3), so that, like the paper's method, a task costs two batches per
iteration (on pi_phi and on the adapted policy). The meta-test is the operator `cpo` from the
meta-policy.

`fisher_derivative` keeps the derivative of the Fisher F(phi) in dT/dphi (on sampled scenarios a
third-order term; False treats F as locally constant, as reference/baselines.md 4.6 suggests).
On tabular scenarios every quantity is exact (exact J, advantages, visitation and a dense
Fisher), and the meta-gradient is the derivative of J_tau(T_tau(phi)) (tested against finite
differences). All draws derive from (seed, iteration, task), so a resumed run continues bit for bit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..adaptation.cpo import (RECOVERY, BatchSurrogates, CPOStep, cpo_direction, exact_cpo_step, line_search,
                              pinv_solve, sampled_cpo_step, softmax_fisher)
from ..optim import conjugate_gradient, fisher_vector_product
from ..policies import NeuralPolicy, TabularSoftmaxPolicy, policy_from_checkpoint
from ..records import Var
from ..rollout import derived_seed
from ..tasks.tabular import TabularCMDP, evaluate, evaluate_torch
from .base import (BATCH_VARS, N_VIOLATING, TRPO_STEP_VARS, NeuralMetaLearner, NeuralMetaState, TabularMetaLearner,
                   TabularMetaState, batch_record, evaluate_one_step, training_batch)

OUTER_BACKTRACK_RATIO = 0.5   # the meta-step's line search shrinks as the paper's method's TRPO step (optim.trpo_step)

OUTER_VARS: dict[str, Var] = {
    "outer_case": Var((), "case of the outer CPO step: 0 recovery, 1 nu* = 0, 2 nu* > 0", "1"),
    "meta_constraint": Var((), "mean over the batch of J_c(adapted) - d: the meta-constraint's c", "cost"),
}


@dataclass
class MetaGradient:
    """One task's adapted reward and cost and their gradients in phi through the inner CPO step."""

    value: float                # J_tau(T_tau(phi))
    cost: float                 # J_c,tau(T_tau(phi)) - d_tau
    grad: np.ndarray            # d value / d phi
    cost_grad: np.ndarray       # d cost / d phi
    inner: CPOStep


# --------------------------------------------------------------------------- exact (tabular)
def adapted_values(cmdp: TabularCMDP, phi: torch.Tensor, operator: Any, fisher_derivative: bool = True):
    """(J_tau, J_c,tau - d_tau) of the CPO-adapted policy T_tau(phi), in the graph of phi if it requires grad."""
    inner = exact_cpo_step(cmdp, phi, operator, fisher_derivative=fisher_derivative)
    ev = evaluate_torch(cmdp, torch.softmax(inner.params, dim=-1))
    return ev.J, ev.Jc[0] - float(cmdp.d[0]), inner


def meta_gradient(cmdp: TabularCMDP, logits: np.ndarray, operator: Any, fisher_derivative: bool = True) -> MetaGradient:
    """Exact gradients of J_tau(T_tau(phi)) and J_c,tau(T_tau(phi)) in the logits phi (reverse mode)."""
    phi = torch.tensor(np.asarray(logits, dtype=np.float64), requires_grad=True)
    J, Jc, inner = adapted_values(cmdp, phi, operator, fisher_derivative)
    grad = torch.autograd.grad(J, phi, retain_graph=True)[0]
    cost_grad = torch.autograd.grad(Jc, phi)[0]
    return MetaGradient(float(J.detach()), float(Jc.detach()), grad.numpy(), cost_grad.numpy(), inner)


@dataclass(frozen=True)
class ExactMetaCPOSettings:
    """Options of exact Meta-CPO: `methods.NAME.fisher_derivative` and the `metatrain` keys it reads."""

    block: ClassVar[str] = "method_meta_cpo"
    sections: ClassVar[tuple[str, ...]] = ("metatrain",)

    fisher_derivative: bool
    iterations: int
    tasks_per_iteration: int
    max_kl: float
    backtrack_steps: int
    eval_tasks: int | None


class ExactMetaCPO(TabularMetaLearner):
    """Meta-CPO on tabular CMDPs with exact values (module docstring); records as the exact
    paper's method: evaluation of every iteration's meta-policy, then the step's statistics."""

    name = "meta_cpo"
    kinds = ("exact",)
    operator = "cpo"
    Settings = ExactMetaCPOSettings
    record_vars = {"n_violating": N_VIOLATING, **TRPO_STEP_VARS, **OUTER_VARS}

    def iteration(self, state: TabularMetaState) -> None:
        settings, inner_settings, fd = self.settings, self.adapt.settings, self.settings.fisher_derivative
        n, logits = state.iteration, state.logits
        t0 = time.perf_counter()
        evaluation, _ = evaluate_one_step(self.adapt, self.evaluation, TabularSoftmaxPolicy(logits), lambda j, k: 0)
        record: dict[str, Any] = {"iteration": n, **evaluation}
        if n == settings.iterations:
            record["time_compute"] = time.perf_counter() - t0
            state.records.append(record)
            state.iteration = n + 1
            return
        batch = [self.train_cmdps[k] for k in training_batch(self.seed, n, settings.tasks_per_iteration,
                                                             len(self.train_cmdps))]
        probs = torch.softmax(torch.from_numpy(logits), dim=-1)
        tasks = [meta_gradient(m, logits, inner_settings, fd) for m in batch]                          # step 1
        g = torch.from_numpy(np.mean([t.grad for t in tasks], axis=0).reshape(-1))
        b = torch.from_numpy(np.mean([t.cost_grad for t in tasks], axis=0).reshape(-1))
        c = float(np.mean([t.cost for t in tasks]))
        weights = torch.from_numpy(np.mean([evaluate(m, probs.numpy()).nu for m in batch], axis=0))
        solve = pinv_solve(softmax_fisher(probs, weights))                                              # step 2
        x_g, x_b = solve(g), solve(b)
        direction = cpo_direction(g, b, c, x_g, x_b, settings.max_kl)
        base = float(np.mean([t.value for t in tasks]))
        log_pi = torch.log_softmax(torch.from_numpy(logits), dim=-1)

        def trial(x: torch.Tensor) -> tuple[float, float, float]:
            new = torch.from_numpy(logits) + x.reshape(logits.shape)
            log_new = torch.log_softmax(new, dim=-1)
            kl = float((weights * (probs * (log_pi - log_new)).sum(-1)).sum())
            if kl > settings.max_kl:        # rejected whatever the values: skip the re-adaptations
                return kl, math.nan, math.nan
            values = [adapted_values(m, new, inner_settings)[:2] for m in batch]
            return kl, float(np.mean([float(v) for v, _ in values])) - base, float(np.mean([float(v) for _, v in values]))

        fraction, kl, gain, _ = line_search(direction.x, c, 0.0, trial, settings.max_kl, settings.backtrack_steps,
                                            OUTER_BACKTRACK_RATIO)
        record.update(n_violating=sum(t.inner.direction.case == RECOVERY for t in tasks), step_accepted=fraction > 0,
                      step_kl=kl, step_improvement=gain, grad_norm=float(g.norm()), outer_case=direction.case,
                      meta_constraint=c, time_compute=time.perf_counter() - t0)
        state.records.append(record)
        state.iteration = n + 1
        state.logits = (torch.from_numpy(logits) + fraction * direction.x.reshape(logits.shape)).numpy().copy()


# --------------------------------------------------------------------------- sampled
@dataclass(frozen=True)
class SampledMetaCPOSettings:
    """Options of sampled Meta-CPO: `methods.NAME.fisher_derivative` and the `metatrain` keys it reads."""

    block: ClassVar[str] = "method_meta_cpo"
    sections: ClassVar[tuple[str, ...]] = ("metatrain",)

    fisher_derivative: bool
    iterations: int
    tasks_per_iteration: int
    max_kl: float
    cg_iters: int
    cg_damping: float
    backtrack_steps: int
    eval_every: int
    eval_tasks: int | None


@dataclass
class _Task:
    """What the outer step needs of one training task: its two batches' surrogates and gradients."""

    inner: BatchSurrogates      # of pi_phi's batch: T_tau(phi') re-adapts on it
    outer: BatchSurrogates      # of the adapted policy's batch: J and J_c of T_tau(phi') by importance weights
    step: CPOStep
    grad: torch.Tensor
    cost_grad: torch.Tensor


def sampled_meta_gradient(meta: NeuralPolicy, inner: BatchSurrogates, adapted_batch, limit: float, step: CPOStep,
                          theta: torch.Tensor) -> _Task:
    """g_tau and b_tau: the adapted batch's reward and cost surrogates differentiated through the inner
    CPO step `step` (taken in the graph of `theta`, the meta-policy's flat parameters)."""
    outer = BatchSurrogates(meta, adapted_batch, limit)
    grad = torch.autograd.grad(outer.reward(step.params), theta, retain_graph=True)[0]
    cost_grad = torch.autograd.grad(outer.cost(step.params), theta)[0]
    return _Task(inner, outer, step, grad.detach(), cost_grad.detach())


class SampledMetaCPO(NeuralMetaLearner):
    """Meta-CPO on sampled scenarios (module docstring); records as the sampled paper's method."""

    name = "meta_cpo"
    kinds = ("sampled",)
    operator = "cpo"
    Settings = SampledMetaCPOSettings
    record_vars = {**BATCH_VARS, "n_violating": N_VIOLATING, **TRPO_STEP_VARS, **OUTER_VARS}

    def iteration(self, state: NeuralMetaState) -> None:
        settings, adapt = self.settings, self.adapt
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

        theta = meta.flat().requires_grad_()
        tasks, limits = [], []
        stats: dict[str, list] = {k: [] for k in ("reward", "cost", "meta_reward", "meta_cost", "u", "kl")}
        _, task_seeds, on_tasks, meta_obs = self.observe_training_tasks(meta, n)                    # step 1
        inners, steps, adapted = [], [], []
        for on_task, obs in zip(on_tasks, meta_obs):
            limits.append(float(on_task.limits[0]))
            inners.append(BatchSurrogates(meta, obs.data, limits[-1]))
            steps.append(sampled_cpo_step(inners[-1], theta, adapt.settings, differentiable=True,
                                          fisher_derivative=settings.fisher_derivative))
            adapted.append(policy_from_checkpoint(state.policy).to(self.scenario.device))
            adapted[-1].load_flat(steps[-1].params.detach())
        adapted_obs = adapt.observe_tasks(on_tasks, adapted, [derived_seed(s, 1) for s in task_seeds])
        for obs, inner, step, limit, adapted_ob in zip(meta_obs, inners, steps, limits, adapted_obs):
            t_sampling += obs.time_sampling + adapted_ob.time_sampling
            tasks.append(sampled_meta_gradient(meta, inner, adapted_ob.data, limit, step, theta))
            stats["meta_reward"].append(obs.reward)
            stats["meta_cost"].append(obs.cost)
            stats["reward"].append(adapted_ob.reward)
            stats["cost"].append(adapted_ob.cost)
            stats["kl"].append(step.kl)
            if step.direction.case != RECOVERY:
                stats["u"].append(np.array([step.direction.nu]))
        fraction, kl, gain, direction, g = self._outer_step(meta, tasks, limits)                      # step 2
        record.update(batch_record(stats), n_violating=sum(t.step.direction.case == RECOVERY for t in tasks),
                      step_accepted=fraction > 0, step_kl=kl, step_improvement=gain, grad_norm=float(g.norm()),
                      outer_case=direction.case,
                      meta_constraint=float(np.mean([t.outer.J_c - lim for t, lim in zip(tasks, limits)])))
        record["time_sampling"], record["time_compute"] = t_sampling, time.perf_counter() - start - t_sampling
        state.records.append(record)
        state.iteration, state.policy = n + 1, meta.to_checkpoint()

    def _outer_step(self, meta: NeuralPolicy, tasks: list[_Task], limits: list[float]):
        """The CPO step on the meta-objective and meta-constraint, backtracked on re-adapted values."""
        settings, inner_settings = self.settings, self.adapt.settings
        g = torch.stack([t.grad for t in tasks]).mean(0)
        b = torch.stack([t.cost_grad for t in tasks]).mean(0)
        c = float(np.mean([t.outer.J_c - lim for t, lim in zip(tasks, limits)]))
        if not (torch.isfinite(g).all() and torch.isfinite(b).all()):
            raise FloatingPointError("meta-CPO: the meta-gradient has non-finite entries")
        obs = torch.cat([t.inner.obs for t in tasks])
        weights = torch.cat([t.inner.nu / len(tasks) for t in tasks])
        fvp = fisher_vector_product(meta, obs, weights)

        def damped(v: torch.Tensor) -> torch.Tensor:
            return fvp(v) + settings.cg_damping * v

        x_g, x_b = (conjugate_gradient(damped, v, settings.cg_iters) for v in (g, b))
        direction = cpo_direction(g, b, c, x_g, x_b, settings.max_kl)
        phi = meta.flat()
        with torch.no_grad():
            reference = meta.distribution(obs)
            base = float(np.mean([float(t.outer.reward(t.step.params.detach())) for t in tasks]))

        def trial(x: torch.Tensor) -> tuple[float, float, float]:
            new = phi + x
            with torch.no_grad():
                kl = float((weights * meta.kl(obs, reference, meta.unflatten(new))).sum())
            if kl > settings.max_kl:        # rejected whatever the values: skip the re-adaptations
                return kl, math.nan, math.nan
            rewards, costs = [], []
            for t, lim in zip(tasks, limits):
                params = sampled_cpo_step(t.inner, new, inner_settings).params
                with torch.no_grad():
                    rewards.append(float(t.outer.reward(params)))
                    costs.append(float(t.outer.cost(params)) - lim)
            return kl, float(np.mean(rewards)) - base, float(np.mean(costs))

        fraction, kl, gain, _ = line_search(direction.x, c, 0.0, trial, settings.max_kl, settings.backtrack_steps,
                                            OUTER_BACKTRACK_RATIO)
        meta.load_flat(phi + fraction * direction.x)
        return fraction, kl, gain, direction, g
