"""Reading the files a command is given, each checked against what the command is told.

A tasks file must hold the tasks of the scenario, distribution, task options and seed that the
command names, as many as the config asks for; a policy file a safemeta policy of the form the
scenario's config gives it (the tabular softmax on exact runs, the configured network
otherwise) and, where it says so, meta-trained for the same scenario, method and seed; a trace or
summary a readable netCDF file. Every mismatch is an `InputError` whose one-line message names
the file and both sides. `input_identity` is what provenance records about an input.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .config import select
from .tasks import Task, TaskParamError, resolved_options

TASKS_FORMAT = "safemeta.tasks/1"


class InputError(ValueError):
    """A file given on the command line is missing, malformed or does not match the command."""


def content_sha256(obj: Any) -> str:
    """sha256 (16 hex) of what a file holds, less its `provenance` (which has a creation time):
    JSON values canonically, tensors and arrays by dtype, shape and bytes; the same content
    gives the same hash wherever and whenever it was written."""
    import numpy as np

    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                if key != "provenance":
                    h.update(f"<{key}>".encode())
                    feed(value[key])
        elif isinstance(value, (list, tuple)):
            h.update(b"[")
            for item in value:
                feed(item)
            h.update(b"]")
        elif hasattr(value, "detach") or isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
            h.update(f"{array.dtype}{array.shape}".encode())
            h.update(array.tobytes())
        else:
            h.update(json.dumps(value, sort_keys=True).encode())

    feed(obj)
    return h.hexdigest()[:16]


def input_identity(obj: dict[str, Any]) -> dict[str, Any]:
    """What a trace records about one input file's content (`obj`, as read): its content hash
    and, from its own provenance, the stage, seed, code hash and config hash it was made with."""
    out: dict[str, Any] = {"sha256": content_sha256(obj)}
    made = obj.get("provenance") or {}
    out.update({k: made[k] for k in ("stage", "seed", "code_hash") if k in made})
    if "config" in made:
        out["config_sha256"] = hashlib.sha256(str(made["config"]).encode()).hexdigest()[:16]
    return out


def _first_difference(given: dict[str, Any], expected: dict[str, Any]) -> str | None:
    return next((k for k in sorted(set(given) | set(expected)) if given.get(k) != expected.get(k)), None)


# --------------------------------------------------------------------------- tasks files
def read_tasks(path: str | Path, config: dict[str, Any], scenario: str, seed: int, distribution: Any) -> dict[str, Any]:
    """The tasks file of `scenario` and `seed`, checked against the config (module docstring):
    its fields with "train" and "test" as lists of `Task`s, each validated by `distribution`."""
    scen = select(config, "scenarios", scenario)
    where = f"tasks file {path}"
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{where} does not exist (run `safemeta tasks` first)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{where} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") != TASKS_FORMAT:
        raise InputError(f"{where} is not a {TASKS_FORMAT} file (written by `safemeta tasks`)")
    if obj.get("scenario") != scenario or obj.get("distribution") != scen["distribution"]:
        raise InputError(f"{where} holds scenario {obj.get('scenario')!r} ({obj.get('distribution')!r}); the command "
                         f"runs {scenario!r} ({scen['distribution']!r})")
    if obj.get("seed") != seed:
        raise InputError(f"{where} was sampled with seed {obj.get('seed')!r}; the command says --seed {seed}")
    try:
        made_with = resolved_options(scen["distribution"], dict(obj.get("task_options") or {}))
    except TaskParamError as exc:
        raise InputError(f"{where}: its task_options do not fit the distribution: {exc}") from None
    key = _first_difference(made_with, scen["task_options"])
    if key is not None:
        raise InputError(f"{where} was sampled with task option {key} = {json.dumps(made_with.get(key))}; config key "
                         f"'scenarios.{scenario}.task_options.{key}' says {json.dumps(scen['task_options'].get(key))}")
    for split, count in (("train", "n_train_tasks"), ("test", "n_test_tasks")):
        tasks = obj.get(split)
        if not isinstance(tasks, list):
            raise InputError(f"{where} lacks its list of {split} tasks")
        if len(tasks) != scen[count]:
            raise InputError(f"{where} holds {len(tasks)} {split} tasks; config key 'scenarios.{scenario}.{count}' "
                             f"says {scen[count]}")
        try:
            obj[split] = [Task.from_json(t) for t in tasks]
            for task in obj[split]:
                distribution.validate(task)
        except TaskParamError as exc:
            raise InputError(f"{where}: a {split} task is malformed: {exc}") from None
    return obj


# --------------------------------------------------------------------------- policy files
def load_policy_file(path: str | Path) -> dict[str, Any]:
    """The content of a policy.pt (torch.load), or InputError for a missing, torn or foreign file."""
    import torch

    try:
        obj = torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise InputError(f"policy file {path} does not exist (run `safemeta meta-train` first)") from None
    except Exception as exc:  # torn (PytorchStreamReader) or foreign (UnpicklingError) files
        reason = (str(exc).splitlines() or [""])[0].split(". ")[0] or type(exc).__name__
        raise InputError(f"policy file {path} is not a readable torch file ({type(exc).__name__}: {reason:.160}); "
                         f"rerun `safemeta meta-train` to write it again") from None
    if not isinstance(obj, dict):
        raise InputError(f"policy file {path} is not a safemeta policy (it holds a {type(obj).__name__})")
    return obj


def check_policy_origin(path: str | Path, obj: dict[str, Any], config: dict[str, Any], scenario: str, method: str,
                        seed: int) -> None:
    """A policy that records its provenance was meta-trained for this scenario, method and seed,
    on tasks of the scenario's distribution, task options and task counts."""
    from .config import flatten
    from .plugins import TASK_KEYS

    made = obj.get("provenance") or {}
    told = {"scenario": scenario, "method": method, "seed": seed}
    for key, value in told.items():
        if key in made and str(made[key]) != str(value):
            raise InputError(f"policy file {path} was meta-trained for {key} {made[key]}; the command says "
                             f"--{key} {value}")
    try:
        trained = json.loads(made["config"])["scenarios"][scenario]
    except (KeyError, TypeError, ValueError):
        return
    scen = select(config, "scenarios", scenario)
    try:   # a policy written before task options were completed with their defaults
        trained = {**trained, "task_options": resolved_options(scen["distribution"], trained.get("task_options") or {})}
    except TaskParamError:
        pass
    then = flatten({k: trained.get(k) for k in TASK_KEYS}, f"scenarios.{scenario}")
    now = flatten({k: scen.get(k) for k in TASK_KEYS}, f"scenarios.{scenario}")
    key = _first_difference(then, now)
    if key is not None:
        raise InputError(f"policy file {path} was meta-trained with {key} = {json.dumps(then.get(key))}; config key "
                         f"'{key}' says {json.dumps(now.get(key))}")


