"""The paper's safe policy adaptation A^s: closed form (eq. 3) + projected gradient descent on
the Lagrange multipliers of the dual (eqs. 4-5, Alg. 1).

Problem (1), for a meta-policy pi_phi with advantages A (reward) and A_ci (costs) under pi_phi:

    max_pi  E_{s~nu, a~pi}[A(s,a)] - lam E_nu[KL(pi || pi_phi)]
    s.t.    J_ci(pi_phi) + E[A_ci]/(1-gamma) + lam_ci E_nu[KL(pi || pi_phi)] <= d_i + delta_i .

Prop. 1 (eq. 3): pi^u(.|s) ∝ pi_phi(.|s) exp((A - sum_i u_i A_ci)(s,.) / eta_u) with
eta_u = lam + (1-gamma) sum_i u_i lam_ci. Because V(s) does not depend on the action, Q may
replace A here (eq. 9) and gives the same policy.

Prop. 2 (eq. 4): u* minimises over u >= 0 the dual function, which at the closed form equals
    L(u) = eta_u E_nu[ log sum_a pi_phi(a|s) exp(Abar_u(s,a) / eta_u) ] + sum_i u_i d'_i ,
with Abar_u = A - sum_i u_i A_ci and d'_i = (1-gamma)(d_i + delta_i - J_ci(pi_phi)).
(At pi^u, E_{pi^u}[Abar_u] - eta_u KL(pi^u||pi_phi) = eta_u log Z_u(s), so this is the objective
of (4), written in a form that is cheap and exact.) Its gradient is eq. (5):
    dL/du_i = -E_nu[ E_{pi^u}[A_ci] + (1-gamma) lam_ci KL(pi^u || pi_phi) ] + d'_i .

Alg. 1 runs PGD on u from u = 0 with a step size beta. Ours is chosen by backtracking on a
curvature test that needs gradients only (see `projected_gradient_descent`), doubled again
after each accepted step, so no beta needs tuning. Stopping rule: the projected-gradient residual
||u - max(0, u - grad L(u))||_inf <= tol (0 exactly at a KKT point of (4)), or max_iter.
If some u_i grows past u_max the dual is unbounded, problem (1) is infeasible (possible only
when pi_phi violates d + delta), and the result says so: the returned policy is then the
u_max closed form, which tends to the minimiser of the violated constraint's surrogate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np
import torch

from ..records import Var
from ..tasks.tabular import Evaluation, TabularCMDP, evaluate_torch
from .base import Observation, Step
from .observation import ExactObserver, RolloutObserver

if TYPE_CHECKING:
    from ..policies import NeuralPolicy
    from ..rollout import Batch


def eta_of(u: torch.Tensor, lam: float, lam_c: torch.Tensor, gamma: float) -> torch.Tensor:
    """eta_u = lam + (1 - gamma) sum_i u_i lam_ci (Prop. 1)."""
    return lam + (1.0 - gamma) * (u * lam_c).sum()


def adapted_logits(log_pi: torch.Tensor, adv: torch.Tensor, adv_c: torch.Tensor, u: torch.Tensor,
                   lam: float, lam_c: torch.Tensor, gamma: float) -> torch.Tensor:
    """Normalised log pi^u of eq. (3): log pi_phi + (A - sum_i u_i A_ci) / eta_u, re-normalised.

    Shapes: log_pi, adv [..., A]; adv_c [p, ..., A]; u, lam_c [p]. Differentiable in all inputs.
    """
    penalised = adv - torch.einsum("i,i...->...", u, adv_c)
    return torch.log_softmax(log_pi + penalised / eta_of(u, lam, lam_c, gamma), dim=-1)


def dual_value(u: torch.Tensor, log_pi: torch.Tensor, adv: torch.Tensor, adv_c: torch.Tensor,
               weights: torch.Tensor, d_prime: torch.Tensor, lam: float, lam_c: torch.Tensor,
               gamma: float) -> torch.Tensor:
    """L(u) of problem (4) at the closed form: eta_u E_w[log Z_u(s)] + u . d' (see module doc)."""
    eta = eta_of(u, lam, lam_c, gamma)
    penalised = adv - torch.einsum("i,i...->...", u, adv_c)
    log_z = torch.logsumexp(log_pi + penalised / eta, dim=-1)
    return eta * (weights * log_z).sum() + (u * d_prime).sum()


