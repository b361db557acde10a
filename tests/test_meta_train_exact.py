"""Exact meta-training (Alg. 2): improvement, the CRPO switch, determinism and resume."""
from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from safemeta.adaptation.dual_pgd import ExactAdaptationSettings, ExactDualPGD
from safemeta.config import settings
from safemeta.meta.base import train as run_training
from safemeta.meta.safe_meta_exact import ExactSafeMeta, MetaTrainSettings
from safemeta.tasks import Task, get_distribution
from safemeta.tasks.tabular import evaluate

from conftest import OneCMDP, random_cmdp, scenario_of, softmax


@pytest.fixture(scope="module")
def family():
    dist = get_distribution("tabular_random")
    train_tasks, test_tasks = dist.sample(20, (0, 0)), dist.sample(10, (0, 1))
    return SimpleNamespace(dist=dist, train_tasks=train_tasks, test_tasks=test_tasks,
                           train=[dist.cmdp(t) for t in train_tasks], test=[dist.cmdp(t) for t in test_tasks])


def _learner(family, evaluation=None, seed=0, **options):
    """Exact Alg. 2 on the family's training tasks (eq. 6, A^s with lam = lam_c = 1)."""
    scenario = scenario_of(family.dist)
    operator = ExactDualPGD(scenario, settings(ExactAdaptationSettings, lam=1.0, lam_c=1.0))
    options = {"meta_gradient": "eq6", "tasks_per_iteration": 5, "max_kl": 0.02, **options}
    return ExactSafeMeta(scenario, operator, settings(MetaTrainSettings, **options), family.train_tasks,
                         family.test_tasks if evaluation is None else evaluation, seed)


def _run(family, iterations=25, switch="any", seed=0, state=None, stop_after=None):
    learner = _learner(family, seed=seed, iterations=iterations, switch=switch)
    if state is None:
        state = learner.initial_state()

    def stop(st):
        if stop_after is not None and st.iteration == stop_after:
            raise KeyboardInterrupt

    return run_training(learner, state, stop)


@pytest.mark.parametrize("switch", ["any", "per_task"])
def test_meta_training_raises_adapted_return_and_keeps_the_meta_policy_safe(family, switch):
    state = _run(family, switch=switch)
    test = family.test
    limits = np.stack([m.d for m in test])
    rewards = np.array([r["reward"].mean() for r in state.records])
    unsafe = np.array([(r["meta_cost"] > limits).mean() for r in state.records])
    assert len(state.records) == 26 and state.iteration == 26
    assert rewards[-1] > rewards[0] + 0.5, rewards          # exact one-step-adapted return (evaluation tasks)
    assert unsafe[0] > 0 and unsafe[-1] == 0, unsafe         # the uniform start is unsafe on some tasks
    assert sum(r["n_violating"] for r in state.records[:-1]) > 0   # the switch acted
    kls = [r["step_kl"] for r in state.records[:-1] if r["step_accepted"]]
    assert max(kls) <= 0.02


def test_any_switch_step_reduces_the_violated_costs(family):
    """Batch = all training tasks: with switch 'any' the first step lowers the cost of every task
    that violated (a pure cost step); the reward-seeking 'per_task' mix does not."""
    train = family.train
    start = _learner(family).initial_state()
    before = np.array([evaluate(m, softmax(start.logits)).Jc[0] for m in train])
    violating = before > np.array([m.d[0] for m in train])
    assert 0 < violating.sum() < len(train)
    changes = {}
    for switch in ("any", "per_task"):
        learner = _learner(family, evaluation=family.train_tasks[:1], iterations=1, tasks_per_iteration=len(train),
                           switch=switch)
        state = run_training(learner, learner.initial_state())
        after = np.array([evaluate(m, softmax(state.logits)).Jc[0] for m in train])
        changes[switch] = (after - before)[violating]
    assert (changes["any"] < 0).all(), changes["any"]
    assert changes["per_task"].mean() > changes["any"].mean()


