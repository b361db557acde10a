"""What a task is, what a task distribution does, and the batched-environment protocol.

A *task* is one CMDP of a scenario: the scenario's registry name plus JSON-serialisable
parameters (goal velocity, circle radius, hazard positions, ...). A *task distribution*
samples tasks from a seeded generator and builds a `BatchEnv` that steps `num_envs` copies of
one task as a single batch. Nothing here knows about learning algorithms.

BatchEnv conventions (every scenario follows them):
- `reset()` returns observations `[N, obs_dim]` (torch, on `device`).
- `step(actions)` takes `[N, act_dim]` (continuous) or `[N]` integer actions (discrete) and
  returns a `StepResult` with `obs [N, obs_dim]`, `reward [N]`, `cost [N, p]`,
  `terminated [N]` and `truncated [N]` (bool).
- No auto-reset: once a copy terminates it stays frozen, and its later rewards and costs are
  zero, until the next `reset()`. `truncated` turns true for all copies at step `horizon`.
- `cost_limits` is the task's limit vector d `[p]`; `num_constraints` is p.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


class TaskParamError(ValueError):
    """A task's parameters are invalid; the message names the parameter and the task."""


class BatchEnvError(RuntimeError):
    """A batched environment cannot be built or stepped for a reason outside its parameters (an
    external simulator is missing, died or did not answer); the message says what to do."""


@dataclass(frozen=True)
class Task:
    """One task: the scenario (registry name) it belongs to and its parameters."""

    scenario: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "params": _jsonable(self.params)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Task":
        if not isinstance(obj, dict) or "scenario" not in obj or "params" not in obj:
            raise TaskParamError(f"a task must be an object with 'scenario' and 'params', got {obj!r:.200}")
        return cls(scenario=str(obj["scenario"]), params=dict(obj["params"]))


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays (recursively) to plain JSON types; refuse anything else."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"task parameter of type {type(value).__name__} is not JSON-serialisable")


def tasks_to_json(tasks: list[Task]) -> list[dict[str, Any]]:
    return [t.to_json() for t in tasks]


def tasks_from_json(objs: list[dict[str, Any]]) -> list[Task]:
    return [Task.from_json(o) for o in objs]


def round_trip(task: Task) -> Task:
    """The task after a JSON dump and load (what a task file gives back)."""
    return Task.from_json(json.loads(json.dumps(task.to_json())))


@dataclass
class StepResult:
    obs: Any          # torch.Tensor [N, obs_dim]
    reward: Any       # torch.Tensor [N]
    cost: Any         # torch.Tensor [N, p]
    terminated: Any   # torch.Tensor [N] bool
    truncated: Any    # torch.Tensor [N] bool


@runtime_checkable
class BatchEnv(Protocol):
    num_envs: int
    observation_space: Any   # gymnasium.spaces.Box (per copy)
    action_space: Any        # gymnasium.spaces.Box or Discrete (per copy)
    horizon: int
    cost_limits: np.ndarray  # d, shape [p]
    num_constraints: int     # p
    device: Any

    def reset(self) -> Any: ...

    def step(self, actions: Any) -> StepResult: ...


class TaskDistribution:
    """Base class of a scenario: seeded task sampling plus a batched environment per task.

    Subclasses set `name` and implement `_sample(rng, n)` and `make_env`. `sample` is the
    public entry point: same seed, same tasks; params are JSON round-trippable.
    """

    name: str = ""
    # How algorithms may use this distribution's tasks, in order of preference: "exact" (the
    # task's CMDP with exact values, `cmdp(task)`), "sampled" (rollouts of `make_env`),
    # "differentiable" (`make_env` steps are torch operations that carry gradients to the actions).
    kinds: tuple[str, ...] = ("sampled",)

    def sample(self, n: int, seed: int | Sequence[int]) -> list[Task]:
        """n tasks from the generator of `seed` (an int, or ints such as (seed, split))."""
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{self.name}: number of tasks must be a positive integer, got {n!r}")
        entropy = [int(s) for s in (seed if isinstance(seed, Sequence) else [seed])]
        rng = np.random.default_rng(np.random.SeedSequence([*entropy, _stable_hash(self.name)]))
        tasks = [Task(self.name, _jsonable(p)) for p in self._sample(rng, int(n))]
        for t in tasks:
            self.validate(t)
        return tasks

    def _sample(self, rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def validate(self, task: Task) -> None:
        """Raise TaskParamError naming the bad parameter; default: check the scenario name."""
        if task.scenario != self.name:
            raise TaskParamError(f"task belongs to scenario {task.scenario!r}, not {self.name!r}")

    def make_env(self, task: Task, num_envs: int, seed: int, device: Any = "cpu") -> BatchEnv:
        raise NotImplementedError(f"{self.name} has no batched environment")


def _stable_hash(text: str) -> int:
    """A process-independent 32-bit hash (Python's hash() is salted per process)."""
    import zlib

    return zlib.crc32(text.encode())
