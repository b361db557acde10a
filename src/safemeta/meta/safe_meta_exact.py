"""Alg. 2 on tabular CMDPs, exactly: the safe meta-gradient and safe meta-policy training.

Meta-objective of one task: J_tau(A^s(pi_phi)) with A^s the exact dual-PGD adaptation. The
meta-policy is a tabular softmax, f_phi = log pi_phi = log_softmax(phi) (section 2).

Meta-gradients (`kind`):
- "full": Prop. 3 (App. F.3): the total derivative of J_tau(pi^tau(phi, u*(phi))), with
  grad eta and grad Qbar included and grad u* from the implicit function theorem on the active
  multipliers (Prop. 7): du*_A/dphi = -H^-1 d(grad_u L)_A/dphi, H the dual Hessian on the active
  set. Exact up to the dual solver tolerance; the reference the others are checked against.
- "eq6": eq. (6), the paper's Hessian-free meta-gradient: Prop. 3 with grad u* = 0, i.e. the
  derivative of J_tau(pi^tau(phi, u)) in phi at fixed u = u*(phi). It keeps grad f_phi and
  eta^-1 grad Qbar (through Q_tau^{pi_phi}, Q_ci^{pi_phi}, App. F.3.2). Note: Prop. 3 as printed
  weights the score by Q^{pi^tau}; Lemma 3, on which it rests, gives the advantage A^{pi^tau}
  (a centred score). We differentiate the closed form itself, which is the derivative the
  proposition states; a literal un-centred Q weighting differs from it by
  E_{nu^tau}[E_{pi^tau}[grad(f + Qbar/eta)] V^{pi^tau}(s)] / (1-gamma).
- "first_order": Alg. 4 line 7, (1/(1-gamma)) E_{s~nu^tau, a~pi^tau}[grad f_phi(s,a) A^tau(s,a)]:
  drops the eta^-1 grad Qbar term; the first term of the derivative, with the score centred
  under pi^tau as Lemma 3 needs (the line prints Q^tau; with a centred score Q and A agree).
  This is what the sampled Alg. 4 (meta/safe_meta.py) estimates without bias.

Meta-training (Alg. 2): each iteration draws a batch of training tasks and checks the meta-
policy's costs on them (line 4). A task within d + delta offers its meta-gradient (line 7); a
task that violates offers the negative gradient of its most violated cost (lines 10-11; "any
i_n" in the paper, we take the largest violation). How the branches combine (`switch`):
- "any" (default): CRPO applied to problem (2), whose constraints are J_ci,tau <= d_i + delta
  for every sampled tau: if any task of the batch violates, the step reduces the violated costs
  only (mean over violating tasks); otherwise it ascends the mean meta-gradient.
- "per_task": the mean of every task's own branch (the expected Alg. 2 step); reward tasks can
  outvote violating ones, so the meta-policy is kept safe less strictly.
With one task per iteration both are Alg. 2 exactly. One TRPO step (line 8/12) follows, with the exact Fisher of the meta-policy averaged over the batch's
visitation distributions, the mean KL over the batch as the trust region, and the exact batch
objective (mean of J_tau(A^s(pi_phi)) for the first kind of task and -J_{c_i,tau}(pi_phi) for
the second) for the line search's improvement check.

`constrain_adapted` (beyond the paper): a task whose one-step adapted policy violates d + delta
takes, in place of its meta-gradient, a step that lowers that policy's cost J_ci(A^s(pi_phi))
(the meta-gradient of the cost, of the same kind), so problem (2) also constrains the adapted
policy. `meta_gradient` kinds apply to it as to the reward.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..adaptation.dual_pgd import AdaptResult, ExactAdaptationSettings, adapted_logits, as_vector, dual_gradient
from ..optim import mean_kl, softmax_fisher_vector_product, trpo_step
from ..policies import TabularSoftmaxPolicy
from ..tasks.tabular import TabularCMDP, evaluate, evaluate_torch
from .base import N_VIOLATING, TRPO_STEP_VARS, TabularMetaLearner, crpo_switch, evaluate_one_step

META_GRADIENTS = ("eq6", "full", "first_order")
AdaptationSettings = ExactAdaptationSettings


@dataclass
class MetaGradient:
    value: float               # J_tau(A^s(pi_phi))
    grad: np.ndarray           # [S, A] gradient of `value` w.r.t. phi (per `kind`)
    adapt: AdaptResult


def meta_gradient(cmdp: TabularCMDP, logits: np.ndarray, adaptation: ExactAdaptationSettings,
                  kind: str = "eq6", signal: int = 0) -> MetaGradient:
    """Meta-gradient of J_tau(A^s(pi_phi)) w.r.t. the logits phi, of the given kind (module doc);
    `signal` i > 0: of the adapted policy's cost J_c(i-1) instead of its reward."""
    if kind not in META_GRADIENTS:
        raise ValueError(f"meta_gradient must be one of {META_GRADIENTS}, got {kind!r}")
    res = adaptation.adapt(cmdp, logits)
    gamma, p = cmdp.gamma, cmdp.num_constraints
    lam_c = torch.from_numpy(as_vector(adaptation.lam_c, p, "lam_c"))
    phi = torch.tensor(np.asarray(logits), dtype=torch.float64, requires_grad=True)
    log_pi = torch.log_softmax(phi, dim=-1)

    if kind == "first_order":  # Alg. 4 line 7 with exact nu^tau, pi^tau, A^tau
        log_pu = torch.from_numpy(res.logits)
        ev_tau = evaluate_torch(cmdp, log_pu.exp())
        A_tau, J_tau = (ev_tau.A, ev_tau.J) if signal == 0 else (ev_tau.Ac[signal - 1], ev_tau.Jc[signal - 1])
        surrogate = (ev_tau.nu[:, None] * log_pu.exp() * A_tau * log_pi).sum() / (1.0 - gamma)
        grad = torch.autograd.grad(surrogate, phi)[0]
        return MetaGradient(float(J_tau), grad.numpy(), res)

    ev = evaluate_torch(cmdp, log_pi.exp())
    u = torch.tensor(res.u, dtype=torch.float64, requires_grad=(kind == "full"))
    log_pu = adapted_logits(log_pi, ev.A, ev.Ac, u, adaptation.lam, lam_c, gamma)  # eq. (3)
    adapted_eval = evaluate_torch(cmdp, log_pu.exp())
    J = adapted_eval.J if signal == 0 else adapted_eval.Jc[signal - 1]
    if kind == "eq6" or not (res.u > 0).any():
        grad = torch.autograd.grad(J, phi)[0]
        return MetaGradient(float(J.detach()), grad.numpy(), res)

    # kind == "full": add (dJ/du_A) du*_A/dphi by the implicit function theorem (Prop. 7)
    grad_phi, grad_u = torch.autograd.grad(J, [phi, u], retain_graph=True)
    active = np.flatnonzero(res.u > 0)
    delta = torch.from_numpy(as_vector(adaptation.delta, p, "delta"))
    d_prime = (1.0 - gamma) * (torch.from_numpy(cmdp.d) + delta - ev.Jc)
    G = dual_gradient(u, log_pi, ev.A, ev.Ac, ev.nu, d_prime, adaptation.lam, lam_c, gamma)  # eq. (5)
    H = torch.stack([torch.autograd.grad(G[i], u, retain_graph=True)[0][active] for i in active])
    w = torch.linalg.solve(H, grad_u[active])
    correction = torch.autograd.grad((w * G[active]).sum(), phi)[0]
    return MetaGradient(float(J.detach()), (grad_phi - correction).numpy(), res)


