"""From a validated config to algorithm instances, through the registries only.

For a (scenario, method) pair the meta-learner's implementation is the first registered class
that runs on a kind the scenario's distribution offers (`TaskDistribution.kinds`, in order:
tabular scenarios run the exact class, the others the sampled one). Its options are, in order of
precedence: the scenario's override `scenarios.S.methods.M`, the method block `methods.M`, the
schema block `method_<algorithm>` and the `metatrain` section (with the scenario's
`metatrain` override). Its operator's options: the method's `adaptation` overrides, then the
scenario's `adaptation.<operator>` block, then the schema block `operator_<operator>`.
Learners (`learners.L`) likewise. The meta-test's operator is `metatest.adapter` or the
method's own, with `metatest.delta` as its delta.

`check_config` runs at validation: every option the config sets must be read by the class that
will run it on that scenario, and every value accepted by it (`check_options`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .adaptation import OPERATORS
from .config import (ConfigError, block, block_defaults, canonical_json, check_block, effective, flatten, select,
                     settings)
from .learners import LEARNERS
from .meta import META_LEARNERS
from .registry import OptionError, Registry, kind_of

SECTIONS: dict[str, tuple[Registry, str]] = {"methods": (META_LEARNERS, "method"), "learners": (LEARNERS, "learner")}
STAGE_SECTION = {"meta_train": "methods", "meta_test": "methods", "single_task": "learners"}


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls.Settings)}


def _distribution_kinds(config: dict[str, Any], scenario: str) -> tuple[str, ...]:
    from .tasks import distribution_class

    return distribution_class(select(config, "scenarios", scenario)["distribution"]).kinds


# --------------------------------------------------------------------------- resolution
def runs_on(config: dict[str, Any], section: str, scenario: str) -> list[str]:
    """The methods (or learners) of the config that run on `scenario` (their `scenarios` list)."""
    return [key for key, entry in config[section].items() if entry.get("scenarios") in (None, []) or
            scenario in entry["scenarios"]]


def grid(config: dict[str, Any], section: str) -> list[tuple[str, str]]:
    """Every (scenario, method) or (scenario, learner) pair of the config, in config order."""
    return [(scenario, label) for scenario in config["scenarios"] for label in runs_on(config, section, scenario)]

def algorithm_class(config: dict[str, Any], section: str, scenario: str, label: str) -> type:
    """The class that runs `section.label` (a method or learner) on `scenario`."""
    registry, _ = SECTIONS[section]
    algorithm = select(config, section, label)["algorithm"]
    try:
        return registry.implementation(algorithm, _distribution_kinds(config, scenario))
    except LookupError as exc:
        raise ConfigError(f"config key '{section}.{label}': {exc} (scenario {scenario})") from None


def operator_class(config: dict[str, Any], name: str, scenario: str, kind: str, key: str) -> type:
    """The operator's class for the algorithm's `kind`, else (a meta-test adapter) for another kind
    of the scenario whose policies have the same form (tabular for exact, a network otherwise),
    e.g. a differentiable operator adapting a meta-policy trained by a sampled method."""
    if name not in OPERATORS:
        raise ConfigError(f"config key '{key}': unknown adaptation operator {name!r} (known: {', '.join(OPERATORS.names())})")
    same_form = [k for k in _distribution_kinds(config, scenario) if k != kind and (k == "exact") == (kind == "exact")]
    for candidate in (kind, *same_form):
        for cls in OPERATORS.classes(name):
            if candidate in cls.kinds:
                return cls
    raise ConfigError(f"config key '{key}': adaptation operator {name!r} does not run on {kind} scenarios "
                      f"(scenario {scenario})")


def _algorithm_options(config: dict[str, Any], section: str, scenario: str, label: str) -> dict[str, Any]:
    entry = select(config, section, label)
    override = select(config, "scenarios", scenario).get(section, {}).get(label, {}) if section == "methods" else {}
    options = {k: v for k, v in entry.items() if k not in ("algorithm", "adaptation")}
    options.update({k: v for k, v in override.items() if k != "adaptation"})
    return options


def _operator_overrides(config: dict[str, Any], section: str, scenario: str, label: str) -> dict[str, Any]:
    entry = select(config, section, label)
    override = select(config, "scenarios", scenario).get(section, {}).get(label, {}) if section == "methods" else {}
    return {**entry.get("adaptation", {}), **override.get("adaptation", {})}


def stage_operator(config: dict[str, Any], stage: str, scenario: str, label: str) -> str:
    """The operator a stage runs: the algorithm's own, or `metatest.adapter` at the meta-test."""
    cls = algorithm_class(config, STAGE_SECTION[stage], scenario, label)
    if stage == "meta_test":
        return effective(config, "metatest", scenario)["adapter"] or cls.operator
    return cls.operator


