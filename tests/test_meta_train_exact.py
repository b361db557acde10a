"""Exact meta-training (Alg. 2): improvement, the CRPO switch, determinism and resume."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from safemeta.meta.safe_meta_exact import (AdaptationSettings, MetaTrainSettings, initial_state,
                                           meta_train_exact)
from safemeta.tasks import get_distribution
from safemeta.tasks.tabular import evaluate

from conftest import softmax


@pytest.fixture(scope="module")
def family():
    dist = get_distribution("tabular_random")
    train = [dist.cmdp(t) for t in dist.sample(20, (0, 0))]
    test = [dist.cmdp(t) for t in dist.sample(10, (0, 1))]
    return train, test


def _run(family, iterations=25, switch="any", seed=0, state=None, stop_after=None):
    train, test = family
    settings = MetaTrainSettings(iterations=iterations, tasks_per_iteration=5, max_kl=0.02, switch=switch)
    if state is None:
        state = initial_state(train[0].num_states, train[0].num_actions, seed)

    def stop(st):
        if stop_after is not None and st.iteration == stop_after:
            raise KeyboardInterrupt

    return meta_train_exact(train, test, settings, AdaptationSettings(lam=1.0, lam_c=1.0), state, stop)


@pytest.mark.parametrize("switch", ["any", "per_task"])
def test_meta_training_raises_adapted_return_and_keeps_the_meta_policy_safe(family, switch):
    state = _run(family, switch=switch)
    _, test = family
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
    train, _ = family
    start = initial_state(train[0].num_states, train[0].num_actions, 0)
    before = np.array([evaluate(m, softmax(start.logits)).Jc[0] for m in train])
    violating = before > np.array([m.d[0] for m in train])
    assert 0 < violating.sum() < len(train)
    changes = {}
    for switch in ("any", "per_task"):
        settings = MetaTrainSettings(iterations=1, tasks_per_iteration=len(train), max_kl=0.02, switch=switch)
        state = meta_train_exact(train, train[:1], settings, AdaptationSettings(lam=1.0, lam_c=1.0),
                                 initial_state(train[0].num_states, train[0].num_actions, 0))
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

    train, test = family
    settings = MetaTrainSettings(iterations=10, tasks_per_iteration=5, max_kl=0.02)
    with pytest.raises(KeyboardInterrupt):
        meta_train_exact(train, test, settings, AdaptationSettings(lam=1.0, lam_c=1.0),
                         initial_state(train[0].num_states, train[0].num_actions, 0), keep)
    resumed = meta_train_exact(train, test, settings, AdaptationSettings(lam=1.0, lam_c=1.0), saved["state"])
    np.testing.assert_array_equal(resumed.logits, full.logits)
    assert len(resumed.records) == len(full.records)
    np.testing.assert_array_equal(resumed.records[-1]["reward"], full.records[-1]["reward"])
    # a finished state does nothing more
    again = meta_train_exact(train, test, settings, AdaptationSettings(lam=1.0, lam_c=1.0), resumed)
    assert len(again.records) == len(full.records)
