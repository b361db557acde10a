"""Reading and checking task parameters and distribution options.

Every failure raises `TaskParamError` with the scenario and the parameter in the message, so a bad
task file or config entry says what to fix.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from .base import Task, TaskDistribution, TaskParamError


def number(scenario: str, params: Mapping[str, Any], key: str, *, low: float = -math.inf,
           high: float = math.inf, strict_low: bool = False) -> float:
    """A finite float `params[key]` in [low, high] (or (low, high] when strict_low)."""
    if key not in params:
        raise TaskParamError(f"{scenario}: missing parameter {key!r}")
    value = params[key]
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TaskParamError(f"{scenario}: parameter {key!r} must be a number, got {value!r:.80}") from None
    below = x <= low if strict_low else x < low
    if not math.isfinite(x) or below or x > high:
        bracket = "(" if strict_low else "["
        raise TaskParamError(f"{scenario}: parameter {key!r} must lie in {bracket}{low}, {high}], got {value!r}")
    return x


def limits(scenario: str, params: Mapping[str, Any], p: int = 1) -> np.ndarray:
    """The cost-limit vector `d` of length p."""
    if "d" not in params:
        raise TaskParamError(f"{scenario}: missing parameter 'd' (cost limits, a list of length {p})")
    try:
        d = np.asarray(params["d"], dtype=np.float64)
    except (TypeError, ValueError):
        raise TaskParamError(f"{scenario}: parameter 'd' must be a list of {p} numbers, got {params['d']!r:.80}") from None
    if d.shape != (p,) or not np.isfinite(d).all():
        raise TaskParamError(f"{scenario}: parameter 'd' must be a list of {p} finite numbers, got {params['d']!r:.80}")
    return d


def points(scenario: str, params: Mapping[str, Any], key: str, extent: float) -> np.ndarray:
    """A list of [x, y] positions `params[key]` inside the square |x|, |y| <= extent, as [K, 2]."""
    if key not in params:
        raise TaskParamError(f"{scenario}: missing parameter {key!r} (a list of [x, y] positions)")
    try:
        xy = np.asarray(params[key], dtype=np.float64).reshape(-1, 2) if len(params[key]) else np.zeros((0, 2))
    except (TypeError, ValueError):
        raise TaskParamError(f"{scenario}: parameter {key!r} must be a list of [x, y] pairs, got {params[key]!r:.80}") from None
    if not np.isfinite(xy).all() or (np.abs(xy) > extent).any():
        raise TaskParamError(f"{scenario}: parameter {key!r} must hold finite [x, y] pairs with |x|, |y| <= {extent}")
    return xy


def integer(scenario: str, option: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """A distribution option that must be an integer (not a float such as 5.5 or 5.0, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TaskParamError(f"{scenario}: option {option!r} must be an integer, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f"in [{minimum}, {maximum}]" if minimum is not None and maximum is not None else
                  f">= {minimum}" if minimum is not None else f"<= {maximum}")
        raise TaskParamError(f"{scenario}: option {option!r} must be an integer {bounds}, got {value!r}")
    return int(value)


def optional_integer(scenario: str, option: str, value: Any, minimum: int | None = None) -> int | None:
    return None if value is None else integer(scenario, option, value, minimum)


def real(scenario: str, option: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
         strict_low: bool = False, strict_high: bool = False) -> float:
    """A distribution option that must be a finite number in [low, high] (open ends when strict)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TaskParamError(f"{scenario}: option {option!r} must be a number, got {value!r}")
    x = float(value)
    outside = (x <= low if strict_low else x < low) or (x >= high if strict_high else x > high)
    if not math.isfinite(x) or outside:
        interval = f"{'(' if strict_low else '['}{low}, {high}{')' if strict_high else ']'}"
        raise TaskParamError(f"{scenario}: option {option!r} must be a number in {interval}, got {value!r}")
    return x


def count_range(scenario: str, option: str, value: Any, minimum: int = 0) -> tuple[int, int]:
    """A distribution option that is a count or an inclusive [low, high] count range (integers)."""
    pair = (value, value) if not isinstance(value, (list, tuple)) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in pair) or \
            not minimum <= pair[0] <= pair[1]:
        raise TaskParamError(f"{scenario}: option {option!r} must be an integer or [low, high] of integers with "
                             f"{minimum} <= low <= high, got {value!r}")
    return int(pair[0]), int(pair[1])


def positive(scenario: str, option: str, value: Any) -> float:
    """A distribution option that must be a finite positive number."""
    try:
        return real(scenario, option, value, low=0.0, strict_low=True)
    except TaskParamError:
        raise TaskParamError(f"{scenario}: option {option!r} must be a positive number, got {value!r}") from None


def horizon(scenario: str, value: Any) -> int:
    return integer(scenario, "horizon", value, minimum=1)


_checked_horizon = horizon


class ScaledLimitDistribution(TaskDistribution):
    """Options shared by the sampled scenarios, and tasks that carry their limit.

    `horizon` defaults to the paper's; the limit d defaults to the paper's, scaled with the
    horizon so that the per-step budget stays the paper's, unless `cost_limit` sets it; a limit
    below the scenario's least possible cost (`cost_floor`) is refused. Subclasses set
    `paper_horizon`, `paper_d`, the cost floor, and implement `_draw` (one task's parameters) and
    `_check` (validate them); every sampled task gets "d", and `validate` checks it first.
    """

    paper_horizon: int = 1
    paper_d: float = 0.0
    # The least cost of an episode, where the scenario's cost definition gives one (None: not
    # known), and whether every episode costs strictly more (a cost positive at every step):
    # a cost_limit below it (or at it, when strict) is refused, since no policy can meet it.
    cost_floor: float | None = 0.0
    cost_floor_strict: bool = False
    cost_meaning: str = "the costs are non-negative"

    def __init__(self, horizon: int | None = None, cost_limit: float | None = None) -> None:
        self.horizon = _checked_horizon(self.name, self.paper_horizon if horizon is None else horizon)
        d = self.paper_d * self.horizon / self.paper_horizon if cost_limit is None else cost_limit
        self.cost_limit = real(self.name, "cost_limit", d)
        floor = self.cost_floor
        if floor is not None and (self.cost_limit < floor or (self.cost_floor_strict and self.cost_limit <= floor)):
            raise TaskParamError(f"{self.name}: option 'cost_limit' {self.cost_limit:g} can never be met: every "
                                 f"episode costs {'more than' if self.cost_floor_strict else 'at least'} {floor:g} "
                                 f"({self.cost_meaning}); set a limit above {floor:g}")

    def _sample(self, rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        return [{**self._draw(rng), "d": [self.cost_limit]} for _ in range(n)]

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def validate(self, task: Task) -> None:
        super().validate(task)
        limits(self.name, task.params)
        self._check(task.params)

    def _check(self, params: dict[str, Any]) -> Any:
        raise NotImplementedError
