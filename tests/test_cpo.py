"""CPO (the closed form against scipy, the exact and sampled steps) and Meta-CPO's meta-gradients
against central finite differences."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from conftest import random_cmdp, scenario_of, softmax, with_limits_near
from safemeta.adaptation.cpo import (CONSTRAINED, RECOVERY, REWARD, BatchSurrogates, ExactCPOSettings,
                                     SampledCPOSettings, cpo_solution, cpo_step, exact_cpo_step, sampled_cpo_step)
from safemeta.config import settings
from safemeta.meta.meta_cpo import adapted_values, meta_gradient
from safemeta.optim import fisher_vector_product
from safemeta.tasks import get_distribution
from safemeta.tasks.tabular import evaluate

MAX_KL = 0.01


# --------------------------------------------------------------------------- the closed form vs scipy
def _scipy_reference(g, b, c, F, max_kl):
    """SLSQP on the problem itself; the recovery step as argmin b.x over the trust region."""
    ball = {"type": "ineq", "fun": lambda x: max_kl - 0.5 * x @ F @ x, "jac": lambda x: -F @ x}
    options = {"ftol": 1e-14, "maxiter": 1000}
    lowest = scipy.optimize.minimize(lambda x: b @ x, np.zeros(len(g)), jac=lambda x: b, constraints=[ball],
                                     method="SLSQP", options=options)
    if c + lowest.fun > 0:                  # no point of the trust region satisfies the constraint
        return lowest.x, False
    plane = {"type": "ineq", "fun": lambda x: -(c + b @ x), "jac": lambda x: -b}
    res = scipy.optimize.minimize(lambda x: -g @ x, np.zeros(len(g)), jac=lambda x: -g, constraints=[ball, plane],
                                  method="SLSQP", options=options)   # may stop at rounding level: x is compared
    return res.x, True


def test_cpo_step_matches_scipy_in_every_case():
    """600 random instances (n = 6, F = M M^T + 0.5 I): c drawn so that the linearised constraint is
    infeasible in the trust region, holds on all of it, or cuts it with c < 0, c > 0 and c = 0;
    where it cuts, the optimum is interior to the half-space (nu* = 0) or on the plane (nu* > 0)."""
    rng = np.random.default_rng(0)
    n = 6
    seen = {"recovery": 0, "whole region": 0, "nu = 0": 0, "nu > 0": 0, "c = 0": 0}
    for i in range(600):
        M = rng.normal(size=(n, n))
        F = M @ M.T + 0.5 * np.eye(n)
        g, b = rng.normal(size=n), rng.normal(size=n)
        reach = np.sqrt(2 * MAX_KL * b @ np.linalg.solve(F, b))   # max of |b.x| over the trust region
        c = reach * [rng.uniform(1.05, 3), -rng.uniform(1.05, 3), -rng.uniform(0.05, 0.95),
                     rng.uniform(0.05, 0.95), 0.0][i % 5]
        ref, feasible = _scipy_reference(g, b, c, F, MAX_KL)
        sol = cpo_solution(g, b, c, F, MAX_KL)
        x = cpo_step(g, b, c, F, MAX_KL)
        np.testing.assert_allclose(x, ref, atol=2e-6, err_msg=f"instance {i} (c = {c:.4g}, case {sol.case})")
        if not feasible:
            assert sol.case == RECOVERY
            seen["recovery"] += 1
            continue
        assert c + b @ x <= 1e-10 and 0.5 * x @ F @ x <= MAX_KL * (1 + 1e-10)
        on_plane = abs(c + b @ x) < 1e-8
        assert sol.case == (CONSTRAINED if on_plane else REWARD), f"instance {i}"
        assert (sol.nu > 0) == on_plane
        key = "c = 0" if c == 0 else "whole region" if c < -reach else "nu > 0" if on_plane else "nu = 0"
        seen[key] += 1
    assert min(seen.values()) >= 60, seen


def test_cpo_step_rejects_a_matrix_that_is_not_symmetric_positive_definite():
    with pytest.raises(ValueError, match="positive definite"):
        cpo_step(np.ones(2), np.ones(2), 0.0, np.diag([1.0, -1.0]), MAX_KL)
    with pytest.raises(ValueError, match="not symmetric"):
        cpo_step(np.ones(2), np.ones(2), 0.0, np.array([[1.0, 0.5], [0.0, 1.0]]), MAX_KL)
    with pytest.raises(ValueError, match="vectors"):
        cpo_step(np.ones(2), np.ones(3), 0.0, np.eye(2), MAX_KL)


# --------------------------------------------------------------------------- the operator's steps
def _exact_gradient(m, logits, which):
    """Central differences of J (which = 0) or J_c (which = 1) in the logits."""
    out = np.zeros_like(logits)
    for idx in np.ndindex(*logits.shape):
        values = []
        for sign in (1.0, -1.0):
            shifted = logits.copy()
            shifted[idx] += sign * 1e-6
            ev = evaluate(m, softmax(shifted))
            values.append(ev.J if which == 0 else ev.Jc[0])
        out[idx] = (values[0] - values[1]) / 2e-6
    return out.reshape(-1)


@pytest.mark.parametrize("margin, case", [(0.3, REWARD), (0.02, CONSTRAINED), (-0.3, RECOVERY)])
def test_exact_step_is_the_closed_form_of_the_exact_linearisation(margin, case):
    """The exact operator's step is cpo_step on g, b from finite differences of J, J_c, c = J_c - d
    and the softmax Fisher sum_s nu(s) (diag pi_s - pi_s pi_s^T) (made definite by the projector on
    its null space, the per-state shifts, which no gradient has a component along); its line
    search keeps the mean KL within max_kl and, from a safe policy, the cost surrogate within d."""
    m0 = random_cmdp(3, S=5, A=3, correlation=0.7)
    logits = np.random.default_rng(3).normal(size=(5, 3)) * 0.5
    m = with_limits_near(m0, logits, np.array([margin]))
    op = settings(ExactCPOSettings, max_kl=MAX_KL)
    result = exact_cpo_step(m, torch.from_numpy(logits), op)
    assert result.direction.case == case
    ev = evaluate(m, softmax(logits))
    pi = softmax(logits)
    F = np.zeros((15, 15))
    for s in range(5):
        F[3 * s:3 * s + 3, 3 * s:3 * s + 3] = ev.nu[s] * (np.diag(pi[s]) - np.outer(pi[s], pi[s])) + 1.0 / 3
    x = cpo_step(_exact_gradient(m, logits, 0), _exact_gradient(m, logits, 1), ev.Jc[0] - m.d[0], F, MAX_KL)
    np.testing.assert_allclose(softmax(logits + result.direction.x.numpy().reshape(5, 3)),
                               softmax(logits + x.reshape(5, 3)), atol=1e-7)
    assert result.fraction > 0 and result.kl <= MAX_KL
    new = evaluate(m, softmax(result.params.numpy()))
    assert result.kl == pytest.approx(float((ev.nu * (pi * np.log(pi / softmax(result.params.numpy()))).sum(1)).sum()))
    if margin > 0:
        assert result.predicted_cost <= m.d[0] and new.J > ev.J
    else:
        assert result.predicted_cost < ev.Jc[0] and new.Jc[0] < ev.Jc[0]


def _small_batch(horizon=30, rollouts=8, hidden=(2,)):
    """A float64 batch of a tiny Gaussian policy on one point_circle_diff task."""
    dist = get_distribution("point_circle_diff", horizon=horizon, dtype="float64")
    scenario = scenario_of(dist, rollouts=rollouts)
    scenario.policy_options = {"hidden": list(hidden), "init_log_std": -0.5}
    task = dist.sample(1, 0)[0]
    policy = scenario.fresh_policy(task, 0, "sampled").double()
    return policy, scenario.rollout(task, policy, 1)


@pytest.mark.parametrize("shift, case", [(0.5, REWARD), (-0.02, CONSTRAINED), (-5.0, RECOVERY)])
def test_sampled_step_is_the_closed_form_with_the_dense_fisher(shift, case):
    """With conjugate gradient run to convergence, the sampled step equals cpo_step on the policy
    gradients of the batch (REINFORCE with returns-to-go), c = J_c - d and the damped Fisher
    assembled column by column from optim.fisher_vector_product."""
    from safemeta.rollout import time_baseline

    policy, batch = _small_batch()
    limit = float(batch.constraint_value[0]) + shift
    op = settings(SampledCPOSettings, max_kl=MAX_KL, cg_iters=100)
    result = sampled_cpo_step(BatchSurrogates(policy, batch, limit), policy.flat(), op, residual_tol=1e-30)
    assert result.direction.case == case

    alive = batch.alive
    obs, actions = batch.obs[alive], batch.actions[alive]
    params = list(policy.parameters())
    logp = policy.log_prob(obs, actions)
    adv = (batch.q_reward - time_baseline(batch.q_reward, alive))[alive]
    ctg = batch.cost_to_go[..., 0]
    cost_adv = (ctg - time_baseline(ctg, alive))[alive]
    flat = lambda grads: torch.cat([v.reshape(-1) for v in grads]).numpy()  # noqa: E731
    g = flat(torch.autograd.grad((batch.discount[alive] * adv * logp).sum() / batch.num_rollouts, params,
                                 retain_graph=True))
    b = flat(torch.autograd.grad((batch.constraint_discount[alive] * cost_adv * logp).sum() / batch.num_rollouts,
                                 params))
    fvp = fisher_vector_product(policy, obs, batch.visitation()[alive])
    P = g.size
    F = np.stack([fvp(torch.eye(P, dtype=torch.float64)[i]).numpy() for i in range(P)], 1) + op.cg_damping * np.eye(P)
    x = cpo_step(g, b, float(batch.constraint_value[0]) - limit, 0.5 * (F + F.T), MAX_KL)
    np.testing.assert_allclose(result.direction.x.numpy(), x, rtol=1e-6, atol=1e-9 * np.abs(x).max())
    assert result.fraction > 0 and result.kl <= MAX_KL


# --------------------------------------------------------------------------- meta-gradients
H = 1e-6


@pytest.mark.parametrize("margin, case", [(0.3, REWARD), (0.05, CONSTRAINED), (-0.3, RECOVERY)])
def test_exact_meta_gradient_matches_finite_differences(margin, case):
    """d J_tau(T_tau(phi)) / d phi and d J_c,tau(T_tau(phi)) / d phi through the exact CPO step, in each
    of its cases, against central differences of the adapted policy's exact J and J_c."""
    seed = {REWARD: 3, CONSTRAINED: 0, RECOVERY: 2}[case]
    m0 = random_cmdp(seed, S=5, A=3, correlation=0.7)
    logits = np.random.default_rng(seed).normal(size=(5, 3)) * 0.5
    m = with_limits_near(m0, logits, np.array([margin]))
    op = settings(ExactCPOSettings, max_kl=MAX_KL)
    mg = meta_gradient(m, logits, op)
    assert mg.inner.direction.case == case and mg.inner.fraction > 0
    for which, grad in ((0, mg.grad), (1, mg.cost_grad)):
        ref = np.zeros_like(logits)
        for idx in np.ndindex(*logits.shape):
            values = []
            for sign in (1.0, -1.0):
                shifted = logits.copy()
                shifted[idx] += sign * H
                J, Jc, inner = adapted_values(m, torch.from_numpy(shifted), op)
                assert (inner.direction.case, inner.fraction) == (case, mg.inner.fraction), "a smooth piece"
                values.append(float((J, Jc)[which]))
            ref[idx] = (values[0] - values[1]) / (2 * H)
        assert np.linalg.norm(grad - ref) < 1e-6 * np.linalg.norm(ref), ("J", "J_c")[which]
    no_fisher = meta_gradient(m, logits, op, fisher_derivative=False)
    assert np.linalg.norm(no_fisher.grad - mg.grad) > 1e-3 * np.linalg.norm(mg.grad)