def algorithm_settings(config: dict[str, Any], section: str, scenario: str, label: str) -> tuple[type, Any]:
    """(class, settings) of a method or learner on a scenario."""
    cls = algorithm_class(config, section, scenario, label)
    shared = [effective(config, "metatrain", scenario)] if section == "methods" else []
    return cls, settings(cls.Settings, *shared, _algorithm_options(config, section, scenario, label))


def operator_settings(config: dict[str, Any], stage: str, scenario: str, label: str) -> tuple[type, Any]:
    """(class, settings) of the operator a stage runs on a scenario (see the module docstring)."""
    section = STAGE_SECTION[stage]
    cls = algorithm_class(config, section, scenario, label)
    name = stage_operator(config, stage, scenario, label)
    kind = kind_of(cls, _distribution_kinds(config, scenario))
    op_cls = operator_class(config, name, scenario, kind, "metatest.adapter")
    values = dict(select(config, "scenarios", scenario).get("adaptation", {}).get(name, {}))
    if name == cls.operator:
        values.update(_operator_overrides(config, section, scenario, label))
    if stage == "meta_test" and "delta" in _fields(op_cls):
        values["delta"] = effective(config, "metatest", scenario)["delta"]
    return op_cls, settings(op_cls.Settings, values)


# Scenario keys every stage of a scenario reads, and those read only where an algorithm samples
# (the `Scenario`'s sampling settings and policy network; exact tabular runs use neither).
TASK_KEYS = ("distribution", "task_options", "n_train_tasks", "n_test_tasks")
SAMPLING_KEYS = ("rollouts", "gamma", "constraint_gamma", "policy")


def stage_part(config: dict[str, Any], stage: str, scenario: str, label: str) -> dict[str, Any]:
    """`config.stage_config` for the algorithm stages: the effective value of every option the
    stage's implementations read, in the config's layout with every override resolved (the
    scenario's `methods`, `metatrain` and `metatest` overrides and a method's `adaptation`
    overrides are folded into the method block, the sections and the operator's block), so two
    configs that run a stage alike give it the same part and an override that hides a top-level
    value also hides its changes. Runs of the exact kind read no sampling keys. The meta-test's
    operator takes its delta from `metatest`. `checks` (meta-training) decide whether a run goes
    on, not its results (`RESULT_FREE`)."""
    section = STAGE_SECTION[stage]
    cls, algo_settings = algorithm_settings(config, section, scenario, label)
    kind = kind_of(cls, _distribution_kinds(config, scenario))
    name = stage_operator(config, stage, scenario, label)
    op_cls, op_settings = operator_settings(config, stage, scenario, label)
    reads = _fields(cls) - set(cls.ignored(algo_settings))
    op_reads = _fields(op_cls) - set(op_cls.ignored(op_settings))
    shared = {k for sec in getattr(cls.Settings, "sections", ()) for k in block(sec).get("properties", {})}

    scen = select(config, "scenarios", scenario)
    part_scen = {k: scen[k] for k in (*TASK_KEYS, *(SAMPLING_KEYS if kind != "exact" else ()))}
    operator = {k: getattr(op_settings, k) for k in sorted(op_reads)}
    if stage == "meta_test":
        operator.pop("delta", None)   # the meta-test's delta is metatest.delta
    part_scen["adaptation"] = {name: operator}
    entry = {"algorithm": select(config, section, label)["algorithm"],
             **{k: getattr(algo_settings, k) for k in sorted(reads - shared)}}
    part: dict[str, Any] = {"scenarios": {scenario: part_scen}, section: {label: entry}, "device": config["device"]}
    if stage == "meta_train":
        part["metatrain"] = {k: getattr(algo_settings, k) for k in sorted(reads & shared)}
        part["checks"] = config["checks"]
    elif stage == "meta_test":
        part["metatest"] = effective(config, "metatest", scenario)
    return part


