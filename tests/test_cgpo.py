"""CGPO (Dai et al. 2024): the closed-form sub-problem against a generic solver, GBE's first-order
error (Lemma 4.1), the radius rule (eq. 18), and a seeded run on FunctionEnv."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from safemeta.adaptation.cgpo import CGPOSettings, next_radius, solve_subproblem
from safemeta.adaptation.gbe import estimate
from safemeta.config import load_config, settings
from safemeta.plugins import build_learner, build_operator, build_scenario
from safemeta.policies import GaussianMLPPolicy
from safemeta.tasks import Task, get_distribution


def _slsqp(objective: np.ndarray, q: np.ndarray, c: float, radius: float, plane: bool) -> np.ndarray:
    """max objective.delta over the ball (and the half-space c + q.delta <= 0 when `plane`), by
    SLSQP on the problem rescaled to the unit ball and unit vectors (its tolerances are absolute)."""
    scale = math.sqrt(radius)
    o_hat, q_norm = objective / max(np.linalg.norm(objective), 1e-300), np.linalg.norm(q)
    q_hat, c_hat = q / q_norm, c / (q_norm * scale)
    constraints = [{"type": "ineq", "fun": lambda x: 1.0 - x @ x, "jac": lambda x: -2.0 * x}]
    if plane:
        constraints.append({"type": "ineq", "fun": lambda x: -(c_hat + q_hat @ x), "jac": lambda x: -q_hat})
    res = minimize(lambda x: -o_hat @ x, np.zeros_like(q), jac=lambda x: -o_hat, constraints=constraints,
                   method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
    return res.x * scale


def _instance(rng: np.random.Generator, want: str):
    """A random sub-problem of case `want`, with degenerate gradients mixed in (g parallel to q,
    g = 0, g orthogonal to q, c = 0)."""
    n = int(rng.integers(1, 12))
    g = rng.normal(size=n) * 10 ** rng.uniform(-3, 3)
    q = rng.normal(size=n) * 10 ** rng.uniform(-3, 3)
    special = rng.integers(0, 8)
    if special == 0:
        g = q * rng.normal()
    elif special == 1:
        g = np.zeros(n)
    elif special == 2 and n > 1:
        g = g - (g @ q) / (q @ q) * q
    radius = 10 ** rng.uniform(-4, 0)
    ratio = rng.uniform(0, 1) if want == "c" else rng.uniform(1.01, 10)   # c^2 / (t radius)
    sign = {"a": 1.0, "b": -1.0, "c": rng.choice([-1.0, 1.0])}[want]
    c = 0.0 if (want == "c" and special == 3) else sign * math.sqrt(ratio * radius * (q @ q))
    return g, q, c, radius


@pytest.mark.parametrize("want", ["a", "b", "c"])
def test_solve_subproblem_matches_a_generic_solver(want):
    """Thousands of random instances per case: the case of Thm. 5.1 / Cor. 5.2, constraints held to
    1e-9, and the objective (case a: of the recovery problem min q.delta over the ball) within
    1e-6 of SLSQP's, relative to sqrt(radius) ||objective||."""
    rng = np.random.default_rng({"a": 1, "b": 2, "c": 3}[want])
    for _ in range(1000):
        g, q, c, radius = _instance(rng, want)
        delta, case = solve_subproblem(g, q, c, radius)
        assert case == want
        assert delta @ delta <= radius * (1 + 1e-9)
        objective = -q if case == "a" else g
        if case != "a":
            assert c + q @ delta <= 1e-9 * (abs(c) + np.linalg.norm(q) * math.sqrt(radius))
        reference = _slsqp(objective, q, c, radius, plane=case != "a")
        scale = math.sqrt(radius) * np.linalg.norm(objective) or 1.0
        assert objective @ delta == pytest.approx(objective @ reference, abs=1e-6 * scale)


def test_the_recovery_step_decreases_the_linearised_constraint_by_the_radius():
    q = np.array([3.0, 4.0])
    delta, case = solve_subproblem(np.array([1.0, 0.0]), q, 1.0, 0.01)   # c^2/t = 0.04 > 0.01, c > 0
    assert case == "a"
    np.testing.assert_allclose(q @ delta, -math.sqrt(0.01) * 5.0)        # -sqrt(radius) ||q|| (eq. 33)


def _cgpo_settings(**changes) -> CGPOSettings:
    return settings(CGPOSettings, **changes)


def test_radius_rule_of_eq18():
    s = _cgpo_settings(radius_lower=1e-4, radius_upper=1e-2, beta1=0.8, beta2=1.25, eta1=0.25, eta2=0.75)
    assert next_radius(1e-3, 0.9, 0.8, s) == pytest.approx(1.25e-3)       # both ratios >= eta2: grow
    assert next_radius(1e-3, 0.1, 5.0, s) == pytest.approx(0.8e-3)        # rho < eta1: shrink
    assert next_radius(1e-3, 0.9, 0.1, s) == pytest.approx(0.8e-3)        # zeta < eta1: shrink
    assert next_radius(1e-3, 0.5, 5.0, s) == 1e-3                         # in between: keep
    assert next_radius(1e-3, math.nan, 5.0, s) == 1e-3                    # no predicted change: keep
    assert next_radius(1.1e-4, 0.1, 5.0, s) == 1e-4                       # clipped to the bounds
    assert next_radius(9e-3, 0.9, 0.9, s) == 1e-2