def cost_gradient(cmdp: TabularCMDP, logits: np.ndarray, i: int) -> tuple[float, np.ndarray]:
    """J_ci(pi_phi) and its exact policy gradient w.r.t. phi (Alg. 2 line 11)."""
    phi = torch.tensor(np.asarray(logits), dtype=torch.float64, requires_grad=True)
    Jc = evaluate_torch(cmdp, torch.softmax(phi, dim=-1)).Jc[i]
    return float(Jc.detach()), torch.autograd.grad(Jc, phi)[0].numpy()


# --------------------------------------------------------------------------- meta-training
@dataclass(frozen=True)
class MetaTrainSettings:
    """Options of exact Alg. 2: `methods.NAME.meta_gradient` and the `metatrain` keys it reads."""

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
    backtrack_steps: int
    eval_tasks: int | None


@dataclass
class MetaTrainState:
    """Everything needed to continue meta-training bit for bit (checkpointed every iteration)."""

    iteration: int
    logits: np.ndarray
    rng_state: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


class ExactSafeMeta(TabularMetaLearner):
    """Alg. 2 on tabular CMDPs with exact values (module docstring).

    records[n] holds the exact evaluation of phi_n on the evaluation tasks (meta-policy and
    one-step adapted policy) and the statistics of the step taken from phi_n; a last record
    (n = iterations) holds the evaluation of the final meta-policy only.
    """

    name = "safemeta"
    kinds = ("exact",)
    operator = "dual_pgd"
    Settings = MetaTrainSettings
    State = MetaTrainState
    record_vars = {"n_violating": N_VIOLATING, **TRPO_STEP_VARS}

    def initial_state(self) -> MetaTrainState:
        """Uniform meta-policy (phi = 0) and the batch-sampling generator of this seed."""
        m = self.train_cmdps[0]
        return initial_state(m.num_states, m.num_actions, self.seed)

    def iteration(self, state: MetaTrainState) -> None:
        settings, adaptation, train = self.settings, self.adapt.settings, self.train_cmdps
        n = state.iteration
        t0 = time.perf_counter()
        logits = state.logits
        evaluation, _ = evaluate_one_step(self.adapt, self.evaluation, TabularSoftmaxPolicy(logits), lambda j, k: 0)
        record: dict[str, Any] = {"iteration": n, **evaluation}
        if n == settings.iterations:
            record["time_compute"] = time.perf_counter() - t0
            state.records.append(record)
            state.iteration = n + 1  # finished: a second call adds nothing
            return
        rng = np.random.default_rng()
        rng.bit_generator.state = state.rng_state
        batch = rng.choice(len(train), size=settings.tasks_per_iteration,
                           replace=settings.tasks_per_iteration > len(train))
        probs = np.exp(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
        grads, branches, nus = [], [], []
        for k in batch:
            cmdp = train[k]
            ev = evaluate(cmdp, probs)
            nus.append(ev.nu)
            violation = ev.Jc - cmdp.d - as_vector(adaptation.delta, cmdp.num_constraints, "delta")
            if (violation <= 0).all():                                     # line 4
                g = meta_gradient(cmdp, logits, adaptation, settings.meta_gradient)
                overshoot = evaluate(cmdp, np.exp(g.adapt.logits)).Jc - cmdp.d - as_vector(adaptation.delta,
                                                                                           cmdp.num_constraints, "delta")
                if settings.constrain_adapted and (overshoot > 0).any():  # lower J_c(A^s(pi_phi)) instead
                    i = int(np.argmax(overshoot))
                    grads.append(-meta_gradient(cmdp, logits, adaptation, settings.meta_gradient, signal=i + 1).grad)
                    branches.append(("adapted_cost", k, i))
                else:
                    grads.append(g.grad)                                   # line 7
                    branches.append(("meta", k, -1))
            else:
                i = int(np.argmax(violation))                              # line 10
                grads.append(-cost_gradient(cmdp, logits, i)[1])           # line 11 (descent on J_ci)
                branches.append(("cost", k, i))
        keep = crpo_switch([b[0] for b in branches], settings.switch)
        grads, branches, nus = [grads[j] for j in keep], [branches[j] for j in keep], [nus[j] for j in keep]
        grad = np.mean(grads, axis=0)
        if not np.isfinite(grad).all():
            raise FloatingPointError(f"meta-training iteration {n}: the meta-gradient has non-finite entries")

        def objective(flat: torch.Tensor) -> float:
            new = flat.reshape(logits.shape).numpy()
            values = []
            for branch, k, i in branches:
                if branch == "meta":
                    res = adaptation.adapt(train[k], new)
                    values.append(evaluate(train[k], np.exp(res.logits)).J)
                elif branch == "adapted_cost":
                    res = adaptation.adapt(train[k], new)
                    values.append(-evaluate(train[k], np.exp(res.logits)).Jc[i])
                else:
                    values.append(-evaluate(train[k], np.exp(new - np.logaddexp.reduce(new, -1, keepdims=True))).Jc[i])
            return float(np.mean(values))

        weights = np.mean(nus, axis=0)
        step = trpo_step(torch.from_numpy(logits.reshape(-1)), torch.from_numpy(grad.reshape(-1)),
                         softmax_fisher_vector_product(probs, weights), objective,
                         lambda flat: mean_kl(probs, weights, flat.reshape(logits.shape).numpy()),
                         settings.max_kl, cg_iters=settings.cg_iters, damping=settings.cg_damping,
                         backtrack_steps=settings.backtrack_steps)                  # lines 8 / 12
        record.update(n_violating=sum(b[0] != "meta" for b in branches), step_accepted=step.accepted,
                      step_kl=step.kl, step_improvement=step.improvement, grad_norm=float(np.linalg.norm(grad)),
                      time_compute=time.perf_counter() - t0)
        state.records.append(record)
        state.iteration, state.rng_state = n + 1, rng.bit_generator.state
        state.logits = step.params.reshape(logits.shape).numpy().copy()


def initial_state(num_states: int, num_actions: int, seed: int) -> MetaTrainState:
    """Uniform meta-policy (phi = 0) and the batch-sampling generator of this seed."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
    return MetaTrainState(0, np.zeros((num_states, num_actions)), rng.bit_generator.state)