@pytest.mark.parametrize("shift, case", [(0.5, REWARD), (-0.02, CONSTRAINED), (-5.0, RECOVERY)])
def test_sampled_step_derivative_matches_finite_differences(shift, case):
    """The reverse-mode derivative of the sampled CPO step on a fixed batch (F^-1 by the implicit
    function theorem, the Fisher's own derivative included) against central differences of the
    step, v . T(theta); without the Fisher's derivative it is visibly different."""
    policy, batch = _small_batch()
    surrogates = BatchSurrogates(policy, batch, float(batch.constraint_value[0]) + shift)
    op = settings(SampledCPOSettings, max_kl=MAX_KL, cg_iters=100)
    theta = policy.flat()
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = {}
    for fisher_derivative in (True, False):
        th = theta.clone().requires_grad_()
        step = sampled_cpo_step(surrogates, th, op, differentiable=True, fisher_derivative=fisher_derivative,
                                residual_tol=1e-30)
        assert step.direction.case == case
        grads[fisher_derivative] = torch.autograd.grad(step.params @ v, th)[0]
    ref = torch.zeros_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = H
        up, down = (sampled_cpo_step(surrogates, theta + s * e, op, residual_tol=1e-30) for s in (1, -1))
        assert up.fraction == down.fraction == step.fraction and up.direction.case == down.direction.case == case
        ref[i] = ((up.params - down.params) @ v) / (2 * H)
    assert float((grads[True] - ref).norm()) < 1e-6 * float(ref.norm())
    assert float((grads[False] - ref).norm()) > 1e-2 * float(ref.norm())


