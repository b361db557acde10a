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
from typing import Callable, ClassVar

import numpy as np
import torch

from ..records import Var
from ..tasks.tabular import Evaluation, TabularCMDP, evaluate_torch
from .base import Observation, Step
from .observation import ExactObserver



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


# --------------------------------------------------------------------------- the operators
EXACT_STEP_VARS = {
    "feasible": Var((), "problem (1) of the step was feasible", "1", initial=1.0),
    "converged": Var((), "the dual solver reached dual_tol", "1", initial=1.0),
    "predicted_cost": Var(("constraint",), "the constraint of problem (1) at the step taken (its predicted cost)",
                          "cost"),
}


class ExactDualPGD(ExactObserver):
    """A^s on a tabular CMDP with exact advantages (Alg. 1); observation = exact evaluation."""

    name = "dual_pgd"
    kinds = ("exact",)
    Settings = ExactAdaptationSettings
    step_vars = EXACT_STEP_VARS

    def step(self, state, policy, observation: Observation) -> Step:
        from ..policies import TabularSoftmaxPolicy

        res = self.settings.adapt(state.cmdp, policy.logits)
        record = {"feasible": res.feasible, "converged": res.converged, "predicted_cost": res.surrogate_cost}
        return Step(TabularSoftmaxPolicy(res.logits, normalized=True), res.u, res.kl, record, res)
