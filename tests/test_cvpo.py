"""CVPO: the E-step dual against a generic solver, the M-step's trust regions, the threshold
conversion, and short seeded runs of the operator (learning, determinism, resume)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from scipy.optimize import brentq, minimize
from scipy.special import logsumexp, softmax

from safemeta.adaptation.cvpo import (LAM_MAX, CVPOSettings, cost_threshold, decoupled_kl, dual_terms, estep_dual,
                                      mstep, solve_estep_dual, weighted_log_likelihood)
from safemeta.config import settings
from safemeta.policies import GaussianMLPPolicy


# --------------------------------------------------------------------------- E-step (eqs. 8-9)
def reference_dual(q_r, q_c, eps1, eps2):
    """g(eta, lam) of eq. (9), written independently of the implementation (scipy's logsumexp)."""
    K = q_r.shape[1]

    def g(x):
        eta, lam = x
        return lam * eps1 + eta * eps2 + eta * np.mean(logsumexp((q_r - lam * q_c) / eta, axis=1) - np.log(K))

    return g


def scipy_solution(q_r, q_c, eps1, eps2):
    """Minimise the dual with L-BFGS-B (numerical gradients) from several starts; the best one."""
    g = reference_dual(q_r, q_c, eps1, eps2)
    runs = [minimize(g, x0, method="L-BFGS-B", bounds=[(1e-8, None), (0.0, LAM_MAX)],
                     options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20000}) for x0 in ([1.0, 0.0], [0.3, 1.0], [3.0, 3.0])]
    return min(runs, key=lambda r: r.fun).x


def instance(seed, B=64, K=16, coupling=0.5):
    rng = np.random.default_rng(seed)
    q_r = rng.normal(size=(B, K)) + rng.normal(size=(B, 1))
    q_c = rng.normal(size=(B, K)) + coupling * q_r + 1.0
    return q_r, q_c