def test_exact_meta_cpo_learns_on_a_tabular_family():
    """Meta-CPO on tabular_random: the one-step adapted reward on the test tasks rises over the
    iterations (a wrong sign or scale of the meta-gradient or of the outer step would not)."""
    from safemeta.config import load_config
    from safemeta.meta.base import train
    from safemeta.plugins import build_meta_learner, build_scenario

    config = load_config({"seeds": [0], "device": "cpu", "scenarios": {"s": {
        "distribution": "tabular_random", "task_options": {"num_states": 6, "num_actions": 3},
        "n_train_tasks": 8, "n_test_tasks": 4}}, "methods": {"m": {"algorithm": "meta_cpo"}},
        "metatrain": {"iterations": 12, "tasks_per_iteration": 4}})
    dist = get_distribution("tabular_random", num_states=6, num_actions=3)
    scenario = build_scenario(config, "s", dist, "cpu")
    learner = build_meta_learner(config, scenario, "m", dist.sample(8, (0, 0)), dist.sample(4, (0, 1)), seed=0)
    records = train(learner, learner.initial_state()).records
    adapted = np.array([np.mean(r["reward"]) for r in records])     # measured: 5.28 at phi_0, 7.41 at phi_12
    assert (np.diff(adapted) > 0).all() and adapted[-1] - adapted[0] > 1.5
    assert all(r["step_accepted"] and r["meta_constraint"] < 0 for r in records[:-1])