def dual_gradient(u: torch.Tensor, log_pi: torch.Tensor, adv: torch.Tensor, adv_c: torch.Tensor,
                  weights: torch.Tensor, d_prime: torch.Tensor, lam: float, lam_c: torch.Tensor,
                  gamma: float) -> torch.Tensor:
    """Eq. (5): -E_w[E_{pi^u}[A_ci] + (1-gamma) lam_ci KL(pi^u||pi_phi)] + d'_i, shape [p]."""
    log_pu = adapted_logits(log_pi, adv, adv_c, u, lam, lam_c, gamma)
    pu = log_pu.exp()
    kl = (pu * (log_pu - log_pi)).sum(-1)                                   # per state
    exp_adv_c = (pu * adv_c).sum(-1)                                        # [p, ...]
    per_state = exp_adv_c + (1.0 - gamma) * lam_c.reshape(-1, *[1] * kl.ndim) * kl
    return -(weights * per_state).reshape(per_state.shape[0], -1).sum(-1) + d_prime


# --------------------------------------------------------------------------- PGD (Alg. 1)
@dataclass
class DualSolution:
    u: np.ndarray        # [p] multipliers
    iterations: int
    residual: float      # projected-gradient residual at exit
    converged: bool      # residual <= tol
    feasible: bool       # False when u ran past u_max (problem (1) infeasible)


def projected_gradient_descent(grad: Callable[[np.ndarray], np.ndarray], p: int, *, tol: float = 1e-10,
                               max_iter: int = 5000, step: float = 1.0, u_max: float = 1e8,
                               sigma: float = 0.1) -> DualSolution:
    """Minimise a convex function over u >= 0 by PGD from u = 0 (Alg. 1 / Alg. 3), gradients only.

    Step rule: a trial step beta is accepted when the secant curvature along the projected move
    is small enough, <g(u+) - g(u), u+ - u> <= (1 - sigma) ||u+ - u||^2 / beta; for convex L this
    guarantees L(u+) <= L(u) - sigma ||u+ - u||^2 / beta without evaluating L (whose differences
    fall below rounding near the optimum). Otherwise beta is halved (also when the gradient is
    not finite at the trial point); after acceptance it doubles.
    """
    u = np.zeros(p)
    g = np.asarray(grad(u), dtype=np.float64)
    beta = step
    for it in range(max_iter):
        residual = float(np.abs(u - np.maximum(0.0, u - g)).max())
        if residual <= tol:
            return DualSolution(u, it, residual, True, True)
        for _ in range(200):
            trial = np.clip(u - beta * g, 0.0, u_max)
            move = trial - u
            g_trial = np.asarray(grad(trial), dtype=np.float64)
            if np.isfinite(g_trial).all() and (g_trial - g) @ move <= (1.0 - sigma) * (move @ move) / beta:
                break
            beta *= 0.5  # too long a step (or one the gradient cannot be evaluated at)
        else:
            return DualSolution(u, it + 1, float("nan"), False, True)
        u, g = trial, g_trial
        beta *= 2.0
        if u.max() >= u_max:
            return DualSolution(u, it + 1, float("inf"), False, False)
    residual = float(np.abs(u - np.maximum(0.0, u - g)).max())
    return DualSolution(u, max_iter, residual, residual <= tol, True)


# --------------------------------------------------------------------------- exact tabular A^s
@dataclass
class AdaptResult:
    """Outcome of one exact adaptation step A^s(pi_phi)."""

    logits: np.ndarray        # [S, A] normalised log-probabilities of the adapted policy (eq. 3)
    u: np.ndarray             # [p] multipliers, paper's convention (eta = lam + (1-gamma) sum u lam_c)
    eta: float
    iterations: int
    residual: float
    converged: bool
    feasible: bool
    kl: float                 # E_{nu^{pi_phi}}[KL(pi^u || pi_phi)]
    surrogate_cost: np.ndarray  # [p] left-hand side of the constraints of (1) at pi^u
    meta_eval: Evaluation     # exact evaluation of pi_phi (reused by meta-gradients)