def test_same_seed_same_trace_and_different_seed_differs(family):
    a, b, c = _run(family, iterations=8), _run(family, iterations=8), _run(family, iterations=8, seed=1)
    np.testing.assert_array_equal(a.logits, b.logits)
    for ra, rb in zip(a.records, b.records):
        for key in ra:
            if not key.startswith("time"):
                np.testing.assert_array_equal(ra[key], rb[key], err_msg=key)
    assert not np.array_equal(a.logits, c.logits)


def test_resume_from_a_saved_state_is_bit_identical(family):
    full = _run(family, iterations=10)
    saved = {}

    def keep(st):
        saved["state"] = copy.deepcopy(st)
        if st.iteration == 4:
            raise KeyboardInterrupt  # the job dies after its checkpoint of iteration 4

    learner = _learner(family, iterations=10)
    with pytest.raises(KeyboardInterrupt):
        run_training(learner, learner.initial_state(), keep)
    resumed = run_training(learner, saved["state"])
    np.testing.assert_array_equal(resumed.logits, full.logits)
    assert len(resumed.records) == len(full.records)
    np.testing.assert_array_equal(resumed.records[-1]["reward"], full.records[-1]["reward"])
    # a finished state does nothing more
    again = run_training(learner, resumed)
    assert len(again.records) == len(full.records)


# --------------------------------------------------------------------------- the CRPO switch (lines 4, 10)
def _one_iteration(cmdp, delta=0.0):
    """Iteration 0 of exact Alg. 2 on one training task (the CMDP) from the uniform meta-policy."""
    scenario = scenario_of(OneCMDP(cmdp))
    task = Task("one_cmdp", {"d": cmdp.d.tolist()})
    operator = ExactDualPGD(scenario, settings(ExactAdaptationSettings, lam=1.0, lam_c=1.0, delta=delta))
    learner = ExactSafeMeta(scenario, operator, settings(MetaTrainSettings, meta_gradient="eq6", iterations=1,
                                                         tasks_per_iteration=1, max_kl=0.02), [task], [task], 0)
    state = learner.initial_state()
    before = state.logits
    learner.iteration(state)
    return state.records[0], before, state.logits


@pytest.mark.parametrize("excess,branch", [(0.05, "meta"), (0.15, "cost")])
def test_switch_allows_the_violation_delta(excess, branch):
    """Line 4: a meta-policy whose cost is above d but within d + delta (delta = 0.1) takes the
    meta-gradient step (its adapted return rises); one above d + delta takes the cost step."""
    m0 = random_cmdp(2, S=4, A=3, p=1, correlation=0.8)
    m = dataclasses.replace(m0, d=evaluate(m0, np.full((4, 3), 1 / 3)).Jc - excess)
    record, before, after = _one_iteration(m, delta=0.1)
    assert record["step_accepted"]
    adaptation = settings(ExactAdaptationSettings, lam=1.0, lam_c=1.0, delta=0.1)
    adapted = [evaluate(m, np.exp(adaptation.adapt(m, x).logits)).J for x in (before, after)]
    cost = [evaluate(m, softmax(x)).Jc[0] for x in (before, after)]
    if branch == "meta":
        assert record["n_violating"] == 0 and adapted[1] > adapted[0], (record["n_violating"], adapted)
    else:
        assert record["n_violating"] == 1 and cost[1] < cost[0], (record["n_violating"], cost)


def test_switch_descends_the_violated_constraint():
    """Line 10 with p = 2: constraint 0 violated, constraint 1 satisfied, and c_1 = 1 - c_0 (so
    J_c1 = 1/(1-gamma) - J_c0: descending the satisfied cost would raise the violated one). The
    cost step lowers J_c0."""
    m0 = random_cmdp(5, S=4, A=3, p=1)
    m0 = dataclasses.replace(m0, c=np.concatenate([m0.c, 1.0 - m0.c]), d=np.zeros(2))
    start = evaluate(m0, np.full((4, 3), 1 / 3)).Jc
    m = dataclasses.replace(m0, d=start + np.array([-0.1, 0.1]))
    record, before, after = _one_iteration(m)
    cost = [evaluate(m, softmax(x)).Jc for x in (before, after)]
    assert record["n_violating"] == 1 and record["step_accepted"]
    assert cost[1][0] < cost[0][0], cost