# Sections of a stage's part that do not change what it computes (no rerun, no new checkpoint).
RESULT_FREE = ("checks",)
# The workflow rules' params of a part (`part_params`): each a short summary of one section.
PARAM_GROUPS = ("task", "sampling", "operator", "algorithm", "settings")


def part_params(part: dict[str, Any]) -> dict[str, str]:
    """A stage's config part as Snakemake params, one per group of PARAM_GROUPS: "prefix: key=value
    ..." with JSON values ("" where the part has none), so that `snakemake -n` names the keys
    of the group that changed in its reason. Together they hold every key of the part but the
    RESULT_FREE sections: task (the scenario's task keys and anything else of its block),
    sampling, operator (its `adaptation` block), algorithm (the method or learner block),
    settings (device, metatrain / metatest)."""
    (scenario, scen), = part["scenarios"].items()

    def summary(prefix: str, mapping: dict[str, Any]) -> str:
        if not mapping:
            return ""
        items = " ".join(f"{k}={canonical_json(v)}" for k, v in flatten(mapping).items())
        return f"{prefix}: {items}" if prefix else items

    where = f"scenarios.{scenario}"
    algorithm = next(((sec, part[sec]) for sec in SECTIONS if sec in part), ("", {}))
    rest = {k: v for k, v in part.items() if k not in ("scenarios", *SECTIONS, *RESULT_FREE)}
    return {"task": summary(where, {k: v for k, v in scen.items() if k not in (*SAMPLING_KEYS, "adaptation")}),
            "sampling": summary(where, {k: v for k, v in scen.items() if k in SAMPLING_KEYS}),
            "operator": summary(f"{where}.adaptation", scen.get("adaptation", {})),
            "algorithm": summary(*algorithm),
            "settings": summary("", rest)}


def check_grid(config: dict[str, Any]) -> None:
    """The config runs something: a method or a learner on some scenario (the workflow's check)."""
    if not grid(config, "methods") and not grid(config, "learners"):
        raise ConfigError("config key 'methods': no method or learner runs on any scenario (methods and learners are "
                          "empty); define one, e.g. methods: {safemeta: {}}")


# --------------------------------------------------------------------------- instances
def build_scenario(config: dict[str, Any], scenario: str, distribution: Any, device: Any):
    from .rollout import SamplingSettings
    from .scenario import Scenario

    scen = select(config, "scenarios", scenario)
    sampling = SamplingSettings(scen["rollouts"], scen["gamma"], scen["constraint_gamma"])
    return Scenario(scenario, distribution, sampling, dict(scen["policy"]), device)


def build_operator(config: dict[str, Any], stage: str, scenario_obj: Any, label: str):
    op_cls, op_settings = operator_settings(config, stage, scenario_obj.name, label)
    return op_cls(scenario_obj, op_settings)


def build_meta_learner(config: dict[str, Any], scenario_obj: Any, method: str, train: list, test: list, seed: int):
    """The meta-learner of `method` on the scenario, with its operator; evaluation tasks are the
    first `eval_tasks` test tasks (all when null)."""
    cls, learner_settings = algorithm_settings(config, "methods", scenario_obj.name, method)
    operator = build_operator(config, "meta_train", scenario_obj, method)
    evaluation = test[: learner_settings.eval_tasks or len(test)]
    return cls(scenario_obj, operator, learner_settings, train, evaluation, seed)


