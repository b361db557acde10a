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
    registries, each algorithm's and operator's options against its own schema block, and every
    (scenario, method / learner) pair against the implementation that will run it
    (`plugins.check_config`): an option that implementation does not read is an error.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a mapping, got {type(config).__name__}")
    raw = copy.deepcopy(config)
    resolved = copy.deepcopy(config)
    _check(resolved, _schema())
    from .tasks import distribution_names

    for key, scen in resolved["scenarios"].items():
        scen.setdefault("distribution", key)
        if scen["distribution"] not in distribution_names():
            raise ConfigError(f"config key 'scenarios.{key}.distribution': unknown task distribution "
                              f"{scen['distribution']!r} (known: {', '.join(distribution_names())})")
    from .plugins import check_config

    check_config(raw, resolved)
    return resolved
def load_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Validated config from a dict, a YAML/JSON file path, or an inline JSON object string."""
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
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return validate_config(raw if raw is not None else {})


def select(config: dict[str, Any], section: str, key: str) -> dict[str, Any]:
    """config[section][key], with an error naming the key when it is missing."""
    if key not in config[section]:
        raise ConfigError(f"config key '{section}.{key}': not defined (defined: {', '.join(sorted(config[section]))})")
    return config[section][key]


def stage_config(config: dict[str, Any], stage: str, scenario: str, label: str | None = None) -> dict[str, Any]:
    """The part of a resolved config that one stage reads (a valid config by itself).

    `label` names the method, or for stage "single_task" the learner. The scenario block keeps
    only what the stage reads: for tasks its distribution and task counts; for the others the
    sampling settings, the options that the stage's adaptation operator reads (with defaults)
    and the scenario's override of that one method; method and learner blocks keep the options
    their implementation reads (`plugins.stage_part`).

    Snakemake rules pass exactly this as `params` (canonical JSON), so a config edit reruns only
    the stages whose part changed.
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


def effective(config: dict[str, Any], section: str, scenario: str) -> dict[str, Any]:
    """A top-level section (metatrain, metatest) with the scenario's overrides applied."""
    return {**config[section], **select(config, "scenarios", scenario).get(section, {})}
