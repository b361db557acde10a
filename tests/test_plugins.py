"""The plugin contract, for every registered adaptation operator, meta-learner and learner.

Each implementation class runs on a small scenario of each kind it supports, built through the
config and the registries as the CLI builds it, and must: record exactly what it declares, give
the same result for the same seed, resume bit for bit from a checkpointed state (meta-learners),
and reject an option the config sets but it does not read, naming the key. The schema holds one
block per algorithm whose options are exactly the union of its classes' settings.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from safemeta.adaptation import OPERATORS
from safemeta.config import ConfigError, block, load_config, settings
from safemeta.evaluate import adaptation_sequence, sequence_vars
from safemeta.learners import LEARNERS
from safemeta.meta import META_LEARNERS
from safemeta.meta.base import train
from safemeta.plugins import build_learner, build_meta_learner, build_operator, build_scenario
from safemeta.tasks import get_distribution

# One small scenario per kind (seconds on a CPU).
SCENARIOS = {
    "exact": {"distribution": "tabular_random", "task_options": {"num_states": 4, "num_actions": 2},
              "n_train_tasks": 4, "n_test_tasks": 2},
    "sampled": {"distribution": "point_circle_diff", "task_options": {"horizon": 20}, "n_train_tasks": 4,
                "n_test_tasks": 2, "rollouts": 4, "policy": {"hidden": [8]}},
    "differentiable": {"distribution": "point_circle_diff", "task_options": {"horizon": 20}, "n_train_tasks": 4,
                       "n_test_tasks": 2, "rollouts": 4, "policy": {"hidden": [8]}},
}
# Options that keep an algorithm's contract run small (its defaults stay what the schema says).
SMALL: dict[str, dict] = {
    "cgpo": {"adaptation": {"critic_updates": 2}},
    "shac_lag": {"adaptation": {"critic_updates": 2}},
    "mb_cgpo": {"adaptation": {"critic_updates": 2, "model_updates": 2}},
}
METATRAIN = {"iterations": 2, "tasks_per_iteration": 2, "eval_every": 1}


def _cases(registry):
    return [pytest.param(name, cls, kind, id=f"{name}-{cls.__name__}-{kind}")
            for name in registry.names() for cls in registry.classes(name) for kind in cls.kinds
            if kind in SCENARIOS]


def _config(kind: str, section: str | None = None, name: str | None = None, extra: dict | None = None) -> dict:
    config = {"seeds": [0], "device": "cpu", "scenarios": {"s": copy.deepcopy(SCENARIOS[kind])},
              "metatrain": dict(METATRAIN), "metatest": {"adapt_steps": 2}}
    if section is not None:
        config[section] = {"x": {"algorithm": name, **SMALL.get(name, {}), **(extra or {})}}
    return config


def _scenario(config: dict):
    scen = config["scenarios"]["s"]
    dist = get_distribution(scen["distribution"], **scen["task_options"])
    return build_scenario(config, "s", dist, "cpu"), dist.sample(scen["n_train_tasks"], (0, 0)), \
        dist.sample(scen["n_test_tasks"], (0, 1))


def _assert_same(a, b, what: str) -> None:
    if isinstance(a, list):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{what}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            if not key.startswith("time") and key != "policy":
                _assert_same(a[key], b[key], f"{what}.{key}")
    else:
        np.testing.assert_array_equal(np.asarray(a, dtype=float), np.asarray(b, dtype=float), err_msg=what)


def _host_method(name: str) -> str | None:
    """A registered meta-learner whose operator is `name` (to build the operator from a config)."""
    for method in META_LEARNERS.names():
        if any(cls.operator == name for cls in META_LEARNERS.classes(method)):
            return method
    return None


# --------------------------------------------------------------------------- operators
@pytest.mark.parametrize("name, cls, kind", _cases(OPERATORS))
def test_operator_contract(name, cls, kind):
    config = load_config({**_config(kind), "methods": {"m": {"algorithm": _host_method(name) or "safemeta"}},
                          "metatest": {"adapt_steps": 2, "adapter": name}})
    scenario, _, test = _scenario(config)
    operator = build_operator(config, "meta_test", scenario, "m")
    assert type(operator) is cls
    policy = scenario.fresh_policy(test[0], 0, kind)
    runs = [adaptation_sequence(operator, test[0], policy, 2, lambda k: 100 + k, start_seed=7) for _ in range(2)]
    assert set(runs[0]) - {"policy"} == set(sequence_vars(operator)), "records exactly the declared variables"
    assert np.isfinite(runs[0]["reward"]).all() and np.isfinite(runs[0]["cost"]).all()
    _assert_same(runs[0], runs[1], f"{name} on {kind}: same seed, same sequence")


# --------------------------------------------------------------------------- meta-learners
@pytest.mark.parametrize("name, cls, kind", _cases(META_LEARNERS))
def test_meta_learner_contract(name, cls, kind):
    config = load_config(_config(kind, "methods", name))
    scenario, train_tasks, test = _scenario(config)
    learner = build_meta_learner(config, scenario, "x", train_tasks, test, seed=3)
    assert type(learner) is cls
    declared = cls.trace_vars(type(learner.adapt))
    full = train(learner, learner.initial_state())
    assert len(full.records) == METATRAIN["iterations"] + 1
    assert {k for r in full.records for k in r} - {"iteration"} <= set(declared), "records only declared variables"

    again = build_meta_learner(config, scenario, "x", train_tasks, test, seed=3)
    _assert_same(full.records, train(again, again.initial_state()).records, f"{name}: determinism")

    saved = {}

    def dies_after_one(state):
        saved["state"] = copy.deepcopy(vars(state))    # what the CLI checkpoints
        if state.iteration == 1:
            raise KeyboardInterrupt

    fresh = build_meta_learner(config, scenario, "x", train_tasks, test, seed=3)
    with pytest.raises(KeyboardInterrupt):
        train(fresh, fresh.initial_state(), dies_after_one)
    resumed = build_meta_learner(config, scenario, "x", train_tasks, test, seed=3)
    finished = train(resumed, cls.State(**saved["state"]))
    for a, b in zip(full.records, finished.records):
        _assert_same(a, b, f"{name}: resume")
    ref, res = learner.policy(full).to_checkpoint(), resumed.policy(finished).to_checkpoint()
    for key in ref:
        if isinstance(ref[key], torch.Tensor):
            torch.testing.assert_close(ref[key], res[key], rtol=0, atol=0)


# --------------------------------------------------------------------------- learners
@pytest.mark.parametrize("name, cls, kind", _cases(LEARNERS))
def test_learner_contract(name, cls, kind):
    config = load_config(_config(kind, "learners", name, {"iterations": 2, "n_tasks": 1}))
    scenario, _, test = _scenario(config)
    learner = build_learner(config, scenario, "x")
    assert type(learner) is cls
    runs = [learner.run(test, seed=5) for _ in range(2)]
    assert set(runs[0]) == set(cls.trace_vars(type(learner.adapt)))
    assert runs[0]["reward"].shape[0] == 1
    _assert_same(runs[0], runs[1], f"{name}: same seed, same run")


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("name, cls, kind", _cases(META_LEARNERS) + _cases(LEARNERS))
def test_an_unknown_or_unread_option_is_rejected_naming_the_key(name, cls, kind):
    section = "methods" if name in META_LEARNERS and cls in META_LEARNERS.classes(name) else "learners"
    with pytest.raises(ConfigError, match=rf"config key '{section}\.x\.no_such_option'"):
        load_config(_config(kind, section, name, {"no_such_option": 1}))
    operator = cls.operator
    bad = _config(kind, section, name)
    bad["scenarios"]["s"]["adaptation"] = {operator: {"no_such_option": 1}}
    with pytest.raises(ConfigError, match=rf"config key 'scenarios\.s\.adaptation\.{operator}\.no_such_option'"):
        load_config(bad)


@pytest.mark.parametrize("registry, prefix", [(OPERATORS, "operator"), (META_LEARNERS, "method"), (LEARNERS, "learner")])
def test_schema_blocks_hold_exactly_the_options_the_classes_read(registry, prefix):
    for name in registry.names():
        options = set(block(f"{prefix}_{name}").get("properties", {})) - {"adaptation"}
        read = set()
        for cls in registry.classes(name):
            fields = {f.name for f in dataclasses.fields(cls.Settings)}
            shared = {k for s in getattr(cls.Settings, "sections", ()) for k in block(s)["properties"]}
            assert fields - shared <= options, f"{cls.__name__} reads options its schema block lacks"
            read |= fields - shared
            settings(cls.Settings)   # every field has a schema default
        assert options <= read, f"{prefix}_{name} has options no implementation reads: {options - read}"


def test_a_scenarios_metatrain_override_does_not_concern_its_learners():
    """scenarios.S.metatrain is read by meta-learners; a learner on S does not reject it."""
    config = _config("sampled", "learners", LEARNERS.names()[0], {"iterations": 2})
    config["methods"] = {"m": {"algorithm": "safemeta"}}          # the override's reader
    config["scenarios"]["s"]["metatrain"] = {"tasks_per_iteration": 3}
    load_config(config)