def build_learner(config: dict[str, Any], scenario_obj: Any, learner: str):
    cls, learner_settings = algorithm_settings(config, "learners", scenario_obj.name, learner)
    return cls(scenario_obj, build_operator(config, "single_task", scenario_obj, learner), learner_settings)


# --------------------------------------------------------------------------- validation
def check_config(raw: dict[str, Any], resolved: dict[str, Any]) -> None:
    """Registry names, per-algorithm option blocks and per-implementation option use (in place:
    fills each algorithm block's defaults and its `algorithm`)."""
    for section, (registry, prefix) in SECTIONS.items():
        for key, entry in resolved[section].items():
            algorithm = entry.get("algorithm", key)
            if algorithm not in registry:
                raise ConfigError(f"config key '{section}.{key}': unknown {registry.what} {algorithm!r}; name one of "
                                  f"{', '.join(registry.names()) or 'none'} in 'algorithm'")
            only = entry.get("scenarios")
            for name in only or ():
                if name not in resolved["scenarios"]:
                    raise ConfigError(f"config key '{section}.{key}.scenarios': {name!r} is not a scenario of this config")
            options = check_block({k: v for k, v in entry.items() if k not in ("algorithm", "scenarios")},
                                  f"{prefix}_{algorithm}", f"{section}.{key}")
            entry.clear()
            entry.update(algorithm=algorithm, scenarios=only, **options)
    for key in ("metatest",):
        adapter = resolved[key]["adapter"]
        if adapter is not None and adapter not in OPERATORS:
            raise ConfigError(f"config key 'metatest.adapter': unknown adaptation operator {adapter!r} "
                              f"(known: {', '.join(OPERATORS.names())})")
    for skey, scen in resolved["scenarios"].items():
        where = f"scenarios.{skey}"
        for name, options in scen["adaptation"].items():
            if name not in OPERATORS:
                raise ConfigError(f"config key '{where}.adaptation.{name}': unknown adaptation operator (known: "
                                  f"{', '.join(OPERATORS.names())}; options go under their operator, e.g. "
                                  f"adaptation: {{dual_pgd: {{lam: 1.0}}}})")
            if not isinstance(options, dict):
                raise ConfigError(f"config key '{where}.adaptation.{name}': must be a mapping of the operator's options")
            check_block(options, f"operator_{name}", f"{where}.adaptation.{name}", fill=False)
        for mkey, override in scen["methods"].items():
            if mkey not in resolved["methods"]:
                raise ConfigError(f"config key '{where}.methods.{mkey}': not a method of this config "
                                  f"(methods: {', '.join(resolved['methods']) or 'none'})")
            check_block(override, f"method_{resolved['methods'][mkey]['algorithm']}", f"{where}.methods.{mkey}", fill=False)
        adapter = scen.get("metatest", {}).get("adapter")
        if adapter is not None and adapter not in OPERATORS:
            raise ConfigError(f"config key '{where}.metatest.adapter': unknown adaptation operator {adapter!r}")
        for section in SECTIONS:
            for label in runs_on(resolved, section, skey):
                _check_pair(raw, resolved, section, skey, label)
        _check_shared_metatrain(raw, resolved, skey)


def _given(raw: dict[str, Any], *path: str) -> dict[str, Any]:
    """The mapping at `path` of the config as the user wrote it ({} where absent)."""
    node: Any = raw
    for key in path:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, dict) else {}