def test_gbe_first_order_error_shrinks_quadratically_with_the_step():
    """Lemma 4.1 on FunctionEnv: |J(theta + eps v) - J(theta) - eps grad J . v| ~ eps^2 (the
    episodes fixed: same initial states and action noise), so halving eps quarters the error;
    and the gradient itself matches central finite differences."""
    dist = get_distribution("function_env", horizon=20, dtype="float64")
    task = Task("function_env", {"shift": 0.3, "d": [dist.cost_limit]})
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(1, 1, (16,), -0.5).double()

    def run() -> tuple[float, torch.Tensor]:
        est = estimate(dist.make_env(task, 16, 1), policy, None, 20, torch.Generator().manual_seed(2))
        return est.cost, est.q

    j0, q = run()
    theta = policy.flat()
    v = torch.randn(theta.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    v /= v.norm()

    def cost_at(step: float) -> float:
        policy.load_flat(theta + step * v)
        value = run()[0]
        policy.load_flat(theta)
        return value

    fd = (cost_at(1e-6) - cost_at(-1e-6)) / 2e-6
    assert float(q @ v) == pytest.approx(fd, rel=1e-5)
    errors = [abs(cost_at(eps) - j0 - eps * float(q @ v)) for eps in (0.02, 0.01)]
    assert errors[0] > 0 and 3.0 < errors[0] / errors[1] < 5.0


def _function_env_config(**adaptation) -> dict:
    return load_config({
        "device": "cpu",
        "scenarios": {"f": {"distribution": "function_env", "rollouts": 256,
                            "policy": {"hidden": [32, 32], "init_log_std": -1.5}}},
        "learners": {"cgpo": {"algorithm": "cgpo", "iterations": 20, "n_tasks": 1, "adaptation": adaptation}}})


def test_cgpo_recovers_from_an_infeasible_start_and_tracks_the_limit():
    """FunctionEnv (shift 0, T = 100, b = 8), BPTT gradients (window = T), 256 episodes per step
    (the standard error of J_C is about 0.3 there). The fresh policy starts infeasible (J_C ~ 14):
    case (a) fires, J_C <= b within 6 steps; from then on every J_C stays below b + 0.8 (10%)
    while J_R = J_C rises back to the limit (last 10 steps within 0.4 of b on average)."""
    config = _function_env_config(window=100)
    dist = get_distribution("function_env")
    scenario = build_scenario(config, "f", dist, "cpu")
    out = build_learner(config, scenario, "cgpo").run([Task("function_env", {"shift": 0.0, "d": [8.0]})], seed=0)
    cost, reward, case = out["cost"][0, :, 0], out["reward"][0], out["case"][0]
    np.testing.assert_array_equal(cost, reward)                 # FunctionEnv: reward = cost
    assert cost[0] > 8.0 + 2.0 and case[1] == 0                 # infeasible start: recovery step
    first = int(np.argmax(cost <= 8.0))
    assert cost[first] <= 8.0 and first <= 6
    assert cost[first:].max() <= 8.0 + 0.8
    assert abs(cost[-10:].mean() - 8.0) <= 0.4
    assert np.isfinite(out["radius"][0, 1:]).all() and (out["radius"][0, 1:] >= 1e-4 - 1e-15).all()


def test_meta_test_adapter_cgpo_runs_on_a_differentiable_scenario():
    """A sampled meta-learner's network policy can be meta-tested with the differentiable operator."""
    config = load_config({"device": "cpu", "scenarios": {"p": {"distribution": "point_circle_diff",
                                                               "task_options": {"horizon": 20}, "rollouts": 4}},
                          "methods": {"m": {"algorithm": "safemeta"}}, "metatest": {"adapter": "cgpo"}})
    scenario = build_scenario(config, "p", get_distribution("point_circle_diff", horizon=20), "cpu")
    assert type(build_operator(config, "meta_test", scenario, "m")).__name__ == "CGPO"


def test_convergence_step_checks_the_whole_window_unlike_the_printed_code():
    from safemeta.curves import convergence_step, printed_convergence_step

    steps = np.arange(8) * 100
    returns = np.array([0.0, 0.05, 5.0, 9.0, 9.1, 9.05, 9.1, 9.0])     # steps 0-1 agree, then it climbs
    constraints = np.zeros(8)
    assert printed_convergence_step(steps, returns, constraints, 1.0, 4, 0.2) == 0   # compared returns[1] only
    assert convergence_step(steps, returns, constraints, 1.0, 4, 0.2) == 300
    infeasible = constraints.copy()
    infeasible[3] = 2.0                                                 # the point must be feasible
    assert convergence_step(steps, returns, infeasible, 1.0, 4, 0.2) == 400
    assert convergence_step(steps, returns, constraints, 1.0, 6, 0.2) == -1          # no complete window


def test_violation_ratio_counts_violations_in_the_critical_area():
    from safemeta.curves import violation_ratio

    costs = np.array([1.0, 7.5, 7.9, 8.05, 8.3, 9.0])
    assert violation_ratio(costs, 8.0, 1.0, 0.1) == pytest.approx(2 / 5)   # 8.3, 9.0 > 8.1; five above 7.0
    assert violation_ratio(costs, 8.0, 1.0, np.array([0, 0, 0, 0, 0.5, 1.5])) == pytest.approx(1 / 5)  # 8.05 only
    assert violation_ratio(np.array([1.0, 2.0]), 8.0, 1.0, 0.1) == -1.0


def test_a_learner_runs_on_a_scenario_with_metatrain_overrides():
    """The scenario's metatrain overrides are the meta-learners' business, not a learner's."""
    config = load_config({"scenarios": {"p": {"distribution": "point_circle_diff", "metatrain": {"tasks_per_iteration": 3}}},
                          "methods": {"m": {"algorithm": "safemeta"}},
                          "learners": {"c": {"algorithm": "cgpo", "scenarios": ["p"]}}})
    assert config["learners"]["c"]["algorithm"] == "cgpo"
