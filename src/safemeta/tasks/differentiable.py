"""Differentiable task distributions in torch: gradients flow from rewards and costs through `step`.

Each env holds its state as a tensor on `device` (cpu or cuda); `step(actions)` builds the next
state from the actions with torch operations, so rewards, costs and observations carry the autograd
graph back to the actions (and to whatever produced them). `detach()` cuts the graph at the current
state (windowed back-propagation, as in SHAC/CGPO). Initial states come from a torch CPU
generator seeded by `make_env(..., seed)` and are moved to `device`, so a seed gives the same
rollouts on any device. Option `dtype` ("float32" default, or "float64") sets the precision.

- function_env (CGPO App. C, Eq. 70): state x in R, action a clipped to [-1, 1], x' = x + 0.2 a.
  Reward and cost are both f(x - c) with f(x) = (x/10)^2 + 0.1 + 0.1 sin(8x/pi), evaluated at the
  state the action is taken in (J_C = sum_{t=0}^{T-1} f(x_t), Eq. 84); T = 100, d = 8. Per task the
  shift c ~ U(-1, 1) moves the landscape (c = 0 is CGPO's environment). x_0 ~ U(-0.1, 0.1).
- function_env_floor (CGPO App. F.4.1, Eq. 83): the same with (floor(x)/10)^2 in place of (x/10)^2,
  so the quadratic part is constant between integers and contributes no gradient.
- cartpole_pos (CGPO App. E, "position-constrained CartPole"): classic cart-pole equations,
  explicit Euler with dt = 0.02, g = 9.8, cart mass 1.0, force = a clipped to [-3, 3]; state
  (x, theta, x_dot, theta_dot), x_0 ~ U(-0.05, 0.05)^4. reward 1 per step; cost -x^2 of the state
  reached; T = 300, d = -50 (the constraint sum x^2 >= 50). Terminates when |theta| > 0.2 rad or
  |x| > 2.4 (reward 1 on that step). Per task: pole mass ~ U(0.05, 0.15), pole half-length ~ U(0.4, 0.6)
  (CGPO's 0.1 and 0.5 are the centres).
- point_circle_diff: a point mass in the plane, state (x, y, v_x, v_y), action = force in [-1, 1]^2,
  v' = v + dt (2 a - v), p' = p + dt v', dt = 0.05; start at rest, position ~ U(-0.2, 0.2)^2.
  reward = 0.1 ((-v_x y + v_y x)/rho) / (1 + |rho - R|_s) with rho = sqrt(x^2 + y^2 + 1e-4) and
  |z|_s = sqrt(z^2 + 1e-4) (Safety-Gymnasium's circle reward, smoothed); cost = sigmoid((|x|_s - wall)/0.05),
  wall = wall_factor R, both on the state reached. Per task R ~ U(1.0, 1.5), wall_factor ~ U(0.55, 0.75).
  T = 200, d = 10.

d scales linearly when the horizon is shortened (option `horizon`), or set option `cost_limit`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from . import params as P
from .base import StepResult, Task, TaskParamError


def function_f(x: torch.Tensor, floor: bool = False) -> torch.Tensor:
    """CGPO's f (Eq. 70), or its floor variant (Eq. 83)."""
    base = torch.floor(x) if floor else x
    return (base / 10.0) ** 2 + 0.1 + 0.1 * torch.sin(8.0 * x / math.pi)


def _dtype(scenario: str, name: str) -> torch.dtype:
    if name not in ("float32", "float64"):
        raise TaskParamError(f"{scenario}: option 'dtype' must be 'float32' or 'float64', got {name!r}")
    return getattr(torch, name)


# --------------------------------------------------------------------------- distributions
class TorchDistribution(P.ScaledLimitDistribution):
    """Options shared by the torch tasks; subclasses set the constants and the env class."""

    paper_horizon: int = 100
    env_class: type = None  # type: ignore[assignment]
    kinds = ("sampled", "differentiable")

    def __init__(self, horizon: int | None = None, cost_limit: float | None = None, dtype: str = "float32") -> None:
        super().__init__(horizon, cost_limit)
        self.dtype = _dtype(self.name, dtype)

    def make_env(self, task: Task, num_envs: int, seed: int, device: Any = "cpu") -> "TorchEnv":
        self.validate(task)
        return self.env_class(self._check(task.params), P.limits(self.name, task.params), int(num_envs),
                              self.horizon, int(seed), torch.device(device), self.dtype)