def _check_pair(raw: dict[str, Any], resolved: dict[str, Any], section: str, scenario: str, label: str) -> None:
    """The implementation of `section.label` on `scenario` reads every option the user set."""
    cls, algo_settings = algorithm_settings(resolved, section, scenario, label)
    kinds = _distribution_kinds(resolved, scenario)
    kind = kind_of(cls, kinds)
    what = f"{select(resolved, section, label)['algorithm']} on {kind} scenarios"
    ignored = cls.ignored(algo_settings)
    reads = _fields(cls) - set(ignored)
    given = {f"{section}.{label}.{k}": k for k in _given(raw, section, label)
             if k not in ("algorithm", "adaptation", "scenarios")}
    if section == "methods":
        given.update({f"scenarios.{scenario}.methods.{label}.{k}": k
                      for k in _given(raw, "scenarios", scenario, "methods", label) if k != "adaptation"})
    _refuse_unread(given, reads, what, scenario, ignored)
    # a scenario's metatrain override is shared by its methods (checked in _check_shared_metatrain)
    if section == "methods":
        given.update({f"scenarios.{scenario}.metatrain.{k}": k for k in _given(raw, "scenarios", scenario, "metatrain")})
    try:
        cls.check_options(algo_settings, frozenset(given.values()))
    except OptionError as exc:
        key = next((k for k, v in reversed(given.items()) if v == exc.option), f"{section}.{label}.{exc.option}")
        raise ConfigError(f"config key '{key}': {exc} (scenario {scenario})") from None

    stages = ["meta_train", "meta_test"] if section == "methods" else ["single_task"]
    for stage in stages:
        name = stage_operator(resolved, stage, scenario, label)
        op_cls = operator_class(resolved, name, scenario, kind, "metatest.adapter")
        op_given = {f"scenarios.{scenario}.adaptation.{name}.{k}": k for k in _given(raw, "scenarios", scenario,
                                                                                    "adaptation", name)}
        if name == cls.operator:
            op_given.update({f"{section}.{label}.adaptation.{k}": k for k in _given(raw, section, label, "adaptation")})
            op_given.update({f"scenarios.{scenario}.methods.{label}.adaptation.{k}": k
                             for k in _given(raw, "scenarios", scenario, "methods", label, "adaptation")})
        _, op_settings = operator_settings(resolved, stage, scenario, label)
        op_ignored = op_cls.ignored(op_settings)
        _refuse_unread(op_given, _fields(op_cls) - set(op_ignored), f"operator {name} on {kind} scenarios", scenario,
                       op_ignored)
        try:
            op_cls.check_options(op_settings, frozenset(op_given.values()))
        except OptionError as exc:
            key = next((k for k, v in reversed(op_given.items()) if v == exc.option), f"adaptation.{name}.{exc.option}")
            raise ConfigError(f"config key '{key}': {exc} (scenario {scenario})") from None
        if stage == "meta_test" and "delta" not in _fields(op_cls) and _any_positive(
                effective(resolved, "metatest", scenario)["delta"]):
            raise ConfigError(f"config key 'metatest.delta': operator {name} has no delta (scenario {scenario})")


def _check_shared_metatrain(raw: dict[str, Any], resolved: dict[str, Any], scenario: str) -> None:
    """Every key of `scenarios.S.metatrain` is read by at least one method that runs on S (the
    override is shared: a key only some methods read, e.g. a TRPO radius, is not an error)."""
    methods = runs_on(resolved, "methods", scenario)
    reads = set().union(*(_fields(algorithm_class(resolved, "methods", scenario, m)) for m in methods))
    given = {f"scenarios.{scenario}.metatrain.{k}": k for k in _given(raw, "scenarios", scenario, "metatrain")}
    _refuse_unread(given, reads, f"any method on this scenario ({', '.join(methods) or 'none'})", scenario)


def _refuse_unread(given: dict[str, str], reads: set[str], what: str, scenario: str,
                   ignored: dict[str, str] | None = None) -> None:
    for key, option in given.items():
        if option in (ignored or {}):
            raise ConfigError(f"config key '{key}': has no effect here: {ignored[option]} (scenario {scenario})")
        if option not in reads:
            raise ConfigError(f"config key '{key}': not read by {what} (scenario {scenario}); "
                              f"it reads {', '.join(sorted(reads))}")


def _any_positive(value: Any) -> bool:
    return any(v > 0 for v in (value if isinstance(value, list) else [value]))


__all__ = ["OptionError", "algorithm_settings", "block_defaults", "build_learner", "build_meta_learner",
           "build_operator", "build_scenario", "check_config", "operator_settings", "stage_operator"]