def kl_and_cost(weights, q_c):
    K = weights.shape[1]
    kl = float(np.mean(np.sum(weights * np.log(np.maximum(weights * K, 1e-300)), axis=1)))
    return kl, float(np.mean(np.sum(weights * q_c, axis=1)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estep_dual_matches_scipy_when_the_cost_constraint_is_active(seed):
    q_r, q_c = instance(seed)
    eps2 = 0.1
    eps1 = float(np.mean(q_c)) - 0.2          # below the particle mean of Q_c: the constraint binds
    eta, lam, weights = estep_dual(q_r, q_c, eps1, eps2)
    ref = scipy_solution(q_r, q_c, eps1, eps2)
    np.testing.assert_allclose([eta, lam], ref, rtol=1e-4)
    assert lam > 0.05
    np.testing.assert_allclose(weights, softmax((q_r - lam * q_c) / eta, axis=1), rtol=1e-10, atol=1e-14)
    kl, cost = kl_and_cost(weights, q_c)
    assert kl == pytest.approx(eps2, rel=1e-6)       # stationarity in eta: mean KL = eps2
    assert cost == pytest.approx(eps1, abs=1e-6)     # stationarity in lam: E_q[Q_c] = eps1


@pytest.mark.parametrize("seed", [3, 4])
def test_estep_dual_matches_scipy_when_the_cost_constraint_is_slack(seed):
    q_r, q_c = instance(seed)
    eps1 = float(np.mean(q_c)) + 1.0
    eta, lam, weights = estep_dual(q_r, q_c, eps1, 0.05)
    ref = scipy_solution(q_r, q_c, eps1, 0.05)
    assert lam == 0.0 and ref[1] == pytest.approx(0.0, abs=1e-7)
    assert eta == pytest.approx(ref[0], rel=1e-4)
    kl, cost = kl_and_cost(weights, q_c)
    assert kl == pytest.approx(0.05, rel=1e-6) and cost < eps1
    warm = solve_estep_dual(q_r, q_c, eps1, 0.05, init=(eta, 3.0))    # from lam > 0 it must stop at the bound 0
    assert warm.converged and warm.lam[0] == 0.0 and warm.eta == pytest.approx(eta, rel=1e-6)


def test_estep_dual_without_a_feasible_q_pushes_lam_to_its_bound_and_recovers():
    """Slater violated: no q in the KL ball meets eps1. lam goes to its bound (the dual is unbounded
    below), eta keeps the KL at eps2, and q* is the most cost-reducing q of the KL ball (the
    recovery step of Remark 4), checked against scipy on the primal min_q E_q[Q_c] s.t. KL <= eps2."""
    q_r, q_c = instance(5, B=8, K=6)
    eps2 = 0.05
    eps1 = float(np.mean(q_c.min(axis=1)))     # only the per-state minima reach it: far outside the ball
    sol = solve_estep_dual(q_r, q_c, eps1, eps2)
    assert sol.converged and not sol.slater and sol.lam[0] == LAM_MAX
    # eta at lam = LAM_MAX: the root of dg/d eta (mean KL = eps2), found by scipy's brentq
    g = reference_dual(q_r, q_c, eps1, eps2)
    root = brentq(lambda e: (g([e * (1 + 1e-7), LAM_MAX]) - g([e * (1 - 1e-7), LAM_MAX])) / (2e-7 * e), 1e2, 1e9,
                  xtol=1e-12, rtol=1e-12)
    assert sol.eta == pytest.approx(root, rel=1e-4)
    kl, cost = kl_and_cost(sol.weights, q_c)
    assert kl == pytest.approx(eps2, rel=1e-6) and cost > eps1

    B, K = q_c.shape

    def mean_cost(flat):
        return float(np.mean(np.sum(flat.reshape(B, K) * q_c, axis=1)))

    constraints = [{"type": "eq", "fun": lambda f: f.reshape(B, K).sum(1) - 1.0},
                   {"type": "ineq", "fun": lambda f: eps2 - kl_and_cost(f.reshape(B, K), q_c)[0]}]
    primal = minimize(mean_cost, np.full(B * K, 1.0 / K), method="SLSQP", bounds=[(0, 1)] * (B * K),
                      constraints=constraints, options={"ftol": 1e-14, "maxiter": 2000})
    assert primal.success
    assert cost == pytest.approx(primal.fun, rel=1e-4)                     # the recovery step
    assert cost < float(np.mean(q_c)) - 0.1                                # it does reduce the cost


def test_estep_dual_gradient_and_hessian_match_central_differences():
    q_r, q_c = instance(6, B=32, K=8)
    eps1, eps2 = np.array([0.7]), 0.1
    for eta, lam in [(0.8, 0.4), (2.5, 1.7)]:
        terms = dual_terms(eta, np.array([lam]), q_r, q_c[None], eps1, eps2)
        h = 1e-5
        for i, e in enumerate(np.eye(2) * h):
            plus = dual_terms(eta + e[0], np.array([lam + e[1]]), q_r, q_c[None], eps1, eps2)
            minus = dual_terms(eta - e[0], np.array([lam - e[1]]), q_r, q_c[None], eps1, eps2)
            assert terms.grad[i] == pytest.approx((plus.value - minus.value) / (2 * h), rel=1e-6, abs=1e-9)
            np.testing.assert_allclose(terms.hessian[:, i], (plus.grad - minus.grad) / (2 * h), rtol=1e-5, atol=1e-8)


def test_estep_dual_warm_start_and_several_constraints():
    q_r, q_c = instance(7)
    eps1 = float(np.mean(q_c)) - 0.2
    cold = solve_estep_dual(q_r, q_c, eps1, 0.1)
    warm = solve_estep_dual(q_r, q_c, eps1, 0.1, init=(cold.eta * 1.3, cold.lam * 0.7))
    assert warm.converged and warm.iterations < cold.iterations + 5
    np.testing.assert_allclose([warm.eta, *warm.lam], [cold.eta, *cold.lam], rtol=1e-7)
    # the same constraint given twice at half the threshold weight: lam splits, eta and q* are unchanged
    both = solve_estep_dual(q_r, np.stack([q_c, q_c]), [eps1, eps1], 0.1)
    assert both.converged and both.lam.sum() == pytest.approx(cold.lam[0], rel=1e-6)
    assert both.eta == pytest.approx(cold.eta, rel=1e-6)


def test_estep_weights_do_not_depend_on_the_order_of_the_losses():
    """FSRL's E-step dual loss modifies its Q_r tensor in place (reference A7), so a policy loss
    computed after it weighs Q_r - 2 lam Q_c. Here: weights before and after evaluating the dual
    loss at other points are the same, and the inputs are unchanged."""
    q_r, q_c = instance(8)
    kept_r, kept_c = q_r.copy(), q_c.copy()
    eps1 = float(np.mean(q_c)) - 0.2
    eta, lam, before = estep_dual(q_r, q_c, eps1, 0.1)
    for point in [(0.5, 0.3), (eta, lam), (3.0, 2.0)]:          # the "dual loss", evaluated in between
        dual_terms(point[0], np.array([point[1]]), q_r, q_c[None], np.array([eps1]), 0.1)
    eta2, lam2, after = estep_dual(q_r, q_c, eps1, 0.1)
    np.testing.assert_array_equal(q_r, kept_r)
    np.testing.assert_array_equal(q_c, kept_c)
    assert (eta2, lam2) == (eta, lam)
    np.testing.assert_array_equal(after, before)
    np.testing.assert_allclose(before, softmax((kept_r - lam * kept_c) / eta, axis=1), rtol=1e-10, atol=1e-14)


def test_cost_threshold_conversion_matches_the_reference_values():
    """eps1 = d (1 - gamma^T) / ((1 - gamma) T); the dossier's worked values (A2.2)."""
    for d, T, gamma, expected in [(10, 400, 0.99, 2.4551), (20, 300, 0.99, 6.3397), (10, 500, 0.97, 0.6667),
                                  (25, 1000, 0.995, 4.9667)]:
        assert cost_threshold(np.array([d]), gamma, T)[0] == pytest.approx(expected, abs=1e-4)


# --------------------------------------------------------------------------- M-step (eqs. 53-58)
def test_mstep_keeps_both_decoupled_kls_within_their_bounds_and_raises_the_weighted_likelihood():
    """On a fixed batch (states, particles from pi_old, E-step weights toward a far target) the
    primal-dual M-step ends with C_mu, C_Sigma within their bounds (+ 5 %) and the bounds bind
    (the unconstrained weighted fit is far outside them); the weighted log-likelihood rises."""
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(3, 2, (16,), init_log_std=-0.5)
    old = GaussianMLPPolicy.from_checkpoint(policy.to_checkpoint())
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(64, 3, generator=g)
    with torch.no_grad():
        old_mean, old_log_std = old.mean(obs), old.log_std.clone()
        particles = old_mean[:, None] + old_log_std.exp() * torch.randn(64, 16, 2, generator=g)
    q_r = -((particles.double() - 1.0) ** 2).sum(-1).numpy()             # the best actions are far away, at (1, 1)
    _, _, w = estep_dual(q_r, np.zeros_like(q_r), 1.0, 0.5)
    weights = torch.as_tensor(w, dtype=torch.float32)
    s = settings(CVPOSettings, kl_mean=0.01, kl_cov=0.001, mstep_iters=300, actor_lr=0.01)
    optimizer = torch.optim.Adam(policy.parameters(), lr=s.actor_lr)
    duals = np.zeros(2)
    result = mstep(policy, optimizer, obs, particles, weights, old_mean, old_log_std, duals, s)
    assert result.kl_mean <= 1.05 * s.kl_mean and result.kl_cov <= 1.05 * s.kl_cov
    assert result.kl_mean >= 0.5 * s.kl_mean and duals[0] > 0          # the mean bound binds
    assert result.log_likelihood[1] > result.log_likelihood[0]
    with torch.no_grad():
        c_mu, c_sigma = decoupled_kl(policy.mean(obs), policy.log_std, old_mean, old_log_std)
        kl = policy.kl(obs, old.distribution(obs)).mean()                # E KL(old || new)
        # eq. (53): KL(old || new) = C_Sigma + the mean term with the NEW covariance; the decoupled C_mu
        # uses the old one (so it does not depend on Sigma), equal to first order
        mean_term = 0.5 * (((policy.mean(obs) - old_mean) / policy.log_std.exp()) ** 2).sum(-1).mean()
        loglik = weighted_log_likelihood(policy.mean(obs), policy.log_std, old_mean, old_log_std, particles, weights)
    assert float(mean_term + c_sigma) == pytest.approx(float(kl), rel=1e-5)
    assert float(c_mu) == pytest.approx(float(mean_term), rel=0.05)
    assert float(loglik) == pytest.approx(result.log_likelihood[1], rel=1e-6)

    unconstrained = GaussianMLPPolicy.from_checkpoint(old.to_checkpoint())
    free = settings(CVPOSettings, kl_mean=1e6, kl_cov=1e6, mstep_iters=300, actor_lr=0.01)
    far = mstep(unconstrained, torch.optim.Adam(unconstrained.parameters(), lr=0.01), obs, particles, weights, old_mean,
                old_log_std, np.zeros(2), free)
    assert far.kl_mean > 5 * s.kl_mean                                   # so the bounds above did the work


# --------------------------------------------------------------------------- the operator on a small task
def _small_run_setup():
    from safemeta.adaptation.cvpo import CVPO
    from safemeta.rollout import SamplingSettings
    from safemeta.scenario import Scenario
    from safemeta.tasks import get_distribution

    dist = get_distribution("point_circle_diff", horizon=40)          # d = 2 over 40 steps
    task = dist.sample(1, (0, 1))[0]
    scenario = Scenario("s", dist, SamplingSettings(8, 0.99, 1.0), {"hidden": [32, 32], "init_log_std": -0.5})
    operator = CVPO(scenario, settings(CVPOSettings, batch_size=64, particles=16, replay_ratio=10.0, polyak=0.95,
                                       gamma=0.97, buffer_size=600, critic_hidden=[32, 32], kl_mean=0.02,
                                       actor_lr=0.01))
    policy = scenario.fresh_policy(task, 3, "sampled")
    with torch.no_grad():                       # an unsafe start: drive in +x, through the wall
        policy.mean[-1].bias.copy_(torch.tensor([0.8, 0.0]))
    return operator, task, policy


def seed_of(k: int) -> int:
    return 1000 + k


STEPS = 20


@pytest.fixture(scope="module")
def small_run():
    from safemeta.evaluate import adaptation_sequence

    operator, task, policy = _small_run_setup()
    return task, adaptation_sequence(operator, task, policy, STEPS, seed_of, start_seed=7)


def test_cvpo_recovers_from_an_unsafe_start_and_raises_reward(small_run):
    """Measured: cost 15.1 -> 0 from step 10 on (d = 2; lam at its bound in steps 4-13, while the
    buffer holds the unsafe start's states), reward 0.19 -> 0.33 (mean of the last 3 steps) once
    the E-step is feasible again (lam = 0 from step 14)."""
    task, seq = small_run
    d = task.params["d"][0]
    cost, reward = seq["cost"][:, 0], seq["reward"]
    print("cost", np.round(cost, 2), "reward", np.round(reward, 3), "lam", seq["u"][:, 0])
    assert cost[0] > 4 * d                                  # unsafe start
    assert cost[-3:].mean() <= d                            # below the limit at the end
    assert reward[-3:].mean() > reward[0] + 0.05            # and more reward than at the start
    assert np.isfinite(seq["eta"][1:]).all() and (seq["estep_kl"][1:] == pytest.approx(0.1, rel=1e-6))
    assert (seq["mstep_kl_mean"][1:] < 3 * 0.02).all()      # each step stays near its trust region


def test_cvpo_state_checkpoints_and_resumes_bit_for_bit(small_run):
    """Two steps, torch.save(vars(state)) and the policy, a fresh operator from the loaded files,
    two more steps: the same values as the uninterrupted run (same seeds) at every step."""
    from types import SimpleNamespace

    from safemeta.policies import policy_from_checkpoint

    _, seq = small_run
    operator, task, policy = _small_run_setup()
    state = operator.start(task, policy, 7)
    rows = []

    def advance(op, st, pol, k):
        obs = op.observe(st, pol, seed_of(k))
        step = op.step(st, pol, obs)
        rows.append((obs.reward, obs.cost[0], step.u[0], step.kl, step.record["eta"], step.record["mstep_kl_mean"]))
        return step.policy

    for k in range(2):
        policy = advance(operator, state, policy, k)
    buffer = io.BytesIO()
    torch.save({"state": vars(state), "policy": policy.to_checkpoint()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    operator, _, _ = _small_run_setup()
    state, policy = SimpleNamespace(**saved["state"]), policy_from_checkpoint(saved["policy"])
    for k in range(2, 4):
        policy = advance(operator, state, policy, k)
    expected = [(seq["reward"][k], seq["cost"][k, 0], seq["u"][k + 1, 0], seq["kl"][k + 1], seq["eta"][k + 1],
                 seq["mstep_kl_mean"][k + 1]) for k in range(4)]
    np.testing.assert_array_equal(np.array(rows), np.array(expected))


def test_particle_values_are_the_critics_at_every_particle():
    """QEnsemble.particles (first layer's state part once per state, activations in place) gives
    each member's Q at every (state, particle): `forward` on the repeated rows, and bit for bit
    the same layers composed without the in-place shortcuts."""
    from safemeta.adaptation.cvpo import QEnsemble

    g = torch.Generator().manual_seed(3)
    critics = QEnsemble(5 + 2, (32, 16), 3, g)
    obs, actions = torch.randn(7, 5, generator=g), torch.randn(7, 4, 2, generator=g)
    values = critics.particles(obs, actions)
    assert values.shape == (3, 7, 4)
    with torch.no_grad():
        repeated = critics(obs.repeat_interleave(4, 0), actions.reshape(28, 2)).reshape(3, 7, 4)
        torch.testing.assert_close(values, repeated, rtol=1e-6, atol=1e-6)
        h = critics._first(obs)[:, :, None] + critics._first(actions.reshape(28, 2), 5).reshape(3, 7, 4, 32)
        composed = critics._head(h.reshape(3, 28, 32)).reshape(3, 7, 4)
    assert torch.equal(values, composed)
    assert not values.requires_grad