class FunctionEnvDistribution(TorchDistribution):
    name, paper_horizon, paper_d = "function_env", 100, 8.0
    cost_floor_strict, cost_meaning = True, "f(x - c) is positive at every state"

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"shift": rng.uniform(-1.0, 1.0)}

    def _check(self, params: dict[str, Any]) -> dict[str, float]:
        return {"shift": P.number(self.name, params, "shift")}


class FunctionEnvFloorDistribution(FunctionEnvDistribution):
    name = "function_env_floor"


class CartPolePosDistribution(TorchDistribution):
    name, paper_horizon, paper_d = "cartpole_pos", 300, -50.0
    cost_floor = None   # cost -x^2: negative, bounded by the track only

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"pole_mass": rng.uniform(0.05, 0.15), "pole_half_length": rng.uniform(0.4, 0.6)}

    def _check(self, params: dict[str, Any]) -> dict[str, float]:
        return {"pole_mass": P.number(self.name, params, "pole_mass", low=0.0, strict_low=True),
                "pole_half_length": P.number(self.name, params, "pole_half_length", low=0.0, strict_low=True)}


class PointCircleDiffDistribution(TorchDistribution):
    name, paper_horizon, paper_d = "point_circle_diff", 200, 10.0
    cost_floor_strict, cost_meaning = True, "the sigmoid wall cost is positive at every step"

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"radius": rng.uniform(1.0, 1.5), "wall_factor": rng.uniform(0.55, 0.75)}

    def _check(self, params: dict[str, Any]) -> dict[str, float]:
        return {"radius": P.number(self.name, params, "radius", low=0.0, strict_low=True),
                "wall_factor": P.number(self.name, params, "wall_factor", low=0.0, strict_low=True)}