def as_vector(value: float | list[float] | np.ndarray, p: int, name: str) -> np.ndarray:
    """Broadcast a scalar or length-p sequence to a float vector [p]; name it in errors."""
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.full(p, arr.item())
    if arr.shape != (p,):
        raise ValueError(f"{name} must be a scalar or have one entry per constraint (p={p}); got {arr.size}")
    return arr


@dataclass(frozen=True)
class ExactAdaptationSettings:
    """Options of the exact A^s (schema block `operator_dual_pgd`): the paper's Table 2 row
    (lam, lam_c, delta) and the dual solver's stopping rule."""

    block: ClassVar[str] = "operator_dual_pgd"

    lam: float
    lam_c: float | list[float]
    delta: float | list[float]
    dual_tol: float
    dual_max_iter: int

    def adapt(self, cmdp: TabularCMDP, logits: np.ndarray, delta: float | list[float] | None = None) -> AdaptResult:
        return adapt_tabular(cmdp, logits, self.lam, self.lam_c, self.delta if delta is None else delta,
                             tol=self.dual_tol, max_iter=self.dual_max_iter)


def adapt_tabular(cmdp: TabularCMDP, logits: np.ndarray, lam: float, lam_c: float | np.ndarray,
                  delta: float | np.ndarray = 0.0, *, tol: float = 1e-10, max_iter: int = 5000,
                  u_max: float = 1e8) -> AdaptResult:
    """Exact A^s(pi_phi, {lam, lam_c}, delta, tau) on a tabular CMDP (Alg. 1 with exact A, A_c).

    `logits [S, A]` define pi_phi = softmax(logits) (f_phi = log pi_phi). lam > 0, lam_c >= 0.
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam!r}")
    p = cmdp.num_constraints
    lam_c_t = torch.from_numpy(as_vector(lam_c, p, "lam_c"))
    delta_v = as_vector(delta, p, "delta")
    if (lam_c_t < 0).any() or (delta_v < 0).any():
        raise ValueError("lam_c and delta must be non-negative")
    gamma = cmdp.gamma
    with torch.no_grad():
        log_pi = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=-1)
        ev = evaluate_torch(cmdp, log_pi.exp())
        d_prime = (1.0 - gamma) * (torch.from_numpy(cmdp.d + delta_v) - ev.Jc)
        args = (log_pi, ev.A, ev.Ac, ev.nu, d_prime, float(lam), lam_c_t, gamma)
        sol = projected_gradient_descent(lambda u: dual_gradient(torch.from_numpy(u), *args).numpy(),
                                         p, tol=tol, max_iter=max_iter, u_max=u_max)
        u = torch.from_numpy(sol.u)
        log_pu = adapted_logits(log_pi, ev.A, ev.Ac, u, float(lam), lam_c_t, gamma)
        pu = log_pu.exp()
        kl = float((ev.nu * (pu * (log_pu - log_pi)).sum(-1)).sum())
        exp_adv_c = torch.einsum("s,sa,isa->i", ev.nu, pu, ev.Ac)
        surrogate = ev.Jc + exp_adv_c / (1.0 - gamma) + lam_c_t * kl
    meta_eval = Evaluation(**{k: v.numpy() if v.ndim else float(v) for k, v in vars(ev).items()})
    return AdaptResult(logits=log_pu.numpy(), u=sol.u, eta=float(eta_of(u, float(lam), lam_c_t, gamma)),
                       iterations=sol.iterations, residual=sol.residual, converged=sol.converged,
                       feasible=sol.feasible, kl=kl, surrogate_cost=surrogate.numpy(), meta_eval=meta_eval)


# --------------------------------------------------------------------------- sampled A^s (Alg. 3)
@dataclass(frozen=True)
class SampledAdaptationSettings:
    """Options of the sampled A^s (schema block `operator_dual_pgd`). lam, lam_c, delta: the
    paper's Table 2 row.

    normalize_advantages: divide the advantages of the closed form by the reward advantages'
    standard deviation, so lam, lam_c are in those units (Table 2's values then give KLs of the
    order App. D.4 aims at).
    kl_target: if set, lam and lam_c are scaled together per adaptation so that the adapted
    policy's KL to pi_phi is about kl_target (App. D.4 tunes them by hand to about 0.03).
    """

    block: ClassVar[str] = "operator_dual_pgd"

    lam: float
    lam_c: float | list[float]
    delta: float | list[float]
    dual_tol: float
    dual_max_iter: int
    cg_iters: int
    cg_damping: float
    fit_steps: int
    normalize_advantages: bool
    kl_target: float | None


@dataclass
class SampledAdaptResult:
    policy: "NeuralPolicy"        # the adapted policy (a new module; pi_phi is left unchanged)
    u: np.ndarray                 # [p] multipliers
    eta: float                    # eta_u* in the advantages' units
    lam_scale: float              # factor applied to lam, lam_c (1 unless kl_target is set)
    kl: float                     # E_nu KL(adapted || pi_phi) on the batch's states
    predicted_cost: np.ndarray    # [p] predicted J_c of the adapted policy at u*
    iterations: int
    converged: bool
    feasible: bool
    fit_loss: tuple[float, float]  # E.2.2 loss at the natural-step warm start and after fitting


def adapt_sampled(policy: "NeuralPolicy", batch: "Batch", limits: np.ndarray,
                  settings: SampledAdaptationSettings) -> SampledAdaptResult:
    """A^s from one batch of pi_phi's samples (Alg. 3 with Q from Monte-Carlo returns, eq. 9).

    1. Advantages of the closed form: discounted returns-to-go minus a per-step baseline
       (a baseline shifts log pi^u by a per-state constant only).
    2. pi^u of eq. (12) in parameter space: theta_u = phi + F^-1 E_nu[grad log pi (A - u.A_c)] / eta_u,
       the natural step, i.e. the second-order (Fisher) solution of problem (1)'s KL-regularised
       objective; for a tabular softmax it is eq. (3) exactly. Needs p + 1 CG solves, after
       which any u costs a few dot products.
    3. PGD on u (Alg. 3 lines 2-7) with the dual gradient of eq. (11),
       -(J_c + grad J_c . (theta_u - phi)) + d + delta (the factor (1-gamma) dropped: it only
       rescales the step). J_c and grad J_c are those of the constrained cost (batch docs).
       (Per-decision importance weights in place of the linear term, i.e. eq. (5), were tried:
       exact for a tabular softmax, but dominated by a few exploding ratios for Gaussian
       policies at the multipliers PGD explores.)
    4. The adapted policy is the App. E.2.2 fit of pi^u*: natural-gradient (Fisher-preconditioned
       Newton) steps from phi on the importance-weighted KL. The first step is theta_u* itself
       (the E.2.2 loss has gradient -E_nu[grad log pi Abar]/eta and Hessian ~ F at phi); then
       `fit_steps` more, each kept only if it lowers the loss and keeps eq. (11)'s predicted cost
       within d + delta (or within the first step's prediction). Default 0: measured on
       point_circle_diff (20 rollouts, lam = 2), two more steps lowered the loss but raised the
       realised cost from 13.0 to 19.6 (d = 13.9) by fitting the Monte-Carlo noise of Q.
    """
    from ..optim import conjugate_gradient, fisher_vector_product, flat_grad
    from ..rollout import time_baseline

    p = int(np.asarray(limits).shape[0])
    lam_c = as_vector(settings.lam_c, p, "lam_c")
    delta = as_vector(settings.delta, p, "delta")
    limit = np.asarray(limits, dtype=np.float64) + delta
    alive = batch.alive
    obs, actions, old_logp = batch.obs[alive], batch.actions[alive], batch.log_prob[alive]
    nu = batch.visitation()[alive]                                        # normalised discounted visitation
    adv = (batch.q_reward - time_baseline(batch.q_reward, alive))[alive]
    adv_c = (batch.q_cost - time_baseline(batch.q_cost, alive))[alive]   # [M, p]
    con = (batch.cost_to_go - time_baseline(batch.cost_to_go, alive))[alive]
    con_w = batch.constraint_discount[alive] / batch.num_rollouts         # grad of J_c in its own units
    scale = float(torch.sqrt((nu * (adv - (nu * adv).sum()) ** 2).sum())) if settings.normalize_advantages else 1.0
    scale = scale if scale > 0 else 1.0
    gamma = batch.gamma

    params = list(policy.parameters())
    phi = policy.flat()
    logp = policy.log_prob(obs, actions)
    g_r = flat_grad((nu * adv * logp).sum() / scale, params, retain_graph=True)
    g_c = [flat_grad((nu * adv_c[:, i] * logp).sum() / scale, params, retain_graph=True) for i in range(p)]
    h_c = [flat_grad((con_w * con[:, i] * logp).sum(), params, retain_graph=True) for i in range(p)]
    fvp_plain = fisher_vector_product(policy, obs, nu)

    def fvp(v):
        return fvp_plain(v) + settings.cg_damping * v

    x_r = conjugate_gradient(fvp, g_r, settings.cg_iters)
    x_c = torch.stack([conjugate_gradient(fvp, g, settings.cg_iters) for g in g_c]) if p else None
    a = np.array([float(h @ x_r) for h in h_c])
    B = np.array([[float(h @ x) for x in x_c] for h in h_c])
    J_c = batch.constraint_value.detach().double().numpy()
    lam_c_t = torch.from_numpy(lam_c)

    def step_of(u: np.ndarray, k: float) -> tuple[torch.Tensor, float]:
        eta = float(eta_of(torch.from_numpy(u), k * settings.lam, k * lam_c_t, gamma))
        return (x_r - torch.einsum("i,ij->j", torch.from_numpy(u).to(x_r.dtype), x_c)) / eta, eta

    def quadratic_kl(u: np.ndarray, k: float, quad: tuple) -> float:  # 1/2 dtheta^T F dtheta of the natural step
        quad_rr, quad_rc, quad_cc = quad
        eta = float(eta_of(torch.from_numpy(u), k * settings.lam, k * lam_c_t, gamma))
        return 0.5 * (quad_rr - 2 * u @ quad_rc + u @ quad_cc @ u) / eta ** 2

    def predicted(u: np.ndarray, k: float) -> np.ndarray:  # eq. (11): J_c + grad J_c . (theta_u - phi)
        eta = float(eta_of(torch.from_numpy(u), k * settings.lam, k * lam_c_t, gamma))
        return J_c + (a - B @ u) / eta

    tol = settings.dual_tol * max(1.0, float(np.abs(limit).max()))

    def solve(k: float) -> DualSolution:
        return projected_gradient_descent(lambda u: limit - predicted(u, k), p, tol=tol,
                                          max_iter=settings.dual_max_iter)

    k = 1.0
    if settings.kl_target is not None:  # the Fisher quadratic forms of the two CG solutions, once
        quad = (float(x_r @ fvp_plain(x_r)), np.array([float(x_r @ fvp_plain(x)) for x in x_c]),
                np.array([[float(xi @ fvp_plain(xj)) for xj in x_c] for xi in x_c]))
        k = _scale_for_kl(lambda kk: quadratic_kl(solve(kk).u, kk, quad), settings.kl_target)
    sol = solve(k)
    dtheta, eta = step_of(sol.u, k)

    adapted = type(policy).from_checkpoint(policy.to_checkpoint())
    adapted.load_flat(phi + dtheta)
    target = ((adv - adv_c @ torch.from_numpy(sol.u).to(adv.dtype)) / (scale * eta)).detach()
    fit_steps = settings.fit_steps if sol.feasible else 0  # the infeasible limit is not a target to fit
    h = torch.stack(h_c) if p else None
    allowed = np.maximum(limit, predicted(sol.u, k))  # the fit may not raise the predicted cost above this

    def acceptable(theta: torch.Tensor) -> bool:
        return bool((J_c + (h @ (theta - phi)).double().numpy() <= allowed + 1e-9).all()) if p else True

    fit_loss = _fit_e22(adapted, obs, actions, old_logp, nu, target, fit_steps, fvp, settings.cg_iters, acceptable)
    with torch.no_grad():  # E_nu KL(adapted || pi_phi), the direction of problem (1)
        kl = float((nu * policy.kl(obs, adapted.distribution(obs))).sum())
    return SampledAdaptResult(adapted, sol.u, eta, k, kl, predicted(sol.u, k), sol.iterations, sol.converged,
                              sol.feasible, fit_loss)


def _scale_for_kl(kl_of_scale: Callable[[float], float], target: float) -> float:
    """Bisection on log k for kl(k) = target (kl falls as lam, lam_c grow); k in [1e-4, 1e4]."""
    lo, hi = -4.0 * np.log(10), 4.0 * np.log(10)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if kl_of_scale(float(np.exp(mid))) > target:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def _fit_e22(adapted: "NeuralPolicy", obs: torch.Tensor, actions: torch.Tensor, old_logp: torch.Tensor,
             nu: torch.Tensor, target: torch.Tensor, steps: int, fvp: Callable, cg_iters: int,
             acceptable: Callable[[torch.Tensor], bool]) -> tuple[float, float]:
    """App. E.2.2: min_theta E_{s~nu, a~pi_phi}[rho_theta (log pi_theta - log pi_phi - target)],
    rho_theta = pi_theta / pi_phi, which is E_nu KL(pi_theta || pi^u) up to a constant.

    Each step is a natural-gradient step (preconditioned by pi_phi's Fisher, as the warm start)
    with backtracking until the loss falls and `acceptable(theta)` holds (the cost guard).
    """
    from ..optim import conjugate_gradient, flat_grad

    params = list(adapted.parameters())

    def loss(flat: torch.Tensor | None = None) -> torch.Tensor:
        logp = adapted.log_prob(obs, actions, None if flat is None else adapted.unflatten(flat))
        return (nu * torch.exp(logp - old_logp) * (logp - old_logp - target)).sum()

    theta = adapted.flat()
    with torch.no_grad():
        start = current = float(loss(theta))
    if not np.isfinite(start):
        return start, start
    for _ in range(steps):
        grad = flat_grad(loss(), params)
        direction = conjugate_gradient(fvp, grad, cg_iters)
        for fraction in 0.5 ** np.arange(8):
            trial = theta - float(fraction) * direction
            with torch.no_grad():
                value = float(loss(trial))
            if np.isfinite(value) and value < current and acceptable(trial):
                theta, current = trial, value
                adapted.load_flat(theta)
                break
        else:
            break  # no decrease along the natural direction: converged as far as this goes
    return start, current


# --------------------------------------------------------------------------- the operators
FEASIBLE = Var((), "problem (1) of the step was feasible", "1", initial=1.0)


class ExactDualPGD(ExactObserver):
    """A^s on a tabular CMDP with exact advantages (Alg. 1); observation = exact evaluation."""

    name = "dual_pgd"
    kinds = ("exact",)
    Settings = ExactAdaptationSettings
    step_vars = {"feasible": FEASIBLE}

    def step(self, state, policy, observation: Observation) -> Step:
        from ..policies import TabularSoftmaxPolicy

        res = self.settings.adapt(state.cmdp, policy.logits)
        return Step(TabularSoftmaxPolicy(res.logits, normalized=True), res.u, res.kl, {"feasible": res.feasible}, res)


class SampledDualPGD(RolloutObserver):
    """A^s from one batch of the current policy's rollouts (Alg. 3, `adapt_sampled`)."""

    name = "dual_pgd"
    kinds = ("sampled",)
    Settings = SampledAdaptationSettings
    step_vars = {"feasible": FEASIBLE}

    def step(self, state, policy, observation: Observation) -> Step:
        res = adapt_sampled(policy, observation.data, state.limits, self.settings)
        return Step(res.policy, res.u, res.kl, {"feasible": res.feasible}, res)
