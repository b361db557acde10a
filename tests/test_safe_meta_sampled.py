"""Alg. 4 on a small continuous task: TRPO step, learning, anytime safety, determinism, resume."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from conftest import OneCMDP, finite_horizon_values, random_cmdp, scenario_of
from safemeta.adaptation.dual_pgd_sampled import SampledAdaptationSettings, SampledDualPGD
from safemeta.config import settings
from safemeta.evaluate import meta_test
from safemeta.meta.base import train as run_training
from safemeta.meta.safe_meta import SampledMetaTrainSettings, SampledSafeMeta
from safemeta.optim import fisher_vector_product, flat_grad, trpo_step
from safemeta.policies import policy_from_checkpoint
from safemeta.tasks import Task, get_distribution

LIMIT = 30.0
ADAPT = settings(SampledAdaptationSettings, lam=0.5, lam_c=0.5)
TRAIN = settings(SampledMetaTrainSettings, meta_gradient="first_order", iterations=10, tasks_per_iteration=3,
                 max_kl=0.02, cg_iters=10, cg_damping=0.1, eval_every=10)
ROLLOUTS = 16


@pytest.fixture(scope="module")
def problem():
    dist = get_distribution("point_circle_diff", horizon=100, cost_limit=LIMIT)
    return dist, dist.sample(8, (0, 0)), dist.sample(3, (0, 1))


def _learner(problem, seed=0, adaptation=ADAPT, **options):
    dist, train, test = problem
    scenario = scenario_of(dist, rollouts=ROLLOUTS)
    return SampledSafeMeta(scenario, SampledDualPGD(scenario, adaptation), dataclasses.replace(TRAIN, **options),
                           train, test, seed)


def _train(problem, iterations=TRAIN.iterations, state=None, hook=None, seed=0):
    learner = _learner(problem, seed, iterations=iterations)
    return run_training(learner, state or learner.initial_state(), hook)


def _meta_test(problem, policy, steps, seed, delta=0.0):
    dist, _, test = problem
    return meta_test(SampledDualPGD(scenario_of(dist, rollouts=32), dataclasses.replace(ADAPT, delta=delta)), test,
                     policy, steps, seed=seed)


@pytest.fixture(scope="module")
def trained(problem):
    return _train(problem)


def test_trpo_step_on_a_fixed_batch_keeps_the_kl_bound_and_improves_the_surrogate(problem):
    dist, train, _ = problem
    policy = policy_from_checkpoint(_learner(problem).initial_state().policy)
    batch = scenario_of(dist, rollouts=ROLLOUTS).rollout(train[0], policy, seed=3)
    alive = batch.alive
    obs, actions, old = batch.obs[alive], batch.actions[alive], batch.log_prob[alive]
    adv = (batch.q_reward - batch.q_reward.mean(1, keepdim=True))[alive]
    w = batch.visitation()[alive]

    def surrogate(params=None):
        return (w * torch.exp(policy.log_prob(obs, actions, params) - old) * adv).sum()

    grad = flat_grad(surrogate(), list(policy.parameters()))
    with torch.no_grad():
        reference = policy.distribution(obs)
    phi = policy.flat()
    kl = lambda flat: float((w * policy.kl(obs, reference, policy.unflatten(flat))).sum())  # noqa: E731
    objective = lambda flat: float(surrogate(policy.unflatten(flat)))  # noqa: E731
    step = trpo_step(phi, grad, fisher_vector_product(policy, obs, w), objective, kl, 1e-3, damping=0.1)
    assert step.accepted and 0 < step.kl <= 1e-3
    assert objective(step.params) > objective(phi)


def test_meta_training_raises_the_one_step_adapted_reward(trained):
    first, last = trained.records[0], trained.records[-1]
    print("evaluation reward of the one-step adapted policy:", first["reward"].round(2), "->", last["reward"].round(2))
    assert last["reward"].mean() > first["reward"].mean() + 1.0   # measured: 1.17 -> 3.89
    steps = [r for r in trained.records[:-1]]
    assert all(r["step_accepted"] for r in steps) and max(r["step_kl"] for r in steps) <= TRAIN.max_kl
    assert any(r["n_violating"] > 0 for r in steps)               # the CRPO switch acted


def test_meta_test_is_anytime_safe_within_sampling_error(problem, trained):
    """From a meta-policy that is safe on every test task, every adapted policy's cost stays within
    d + 4 standard errors of its estimate (each step aims at d with an estimate of the same noise,
    so realised costs scatter around d by about sqrt(2) SE); without the constraint (delta = 1000)
    the same sequence overshoots that tolerance."""
    policy = policy_from_checkpoint(trained.policy)
    arrays = _meta_test(problem, policy, 4, seed=5)
    cost, se = arrays["cost"][..., 0], arrays["cost_se"][..., 0]
    assert (cost[:, 0] < LIMIT).all(), "the meta-policy should start safe on every test task"
    z = (cost - LIMIT) / se
    print("(cost - d) / SE per task and step:\n", z.round(2))
    assert (z <= 4).all()
    assert (arrays["reward"][:, -1] > arrays["reward"][:, 0]).all()
    unconstrained = _meta_test(problem, policy, 4, seed=5, delta=1000.0)
    assert ((unconstrained["cost"][..., 0] - LIMIT) / unconstrained["cost_se"][..., 0]).max() > 4


def test_same_seed_same_trace_and_resume_is_bit_identical(problem):
    full = _train(problem, iterations=3)
    again = _train(problem, iterations=3)
    for a, b in zip(full.records, again.records):
        for key in a:
            if not key.startswith("time"):
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for name, value in full.policy["state_dict"].items():
        torch.testing.assert_close(value, again.policy["state_dict"][name], rtol=0, atol=0)

    saved = {}

    def dies_after_two(state):
        saved["state"] = copy.deepcopy(state)
        if state.iteration == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(problem, iterations=3, hook=dies_after_two)
    resumed = _train(problem, iterations=3, state=saved["state"])
    for name, value in full.policy["state_dict"].items():
        torch.testing.assert_close(value, resumed.policy["state_dict"][name], rtol=0, atol=0)
    np.testing.assert_array_equal(resumed.records[-1]["reward"], full.records[-1]["reward"])


def test_an_exploding_adaptation_stops_the_run_naming_iteration_and_quantity(problem):
    learner = _learner(problem, adaptation=dataclasses.replace(ADAPT, delta=1e6), iterations=2, kl_limit=1e-9)
    with pytest.raises(FloatingPointError, match=r"iteration 0: adaptation KL .* exceeds kl_limit"):
        run_training(learner, learner.initial_state())


# --------------------------------------------------------------------------- the CRPO switch (lines 4, 10)
HORIZON = 20


def _tabular_iteration(cmdp, d, delta=0.0):
    """Iteration 0 of Alg. 4 on one training task: the CMDP sampled for HORIZON steps (constraint_gamma
    = 1) with limits d; returns its record and the exact HORIZON-step costs before and after the step."""
    scenario = scenario_of(OneCMDP(cmdp, HORIZON), rollouts=100, gamma=cmdp.gamma)
    task = Task("one_cmdp", {"d": list(d)})
    adapt = SampledDualPGD(scenario, dataclasses.replace(ADAPT, delta=delta))
    learner = SampledSafeMeta(scenario, adapt, dataclasses.replace(TRAIN, iterations=1, tasks_per_iteration=1),
                              [task], [task], 0)
    state = learner.initial_state()
    costs = []
    for checkpoint in (state.policy, None):
        if checkpoint is None:
            learner.iteration(state)
            checkpoint = state.policy
        with torch.no_grad():
            probs = policy_from_checkpoint(checkpoint).distribution(torch.eye(cmdp.num_states)).probs.double().numpy()
        costs.append(finite_horizon_values(cmdp, probs, HORIZON, 1.0)[1:])
    return state.records[0], costs


def _uniform_cost(cmdp):
    """Exact HORIZON-step cost of the initial meta-policy of seed 0 (what `_tabular_iteration` starts from)."""
    policy = scenario_of(OneCMDP(cmdp, HORIZON)).fresh_policy(Task("one_cmdp", {"d": [0.0]}), 0, "sampled")
    with torch.no_grad():
        probs = policy.distribution(torch.eye(cmdp.num_states)).probs.double().numpy()
    return finite_horizon_values(cmdp, probs, HORIZON, 1.0)[1:]


@pytest.mark.parametrize("excess,branch", [(1.0, "meta"), (3.0, "cost")])
def test_sampled_switch_allows_the_violation_delta(excess, branch):
    """Line 4: a meta-policy whose estimated cost is above d but within d + delta (delta = 2) is
    adapted and offers the meta-gradient; one above d + delta takes the cost step (lowering J_c)."""
    m = random_cmdp(2, S=4, A=3, p=1, correlation=0.8)
    d = _uniform_cost(m) - excess
    record, costs = _tabular_iteration(m, d, delta=2.0)
    estimate = record["batch_meta_cost"]
    if branch == "meta":
        assert (d < estimate).all() and (estimate <= d + 2.0).all(), (estimate, d)   # the case is what it says
        assert record["n_violating"] == 0 and np.isfinite(record["batch_reward"])
    else:
        assert (estimate > d + 2.0).all(), (estimate, d)
        assert record["n_violating"] == 1 and costs[1][0] < costs[0][0], costs


def test_sampled_switch_descends_the_violated_constraint():
    """Line 10 with p = 2: constraint 0 violated, constraint 1 satisfied, c_1 = 1 - c_0 (so
    J_c1 = HORIZON - J_c0: descending the satisfied cost raises the violated one). The exact
    J_c0 of the meta-policy falls."""
    m = random_cmdp(5, S=4, A=3, p=1)
    m = dataclasses.replace(m, c=np.concatenate([m.c, 1.0 - m.c]), d=np.zeros(2))
    d = _uniform_cost(m) + np.array([-1.0, 1.0])
    record, costs = _tabular_iteration(m, d)
    assert record["n_violating"] == 1 and record["step_accepted"]
    assert costs[1][0] < costs[0][0], costs