# --------------------------------------------------------------------------- batched envs
class TorchEnv:
    """BatchEnv over a state tensor [N, state_dim]; subclasses define the dynamics."""

    obs_dim: int = 0
    act_low: tuple[float, ...] = ()
    act_high: tuple[float, ...] = ()

    def __init__(self, params: dict[str, float], d: np.ndarray, num_envs: int, horizon: int, seed: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.params, self.num_envs, self.horizon = params, num_envs, horizon
        self.device, self.dtype = device, dtype
        self.cost_limits, self.num_constraints = np.asarray(d, dtype=np.float64), 1
        self.observation_space = spaces.Box(-np.inf, np.inf, (self.obs_dim,), np.float32)
        self.action_space = spaces.Box(np.array(self.act_low, np.float32), np.array(self.act_high, np.float32))
        self._low = torch.tensor(self.act_low, device=device, dtype=dtype)
        self._high = torch.tensor(self.act_high, device=device, dtype=dtype)
        self._gen = torch.Generator(device="cpu").manual_seed(int(seed))
        self.reset()

    def _uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        u = torch.rand(shape, generator=self._gen, dtype=torch.float64)
        return (low + (high - low) * u).to(self.device, self.dtype)

    def reset(self) -> torch.Tensor:
        self.t = 0
        self.state = self._initial_state()
        self.done = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return self._obs(self.state)

    def detach(self) -> None:
        """Stop gradients from flowing back past the current state."""
        self.state = self.state.detach()

    def step(self, actions: torch.Tensor) -> StepResult:
        a = torch.as_tensor(actions, device=self.device, dtype=self.dtype)
        if a.shape != (self.num_envs, len(self.act_low)):
            raise ValueError(f"actions must have shape [{self.num_envs}, {len(self.act_low)}], got {list(a.shape)}")
        a = torch.maximum(torch.minimum(a, self._high), self._low)
        nxt, reward, cost, failed = self._dynamics(self.state, a)
        live = ~self.done
        self.state = torch.where(live[:, None], nxt, self.state)
        reward = torch.where(live, reward, torch.zeros_like(reward))
        cost = torch.where(live, cost, torch.zeros_like(cost))[:, None]
        self.done = self.done | failed
        self.t += 1
        truncated = torch.full((self.num_envs,), self.t >= self.horizon, dtype=torch.bool, device=self.device)
        return StepResult(obs=self._obs(self.state), reward=reward, cost=cost, terminated=self.done.clone(),
                          truncated=truncated)

    def _obs(self, state: torch.Tensor) -> torch.Tensor:
        return state.clone()   # callers may modify observations in place; the state must not change

    def _initial_state(self) -> torch.Tensor:
        raise NotImplementedError

    def _dynamics(self, s: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(next state, reward [N], cost [N], failed [N] bool)."""
        raise NotImplementedError


class FunctionEnv(TorchEnv):
    obs_dim, act_low, act_high = 1, (-1.0,), (1.0,)
    floor = False

    def _initial_state(self) -> torch.Tensor:
        return self._uniform((self.num_envs, 1), -0.1, 0.1)

    def _dynamics(self, s: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = function_f(s[:, 0] - self.params["shift"], self.floor)
        return s + 0.2 * a, f, f, torch.zeros_like(self.done)


class FunctionFloorEnv(FunctionEnv):
    floor = True


class CartPoleEnv(TorchEnv):
    obs_dim, act_low, act_high = 4, (-3.0,), (3.0,)
    gravity, cart_mass, dt = 9.8, 1.0, 0.02
    theta_limit, x_limit = 0.2, 2.4

    def _initial_state(self) -> torch.Tensor:
        return self._uniform((self.num_envs, 4), -0.05, 0.05)

    def _dynamics(self, s: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, theta, x_dot, theta_dot = s.unbind(1)
        mp, length = self.params["pole_mass"], self.params["pole_half_length"]
        total = self.cart_mass + mp
        sin, cos = torch.sin(theta), torch.cos(theta)
        temp = (a[:, 0] + mp * length * theta_dot ** 2 * sin) / total
        theta_acc = (self.gravity * sin - cos * temp) / (length * (4.0 / 3.0 - mp * cos ** 2 / total))
        x_acc = temp - mp * length * theta_acc * cos / total
        nxt = torch.stack([x + self.dt * x_dot, theta + self.dt * theta_dot,
                           x_dot + self.dt * x_acc, theta_dot + self.dt * theta_acc], dim=1)
        failed = (nxt[:, 1].abs() > self.theta_limit) | (nxt[:, 0].abs() > self.x_limit)
        return nxt, torch.ones_like(x), -nxt[:, 0] ** 2, failed


class PointCircleDiffEnv(TorchEnv):
    obs_dim, act_low, act_high = 4, (-1.0, -1.0), (1.0, 1.0)
    dt, force_gain, damping, reward_scale, wall_softness, eps = 0.05, 2.0, 1.0, 0.1, 0.05, 1e-4

    def _initial_state(self) -> torch.Tensor:
        pos = self._uniform((self.num_envs, 2), -0.2, 0.2)
        return torch.cat([pos, torch.zeros_like(pos)], dim=1)

    def _dynamics(self, s: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vel = s[:, 2:] + self.dt * (self.force_gain * a - self.damping * s[:, 2:])
        pos = s[:, :2] + self.dt * vel
        x, y, vx, vy = pos[:, 0], pos[:, 1], vel[:, 0], vel[:, 1]
        rho = torch.sqrt(x ** 2 + y ** 2 + self.eps)
        gap = torch.sqrt((rho - self.params["radius"]) ** 2 + self.eps)
        reward = self.reward_scale * ((-vx * y + vy * x) / rho) / (1.0 + gap)
        wall = self.params["wall_factor"] * self.params["radius"]
        cost = torch.sigmoid((torch.sqrt(x ** 2 + self.eps) - wall) / self.wall_softness)
        return torch.cat([pos, vel], dim=1), reward, cost, torch.zeros_like(self.done)


FunctionEnvDistribution.env_class = FunctionEnv
FunctionEnvFloorDistribution.env_class = FunctionFloorEnv
CartPolePosDistribution.env_class = CartPoleEnv
PointCircleDiffDistribution.env_class = PointCircleDiffEnv
