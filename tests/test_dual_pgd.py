"""The exact adaptation A^s: closed form + dual PGD against a generic constrained solver."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from conftest import random_cmdp, softmax, with_limits_near
from safemeta.adaptation.dual_pgd import adapt_tabular, dual_gradient, dual_value, projected_gradient_descent
from safemeta.tasks.tabular import TabularCMDP, evaluate


def solve_problem_1_with_scipy(m: TabularCMDP, logits: np.ndarray, lam: float, lam_c: np.ndarray,
                               delta: np.ndarray) -> np.ndarray:
    """Problem (1) over the policy simplex by SLSQP (a generic solver, no closed form used)."""
    S, A, p = m.num_states, m.num_actions, m.num_constraints
    pi0 = softmax(logits)
    ev = evaluate(m, pi0)
    nu, g = ev.nu, m.gamma

    def kl(x):
        pi = x.reshape(S, A)
        return (nu * (pi * np.log(pi / pi0)).sum(1)).sum()

    def kl_grad(x):
        pi = x.reshape(S, A)
        return (nu[:, None] * (np.log(pi / pi0) + 1)).reshape(-1)

    def objective(x):
        return -(nu[:, None] * x.reshape(S, A) * ev.A).sum() + lam * kl(x)

    def objective_grad(x):
        return -(nu[:, None] * ev.A).reshape(-1) + lam * kl_grad(x)

    constraints = [{"type": "eq", "fun": lambda x: x.reshape(S, A).sum(1) - 1,
                    "jac": lambda x: np.kron(np.eye(S), np.ones(A))}]
    for i in range(p):
        constraints.append({
            "type": "ineq",  # scipy wants fun >= 0
            "fun": lambda x, i=i: m.d[i] + delta[i] - ev.Jc[i] - (nu[:, None] * x.reshape(S, A) * ev.Ac[i]).sum() / (1 - g) - lam_c[i] * kl(x),
            "jac": lambda x, i=i: -(nu[:, None] * ev.Ac[i]).reshape(-1) / (1 - g) - lam_c[i] * kl_grad(x)})
    res = minimize(objective, pi0.reshape(-1), jac=objective_grad, constraints=constraints, method="SLSQP",
                   bounds=[(1e-12, 1.0)] * (S * A), options={"ftol": 1e-15, "maxiter": 2000})
    assert res.success, res.message
    return res.x.reshape(S, A)


CASES = [  # (seed, p, margin, lam, lam_c): near-boundary safe starts make constraints bind
    (0, 1, 0.02, 0.5, 0.5),
    (1, 1, 0.05, 1.0, 2.0),
    (2, 2, [0.01, 0.03], 0.5, 0.5),
    (3, 3, [0.02, 0.02, 0.5], 0.7, 0.3),
]


def _adapted_case(seed, p, margin, lam, lam_c):
    """A CMDP whose cost grows with reward, its meta-policy near the limit, and A^s of it."""
    m0 = random_cmdp(seed, S=4, A=3, p=p, correlation=0.7)
    logits = np.random.default_rng(seed).normal(size=(4, 3)) * 0.5
    m = with_limits_near(m0, logits, np.asarray(margin))
    return m, logits, adapt_tabular(m, logits, lam, lam_c, 0.0)


@pytest.mark.parametrize("seed,p,margin,lam,lam_c", CASES)
def test_closed_form_matches_generic_solver_and_kkt(seed, p, margin, lam, lam_c):
    m, logits, res = _adapted_case(seed, p, margin, lam, lam_c)
    assert res.converged and res.feasible
    pi_ours = np.exp(res.logits)
    pi_ref = solve_problem_1_with_scipy(m, logits, lam, np.full(p, lam_c), np.zeros(p))
    assert np.abs(pi_ours - pi_ref).max() < 1e-4

    # KKT of (1) at (pi^tau, u*): primal and dual feasibility, complementary slackness ...
    slack = m.d - res.surrogate_cost
    assert (slack > -1e-8).all() and (res.u >= 0).all()
    assert np.abs(res.u * slack).max() < 1e-8
    assert (res.u > 0).any(), "the test case should have an active constraint"
    # ... and stationarity: grad of the Lagrangian w.r.t. pi(a|s) is constant over a (simplex multiplier)
    ev, pi0 = res.meta_eval, softmax(logits)
    eta = lam + (1 - m.gamma) * (res.u * lam_c).sum()
    stationarity = -ev.A + np.einsum("i,isa->sa", res.u, ev.Ac) + eta * (np.log(pi_ours / pi0) + 1)
    assert np.abs(stationarity - stationarity.mean(1, keepdims=True)).max() < 1e-8


@pytest.mark.parametrize("seed,p,margin,lam,lam_c", CASES)
def test_multipliers_are_the_dual_optimum(seed, p, margin, lam, lam_c):
    m, logits, res = _adapted_case(seed, p, margin, lam, lam_c)
    ev = res.meta_eval
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    args = (torch.log_softmax(t(logits), -1), t(ev.A), t(ev.Ac), t(ev.nu),
            (1 - m.gamma) * (t(m.d) - t(ev.Jc)), lam, t(np.full(p, lam_c)), m.gamma)
    ref = minimize(lambda u: float(dual_value(t(u), *args)), np.ones(p),
                   jac=lambda u: dual_gradient(t(u), *args).numpy(), bounds=[(0, None)] * p,
                   method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12})
    np.testing.assert_allclose(res.u, ref.x, atol=1e-6)
    assert float(dual_value(t(res.u), *args)) <= ref.fun + 1e-12


def test_eq5_is_the_gradient_of_the_dual_function():
    """App. F.2.3: eq. (5) equals the derivative of the dual function (4) at the closed form."""
    m = random_cmdp(5, p=2)
    logits = np.random.default_rng(0).normal(size=(5, 3))
    ev = evaluate(m, softmax(logits))
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    args = (torch.log_softmax(t(logits), -1), t(ev.A), t(ev.Ac), t(ev.nu), t([0.01, -0.02]), 0.8,
            t([0.5, 1.5]), m.gamma)
    for u in ([0.0, 0.0], [0.3, 1.7], [2.0, 0.1]):
        u = t(u).requires_grad_(True)
        auto = torch.autograd.grad(dual_value(u, *args), u)[0]
        torch.testing.assert_close(dual_gradient(u.detach(), *args), auto, atol=1e-14, rtol=0)


def test_unconstrained_when_the_limit_is_slack():
    """With slack constraints u* = 0 and pi^tau = pi_phi exp(A / lam) / Z (eq. 3 with eta = lam)."""
    m = dataclasses.replace(random_cmdp(6), d=np.array([1e6]))
    logits = np.random.default_rng(1).normal(size=(5, 3))
    res = adapt_tabular(m, logits, 0.5, 1.0)
    assert res.u[0] == 0.0 and res.iterations == 0
    expected = np.log(softmax(logits + res.meta_eval.A / 0.5))
    np.testing.assert_allclose(res.logits, expected, atol=1e-12)


def test_infeasible_problem_is_reported():
    """A meta-policy far above its limit with a tiny trust region: problem (1) has no solution."""
    m0 = random_cmdp(7, correlation=0.5)
    logits = np.zeros((5, 3))
    m = with_limits_near(m0, logits, -0.5)  # J_c(pi_phi) = d + 0.5
    res = adapt_tabular(m, logits, 1.0, 50.0)
    assert not res.feasible and not res.converged
    # the same start with a generous limit is feasible
    assert adapt_tabular(with_limits_near(m0, logits, 0.1), logits, 1.0, 50.0).feasible


def test_pgd_solves_a_known_quadratic():
    """min 0.5 (u - c)^T H (u - c) over u >= 0 has the projection-known solution."""
    H = np.array([[2.0, 0.5], [0.5, 1.0]])
    c = np.array([1.0, -2.0])
    sol = projected_gradient_descent(lambda u: H @ (u - c), 2, tol=1e-12)
    # KKT: u2 = 0 (c2 < 0 pulls it down), u1 minimises 0.5*2*(u1-1)^2 + 0.5*(u1-1)*(2)... solve exactly
    u1 = c[0] + H[0, 1] * c[1] / H[0, 0]
    np.testing.assert_allclose(sol.u, [u1, 0.0], atol=1e-10)
    assert sol.converged


def test_bad_hyper_parameters_are_rejected():
    m = random_cmdp(8, p=2)
    with pytest.raises(ValueError, match="lam must be > 0"):
        adapt_tabular(m, np.zeros((5, 3)), 0.0, 1.0)
    with pytest.raises(ValueError, match="lam_c must be a scalar or have one entry per constraint"):
        adapt_tabular(m, np.zeros((5, 3)), 1.0, [1.0, 2.0, 3.0])