def check_architecture(path: str | Path, policy: Any, expected: Any, scenario: str) -> None:
    """The network of policy.pt is the one the config gives the scenario (`expected`: a fresh
    policy of the configured form): kind, layer sizes, initial log-std, observation and action sizes."""
    if policy.kind != expected.kind:
        raise InputError(f"policy file {path} holds a {policy.kind} policy; scenario {scenario} needs a {expected.kind}")
    for key in sorted(set(policy.config) | set(expected.config)):
        got, want = policy.config.get(key), expected.config.get(key)
        if got == want:
            continue
        if key in ("hidden", "init_log_std"):
            raise InputError(f"policy file {path} has {key} {json.dumps(got)}; config key "
                             f"'scenarios.{scenario}.policy.{key}' says {json.dumps(want)}")
        raise InputError(f"policy file {path} has {key} {got}; the tasks of scenario {scenario} have {want} "
                         f"(was it trained on another scenario?)")


# --------------------------------------------------------------------------- netCDF files
def read_netcdf(path: str | Path, what: str, made_by: str = ""):
    """A trace or summary (results.read_dataset), or InputError for a missing or unreadable file
    (`made_by`: the command that writes it, for the hint)."""
    from .results import read_dataset

    if not Path(path).is_file():
        raise InputError(f"{what} {path} does not exist" + (f" (run `{made_by}` first)" if made_by else ""))
    try:
        return read_dataset(path)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise InputError(f"{what} {path} is not a readable netCDF file ({reason}); rerun the stage that wrote it") from None
