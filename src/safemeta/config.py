"""Load and validate a pipeline configuration; every error names the offending key.

The schema (`config.schema.yaml`, shipped with the package and used by the Snakemake workflow
too) fills defaults and rejects unknown keys. Names of task distributions and algorithms are
checked against their registries after the schema.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the key's dotted path."""


def _with_defaults(cls):
    check_properties = cls.VALIDATORS["properties"]

    def fill_then_check(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, properties, instance, schema)

    return validators.extend(cls, {"properties": fill_then_check})


_Validator = _with_defaults(Draft202012Validator)


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def schema() -> dict[str, Any]:
    return copy.deepcopy(_schema())


def _describe(error: ValidationError, prefix: str = "") -> str:
    path = ".".join([*([prefix] if prefix else []), *(str(p) for p in error.absolute_path)]) or "<top level>"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        where = f"{path}." if path != "<top level>" else ""
        return f"config key '{where}{unknown[0]}': unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    return f"config key '{path}': {error.message}"


def _check(instance: Any, sub_schema: dict[str, Any], prefix: str = "", fill: bool = True) -> None:
    """Validate `instance` in place against a schema (with the document's $defs), filling defaults."""
    document = {**sub_schema, "$defs": _schema()["$defs"]}
    validator = (_Validator if fill else Draft202012Validator)(document)
    error = best_match(validator.iter_errors(instance))
    if error is not None:
        raise ConfigError(_describe(error, prefix))


def block(name: str) -> dict[str, Any]:
    """The schema block `$defs/<name>` (e.g. operator_dual_pgd, method_safemeta, learner_dual_pgd)."""
    defs = _schema()["$defs"]
    if name not in defs:
        raise ConfigError(f"the config schema has no block {name!r}")
    return defs[name]


def block_defaults(name: str) -> dict[str, Any]:
    """Every option of a schema block with its default (the one place defaults live)."""
    return {k: copy.deepcopy(v["default"]) for k, v in block(name).get("properties", {}).items() if "default" in v}


def check_block(values: dict[str, Any], name: str, prefix: str, fill: bool = True) -> dict[str, Any]:
    """A validated copy of `values` against block `name`, defaults filled unless `fill` is False."""
    out = copy.deepcopy(values)
    _check(out, {"$ref": f"#/$defs/{name}"}, prefix, fill)
    return out


def settings(cls: type, *mappings: dict[str, Any], **given: Any):
    """A settings dataclass (no defaults of its own) from config mappings (later ones win) and
    keywords; every field they lack comes from the schema: the class's `block` (e.g.
    operator_dual_pgd) and the sections it names in `sections` (e.g. metatrain). Keys that are
    not fields are ignored. The pipeline and the tests build settings through this."""
    values: dict[str, Any] = {}
    for section in getattr(cls, "sections", ()):
        values.update(block_defaults(section))
    values.update(block_defaults(cls.block))
    for mapping in (*mappings, given):
        values.update(mapping)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise TypeError(f"{cls.__name__} has no option {', '.join(unknown)}")
    missing = [n for n in names if n not in values]
    if missing:
        raise ConfigError(f"{cls.__name__}: no value or schema default for {', '.join(missing)}")
    return cls(**{n: values[n] for n in names})


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """A validated copy of `config` with defaults filled in; raises ConfigError naming the key.

    After the schema: task distributions, algorithms and operators are checked against their
    registries, each scenario's `task_options` by its distribution (and completed with the
    distribution's defaults), each algorithm's and operator's options against its own schema block, and every
    (scenario, method / learner) pair against the implementation that will run it
    (`plugins.check_config`): an option that implementation does not read is an error.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a mapping, got {type(config).__name__}")
    raw = copy.deepcopy(config)
    resolved = copy.deepcopy(config)
    _check(resolved, _schema())
    from .tasks import TaskParamError, distribution_names, get_distribution, resolved_options

    for key, scen in resolved["scenarios"].items():
        scen.setdefault("distribution", key)
        if scen["distribution"] not in distribution_names():
            raise ConfigError(f"config key 'scenarios.{key}.distribution': unknown task distribution "
                              f"{scen['distribution']!r} (known: {', '.join(distribution_names())})")
        try:   # the distribution's own checks, here rather than inside a job; then every option, defaults filled
            get_distribution(scen["distribution"], **scen["task_options"])
            scen["task_options"] = resolved_options(scen["distribution"], scen["task_options"])
        except TaskParamError as exc:
            raise ConfigError(f"config key 'scenarios.{key}.task_options': {exc}") from None
    from .plugins import check_config

    check_config(raw, resolved)
    return resolved


def load_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Validated config from a dict, a YAML or JSON (*.json) file path, or an inline JSON object string."""
    if isinstance(source, dict):
        return validate_config(source)
    text = str(source)
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"inline config is not valid JSON: {exc}") from None
    else:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        if path.suffix == ".json":   # YAML 1.1 reads JSON's 1e-10 as a string
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        else:
            raw = read_yaml(path)
    return validate_config(raw if raw is not None else {})


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently, so a repeated `learners:` block would drop the first)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice in one mapping",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: str | Path) -> Any:
    """A YAML config file; ConfigError (one line, with the place) if it is not valid YAML or
    repeats a key."""
    try:
        return yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{at}: {problem}") from None


def select(config: dict[str, Any], section: str, key: str) -> dict[str, Any]:
    """config[section][key], with an error naming the key when it is missing."""
    if key not in config[section]:
        raise ConfigError(f"config key '{section}.{key}': not defined (defined: {', '.join(sorted(config[section]))})")
    return config[section][key]


def stage_config(config: dict[str, Any], stage: str, scenario: str, label: str | None = None) -> dict[str, Any]:
    """The part of a resolved config that one stage reads (a valid config by itself).

    `label` names the method, or for stage "single_task" the learner. The scenario block keeps
    only what the stage reads: for tasks its distribution, task options and task counts; for the
    others also the sampling settings (unless the run is exact) and the options that the stage's
    adaptation operator reads; method and learner blocks keep the options their implementation
    reads, the sections the keys it reads (`plugins.stage_part`).

    Every value is the effective one (overrides folded in, defaults filled), so a config edit
    changes the part of exactly the stages it affects. The Snakemake rules pass it to the command
    as a file named by its hash and as `params` (`flatten`ed, by section: a changed key shows in
    `snakemake -n`'s reason), without the sections that do not change results
    (`plugins.RESULT_FREE`), so an edit reruns only the stages whose part changed.
    """
    scen = select(config, "scenarios", scenario)
    if stage == "tasks":
        keep = ("distribution", "task_options", "n_train_tasks", "n_test_tasks")
        return {"scenarios": {scenario: {k: scen[k] for k in keep if k in scen}}}
    if stage not in ("meta_train", "meta_test", "single_task"):
        raise ConfigError(f"unknown stage {stage!r}")
    from .plugins import stage_part

    return stage_part(config, stage, scenario, label)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def config_hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as {"dotted.key": leaf value} (an empty mapping is a leaf)."""
    if not isinstance(obj, dict) or not obj:
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key in sorted(obj):
        out.update(flatten(obj[key], f"{prefix}.{key}" if prefix else str(key)))
    return out


def effective(config: dict[str, Any], section: str, scenario: str) -> dict[str, Any]:
    """A top-level section (metatrain, metatest) with the scenario's overrides applied."""
    return {**config[section], **select(config, "scenarios", scenario).get(section, {})}
