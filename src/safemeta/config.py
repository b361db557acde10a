"""Load and validate a pipeline configuration; every error names the offending key.

The schema (`config.schema.yaml`, shipped with the package and used by the Snakemake workflow
too) fills defaults and rejects unknown keys. Names of task distributions and algorithms are
checked against their registries after the schema.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
ALGORITHMS = ("safemeta",)
LEARNERS: tuple[str, ...] = ()  # single-task learners (CVPO, CGPO) register here when implemented


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


def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _describe(error: ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        where = f"{path}." if path != "<top level>" else ""
        return f"config key '{where}{unknown[0]}': unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    if error.validator == "required":
        return f"config key '{path}': {error.message}"
    return f"config key '{path}': {error.message}"


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """A validated copy of `config` with defaults filled in; raises ConfigError naming the key."""
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a mapping, got {type(config).__name__}")
    resolved = copy.deepcopy(config)
    error = best_match(_Validator(schema()).iter_errors(resolved))
    if error is not None:
        raise ConfigError(_describe(error))
    from .tasks import distribution_names

    for key, scen in resolved["scenarios"].items():
        scen.setdefault("distribution", key)
        if scen["distribution"] not in distribution_names():
            raise ConfigError(f"config key 'scenarios.{key}.distribution': unknown task distribution "
                              f"{scen['distribution']!r} (known: {', '.join(distribution_names())})")
    for key, meth in resolved["methods"].items():
        meth.setdefault("algorithm", key)
        if meth["algorithm"] not in ALGORITHMS:
            raise ConfigError(f"config key 'methods.{key}': unknown algorithm {meth['algorithm']!r}; "
                              f"name one of {', '.join(ALGORITHMS)} in 'algorithm'")
    for key, learner in resolved["learners"].items():
        learner.setdefault("algorithm", key)
        if learner["algorithm"] not in LEARNERS:
            raise ConfigError(f"config key 'learners.{key}': unknown learner {learner['algorithm']!r} "
                              f"(implemented: {', '.join(LEARNERS) or 'none yet'})")
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


def stage_config(config: dict[str, Any], stage: str, scenario: str, method: str | None = None) -> dict[str, Any]:
    """The part of a resolved config that one stage reads (a valid config by itself).

    `method` names the method, or for stage "single_task" the learner.

    Snakemake rules pass exactly this as `params` (canonical JSON), so a config edit reruns only
    the stages whose part changed.
    """
    part: dict[str, Any] = {"scenarios": {scenario: select(config, "scenarios", scenario)}}
    if stage == "tasks":
        part["scenarios"][scenario] = {k: v for k, v in part["scenarios"][scenario].items() if k != "adaptation"}
        return part
    if stage == "single_task":
        part.update(learners={method: select(config, "learners", method)}, device=config["device"])
        return part
    part["methods"] = {method: select(config, "methods", method)}
    if stage == "meta_train":
        part.update(metatrain=config["metatrain"], device=config["device"])
    elif stage == "meta_test":
        part.update(metatest=config["metatest"], device=config["device"])
    else:
        raise ConfigError(f"unknown stage {stage!r}")
    return part


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def config_hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def effective(config: dict[str, Any], section: str, scenario: str) -> dict[str, Any]:
    """A top-level section (metatrain, metatest) with the scenario's overrides applied."""
    return {**config[section], **select(config, "scenarios", scenario).get(section, {})}


def settings_from(cls: type, *mappings: dict[str, Any], **extra: Any):
    """Instantiate a settings dataclass from config mappings (later ones win), taking the fields it has."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for mapping in (*mappings, extra):
        values.update({k: v for k, v in mapping.items() if k in names})
    return cls(**values)
