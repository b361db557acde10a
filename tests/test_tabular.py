"""Tabular CMDPs: validation, exact evaluation against independent computations, task families."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from conftest import random_cmdp, softmax
from safemeta.tasks import TaskParamError, get_distribution
from safemeta.tasks.base import round_trip
from safemeta.tasks.tabular import TabularCMDP, evaluate, evaluate_torch, optimal_value


def test_validation_names_the_bad_argument():
    m = random_cmdp(0)
    bad_P = m.P.copy()
    bad_P[1, 2, 0] += 0.3
    cases = {
        "P is not row-stochastic": dict(P=bad_P),
        "c must be non-negative": dict(c=-m.c),
        "r must have shape": dict(r=m.r[:, :2]),
        "rho must be a probability vector": dict(rho=m.rho * 2),
        "gamma must be in [0, 1)": dict(gamma=1.0),
        "d must have shape [p]": dict(d=np.zeros(3)),
        "c must be a 3-d array": dict(c=m.c[0]),
        "P must have shape [S, A, S]": dict(P=m.P[:, :, :3]),
    }
    for message, change in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            dataclasses.replace(m, **change)


def _iterative_values(m: TabularCMDP, probs: np.ndarray, signal: np.ndarray, sweeps: int = 2000) -> np.ndarray:
    V = np.zeros(m.num_states)
    for _ in range(sweeps):  # Bellman expectation backups, independent of the linear solve
        V = (probs * (signal + m.gamma * m.P @ V)).sum(1)
    return V


def test_evaluate_matches_bellman_backups_and_identities(rng):
    m = random_cmdp(1, S=6, A=4, p=2)
    probs = softmax(rng.normal(size=(6, 4)))
    ev = evaluate(m, probs)
    np.testing.assert_allclose(ev.V, _iterative_values(m, probs, m.r), atol=1e-10)
    for i in range(2):
        np.testing.assert_allclose(ev.Vc[i], _iterative_values(m, probs, m.c[i]), atol=1e-10)
    np.testing.assert_allclose((probs * ev.A).sum(1), 0.0, atol=1e-12)          # E_pi A = 0
    np.testing.assert_allclose(ev.Q, m.r + m.gamma * m.P @ ev.V, atol=1e-12)
    assert np.isclose(ev.nu.sum(), 1.0) and (ev.nu >= (1 - m.gamma) * m.rho - 1e-15).all()
    # J = E_nu E_pi r / (1 - gamma): visitation and values agree
    assert np.isclose(ev.J, (ev.nu * (probs * m.r).sum(1)).sum() / (1 - m.gamma))
    assert np.allclose(ev.Jc, (ev.nu * (probs * m.c).sum(2)).sum(1) / (1 - m.gamma))


def test_policy_gradient_theorem_holds_for_exact_evaluation(rng):
    """Lemma 3: grad J = E_{nu, pi}[grad f A] / (1 - gamma) with f = log pi; autograd agrees."""
    m = random_cmdp(2)
    phi = torch.tensor(rng.normal(size=(5, 3)), requires_grad=True)
    ev = evaluate_torch(m, torch.softmax(phi, -1))
    auto = torch.autograd.grad(ev.J, phi)[0].numpy()
    pi = torch.softmax(phi, -1).detach().numpy()
    A, nu = ev.A.detach().numpy(), ev.nu.detach().numpy()
    formula = nu[:, None] * pi * A / (1 - m.gamma)  # d log pi(a|s)/d phi[s,b] = 1[a=b] - pi(b|s)
    np.testing.assert_allclose(auto, formula, atol=1e-12)


def test_optimal_value_matches_linear_program():
    from scipy.optimize import linprog

    m = random_cmdp(3, S=5, A=3)
    J_best, _ = optimal_value(m, 0, maximize=True)
    # primal LP over occupancy measures x[s,a] >= 0: sum_a x(s',a) - gamma sum x P(s'|s,a) = rho(s')
    S, A = m.num_states, m.num_actions
    A_eq = np.zeros((S, S * A))
    for s in range(S):
        for a in range(A):
            A_eq[:, s * A + a] -= m.gamma * m.P[s, a]
            A_eq[s, s * A + a] += 1.0
    lp = linprog(-m.r.reshape(-1), A_eq=A_eq, b_eq=m.rho, bounds=(0, None))
    assert np.isclose(J_best, -lp.fun, atol=1e-8)


@pytest.mark.parametrize("name", ["tabular_grid", "tabular_random"])
def test_families_are_seeded_and_round_trip(name):
    dist = get_distribution(name)
    a, b, c = dist.sample(4, 7), dist.sample(4, 7), dist.sample(4, 8)
    assert [t.to_json() for t in a] == [t.to_json() for t in b]
    assert [t.to_json() for t in a] != [t.to_json() for t in c]
    for task in a:
        again = round_trip(task)
        json.dumps(task.to_json())
        m1, m2 = dist.cmdp(task), dist.cmdp(again)
        np.testing.assert_array_equal(m1.P, m2.P)
        np.testing.assert_array_equal(m1.d, m2.d)


@pytest.mark.parametrize("name", ["tabular_grid", "tabular_random"])
def test_limits_lie_between_the_safest_and_the_uniform_policy_scaled(name):
    dist = get_distribution(name, limit_fraction=[0.9, 1.3])
    for task in dist.sample(5, 0):
        m = dist.cmdp(task)
        lowest = optimal_value(m, 1, maximize=False)[0]
        uniform = evaluate(m, np.full((m.num_states, m.num_actions), 1 / m.num_actions)).Jc[0]
        kappa = (m.d[0] - lowest) / (uniform - lowest)
        assert 0.9 - 1e-9 <= kappa <= 1.3 + 1e-9


def test_gridworld_reward_and_cost_definitions():
    dist = get_distribution("tabular_grid", size=3, n_hazards=1, slip=0.0)
    task = dist.sample(1, 0)[0]
    params = dict(task.params, goal=[2, 2], hazards=[[0, 1]])
    m = dist._build(params)
    right, down = 1, 2
    assert m.c[0, 0, right] == 1.0 and m.r[0, right] == 0.0        # (0,0) -> (0,1) is the hazard
    assert m.r[5, down] == 1.0 and m.c[0, 5, down] == 0.0          # (1,2) -> (2,2) is the goal
    np.testing.assert_allclose(m.P[8], np.broadcast_to(m.rho, (4, 9)))  # the goal restarts
    assert m.r[8].sum() == 0.0


def test_bad_task_params_raise_clear_errors():
    dist = get_distribution("tabular_grid", size=4)
    task = dist.sample(1, 0)[0]
    bad = dataclasses.replace(task, params=dict(task.params, goal=[9, 9]))
    with pytest.raises(TaskParamError, match="goal cell"):
        dist.validate(bad)
    with pytest.raises(TaskParamError, match="n_hazards"):
        get_distribution("tabular_grid", size=3, n_hazards=20)
    with pytest.raises(TaskParamError, match="unknown option .sizee."):
        get_distribution("tabular_grid", sizee=3)


def test_sampled_batch_env_estimates_exact_values():
    """Monte-Carlo discounted returns of the BatchEnv agree with the exact J within 4 standard errors."""
    dist = get_distribution("tabular_random", num_states=5, horizon=150)
    task = dist.sample(1, 0)[0]
    m = dist.cmdp(task)
    probs = torch.from_numpy(softmax(np.random.default_rng(0).normal(size=(5, 3))))
    env = dist.make_env(task, num_envs=4000, seed=0)
    gen = torch.Generator().manual_seed(1)
    obs = env.reset()
    ret = torch.zeros(4000, dtype=torch.float64)
    cost = torch.zeros(4000, dtype=torch.float64)
    for t in range(env.horizon):
        state = obs.argmax(1)
        action = torch.multinomial(probs[state], 1, generator=gen).squeeze(1)
        step = env.step(action)
        ret += m.gamma ** t * step.reward.double()
        cost += m.gamma ** t * step.cost[:, 0].double()
        obs = step.obs
    assert step.truncated.all()
    ev = evaluate(m, probs.numpy())
    se = ret.std() / 4000 ** 0.5
    assert abs(float(ret.mean()) - ev.J) < 4 * float(se) + m.gamma ** env.horizon * 10
    assert abs(float(cost.mean()) - ev.Jc[0]) < 4 * float(cost.std() / 4000 ** 0.5) + m.gamma ** env.horizon * 10
