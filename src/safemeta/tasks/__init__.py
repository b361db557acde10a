"""Task distributions by name.

`get_distribution(name, **options)` builds a scenario's distribution; `options` are the
scenario's `task_options` from the config (for example a gridworld's size). Modules are imported
lazily so that tabular work never imports MuJoCo.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from .base import BatchEnv, BatchEnvError, StepResult, Task, TaskDistribution, TaskParamError

# name -> "module:ClassName" (relative to safemeta.tasks)
_REGISTRY: dict[str, str] = {
    "tabular_grid": "tabular:GridworldDistribution",
    "tabular_random": "tabular:RandomCMDPDistribution",
    "half_cheetah_vel": "locomotion:HalfCheetahVelDistribution",
    "hopper_vel": "locomotion:HopperVelDistribution",
    "swimmer_vel": "locomotion:SwimmerVelDistribution",
    "humanoid_dir": "locomotion:HumanoidDirDistribution",
    "point_circle": "navigation:PointCircleDistribution",
    "car_circle_hazard": "navigation:CarCircleHazardDistribution",
    "point_button": "navigation:PointButtonDistribution",
    "sg_point_circle": "sg_navigation:SGPointCircleDistribution",
    "sg_car_circle_hazard": "sg_navigation:SGCarCircleHazardDistribution",
    "sg_point_button": "sg_navigation:SGPointButtonDistribution",
    "function_env": "differentiable:FunctionEnvDistribution",
    "function_env_floor": "differentiable:FunctionEnvFloorDistribution",
    "cartpole_pos": "differentiable:CartPolePosDistribution",
    "point_circle_diff": "differentiable:PointCircleDiffDistribution",
}


def register(name: str, target: str) -> None:
    """Register a distribution class as `"module:Class"` under `name`."""
    if name in _REGISTRY and _REGISTRY[name] != target:
        raise ValueError(f"scenario name {name!r} is already registered to {_REGISTRY[name]}")
    _REGISTRY[name] = target


def distribution_names() -> list[str]:
    return sorted(_REGISTRY)


def module_file(name: str) -> Path:
    """The source file of a registered distribution's module (no import)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown task distribution {name!r}; known: {', '.join(distribution_names())}")
    return Path(__file__).resolve().parent / f"{_REGISTRY[name].split(':')[0]}.py"


def distribution_class(name: str) -> type[TaskDistribution]:
    """The class registered under `name` (its module is imported on first use)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown task distribution {name!r}; known: {', '.join(distribution_names())}")
    module_name, class_name = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module_name}"), class_name)


def distribution_options(name: str) -> dict[str, Any]:
    """Every option of a registered distribution with its default (the keyword parameters of
    its constructor, and of the constructors it passes `**options` on to)."""
    found: dict[str, Any] = {}
    for klass in distribution_class(name).__mro__:
        if klass is object:
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())[1:]
        for par in parameters:
            if par.kind in (par.POSITIONAL_OR_KEYWORD, par.KEYWORD_ONLY) and par.default is not par.empty:
                found.setdefault(par.name, list(par.default) if isinstance(par.default, tuple) else par.default)
        if not any(par.kind is par.VAR_KEYWORD for par in parameters):
            break
    return found


def resolved_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` with every option the distribution has and they leave out at its default (what
    a distribution built from them uses); TaskParamError naming an unknown option."""
    defaults = distribution_options(name)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TaskParamError(f"{name}: unknown option {unknown[0]!r} (options: {', '.join(sorted(defaults))})")
    return {**defaults, **options}


def get_distribution(name: str, **options: Any) -> TaskDistribution:
    cls = distribution_class(name)
    resolved_options(name, options)
    try:
        return cls(**options)
    except TypeError as exc:  # a wrongly typed option the constructor did not check: say which distribution
        raise TaskParamError(f"{name}: bad task_options {sorted(options)}: {exc}") from None


__all__ = [
    "BatchEnv", "BatchEnvError", "StepResult", "Task", "TaskDistribution", "TaskParamError",
    "distribution_class", "distribution_names", "distribution_options", "get_distribution", "module_file",
    "register", "resolved_options",
]
