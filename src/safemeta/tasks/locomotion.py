"""Locomotion task distributions on gymnasium's MuJoCo models, all copies of a task stepped as one batch.

The models are the XML files shipped in the installed gymnasium package (`envs/mujoco/assets`),
compiled once per process and stepped by `mujoco_batch.BatchSim` (no gymnasium Env objects).
Frame skip, action ranges, reset noise and observations follow gymnasium's v5 definitions;
rewards and costs follow the paper's App. D.1; the limits d are its Table 2 (p = 1 everywhere).

Per-step quantities. `v` is the forward velocity measured as gymnasium does: displacement of the
root x coordinate (Humanoid: of the centre of mass, in x and y) over one env step, divided by
dt = timestep x frame_skip. `a` is the action clipped to the actuator control range (the applied
controls; costs use it).

- half_cheetah_vel (obs 17, act 6, dt 0.05): task = goal velocity v_goal ~ U(0, 2).
  reward = -|v - v_goal|; cost = max(0, h_head - h0) with h0 = 0.65 m, where h_head is the world
  height of the centre of the `head` geom (standing still puts it at about 0.636 m, a uniformly
  random policy pays about 1.3 d per episode). d = 10. Never terminates.
- hopper_vel (obs 11 = qpos without x + qvel clipped to [-10, 10], act 3, dt 0.008): v_goal ~ U(0, 1).
  reward = -|v - v_goal|; cost = sum_i a_i^2 (weight 1: the paper's Humanoid/Swimmer definition;
  gymnasium's 1e-3 would make d = 5 unreachable). d = 5. Does not terminate: with a reward that is
  never positive, gymnasium's "unhealthy" termination would reward falling over.
  (The paper says 12-dim state; like every gymnasium Hopper we leave the x position out: 11.)
- swimmer_vel (obs 8, act 2, dt 0.04): v_goal ~ U(0, 1), noise variance sigma^2 ~ U(0, 0.5),
  cost weight w ~ U(0.5, 1). reward = -|v - v_goal|; cost = w sum_i a_i^2; d = 5. Transition noise:
  after each env step every joint velocity (qvel, 5 dofs) receives independent N(0, sigma^2) noise
  drawn from the task's generator (seeded by `make_env(..., seed)`). Never terminates.
- humanoid_dir (obs 376, act 17 in [-0.4, 0.4], dt 0.015): direction theta ~ U(0, pi/2).
  reward = v_x cos(theta) + v_y sin(theta) (centre-of-mass velocity); cost = sum_i a_i^2 over the
  17 control inputs (the torques are gear x a; squared torques would be ~1e4 larger than d = 20).
  Terminates when the torso height qpos[2] leaves (1.0, 2.0) (gymnasium's healthy range); no
  alive bonus (the paper's reward has none). Observation is the paper's 376-dim layout (gymnasium
  v4: qpos[2:], qvel, cinert, cvel, qfrc_actuator, cfrc_ext of all bodies), with cfrc_ext
  actually computed (mj_rnePostConstraint), as gymnasium v5 does.

`make_envs` builds one env of the copies of several tasks (one model; task parameters per copy),
so the tasks of a meta-iteration step as one batch.

Horizon 200 (option `horizon`). d is the paper's value at horizon 200 and scales linearly with a
shorter horizon, keeping the per-step budget (option `cost_limit` sets it directly instead).
Option `sim_threads` sets the physics threads (default: usable CPUs, at most 4).

half_cheetah_vel is also "differentiable" (kinds): a `step` whose actions require grad (torch,
grad mode on) carries gradients through the physics by MuJoCo's finite-difference transition
Jacobians (`mujoco_batch.FDTransition`; state x = (qpos, qvel), nq = nv), with observation,
reward and cost computed in torch from that state; `detach()` cuts the graph. Each such step
costs frame_skip mjd_transitionFD calls more than a plain one. Steps without gradients are the
plain numpy steps.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import gymnasium
import mujoco
import numpy as np
import torch
from gymnasium import spaces

from . import params as P
from .base import StepResult, Task
from .mujoco_batch import BatchSim, EpisodeClock, FDTransition, as_numpy_actions

PAPER_HORIZON = 200
CHEETAH_HEAD_H0 = 0.65
HUMANOID_HEALTHY_Z = (1.0, 2.0)
_ASSETS = Path(gymnasium.__file__).parent / "envs" / "mujoco" / "assets"


@lru_cache(maxsize=None)
def gym_model(xml_name: str) -> mujoco.MjModel:
    """gymnasium's MuJoCo model `xml_name`, compiled once per process (read-only, shared).

    MuJoCo 3.3+ deprecates the compiler attribute `settotalmass` (half_cheetah.xml uses it) and logs
    a warning to MUJOCO_LOG.TXT in the working directory; we apply it as MuJoCo advises instead
    (mj_setTotalmass + mj_setConst), which yields the identical model.
    """
    text = (_ASSETS / xml_name).read_text()
    total = re.search(r'\s+settotalmass="([^"]+)"', text)
    if total is None:
        return mujoco.MjModel.from_xml_path(str(_ASSETS / xml_name))
    model = mujoco.MjModel.from_xml_string(text[:total.start()] + text[total.end():])
    mujoco.mj_setTotalmass(model, float(total.group(1)))
    mujoco.mj_setConst(model, mujoco.MjData(model))
    return model


# --------------------------------------------------------------------------- distributions
class LocomotionDistribution(P.ScaledLimitDistribution):
    """Common part: options, limits, and the env factory. Subclasses set the scenario constants."""

    xml: str = ""
    frame_skip: int = 1
    paper_horizon: int = PAPER_HORIZON
    env_class: type = None  # type: ignore[assignment]

    def __init__(self, horizon: int | None = None, cost_limit: float | None = None,
                 sim_threads: int | None = None) -> None:
        super().__init__(horizon, cost_limit)
        self.sim_threads = P.optional_integer(self.name, "sim_threads", sim_threads, minimum=1)

    def make_env(self, task: Task, num_envs: int, seed: int, device: Any = "cpu") -> "LocomotionEnv":
        return self.make_envs([task], num_envs, [seed], device)

    def make_envs(self, tasks: list[Task], num_envs: int, seeds: list[int], device: Any = "cpu") -> "LocomotionEnv":
        """One env of `num_envs` copies per task, all stepped together (the model is the scenario's)."""
        for task in tasks:
            self.validate(task)
        return self.env_class(self, [t.params for t in tasks], int(num_envs), [int(s) for s in seeds], device)


class HalfCheetahVelDistribution(LocomotionDistribution):
    name, xml, frame_skip, paper_d = "half_cheetah_vel", "half_cheetah.xml", 5, 10.0
    kinds = ("sampled", "differentiable")   # gradients: MuJoCo's finite-difference Jacobians (module doc)

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"goal_velocity": rng.uniform(0.0, 2.0)}

    def _check(self, params: dict[str, Any]) -> None:
        P.number(self.name, params, "goal_velocity")


class HopperVelDistribution(LocomotionDistribution):
    name, xml, frame_skip, paper_d = "hopper_vel", "hopper.xml", 4, 5.0
    cost_floor_strict, cost_meaning = True, "the control cost sum_i a_i^2 of a Gaussian policy is positive at every step"

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"goal_velocity": rng.uniform(0.0, 1.0)}

    def _check(self, params: dict[str, Any]) -> None:
        P.number(self.name, params, "goal_velocity")


class SwimmerVelDistribution(LocomotionDistribution):
    name, xml, frame_skip, paper_d = "swimmer_vel", "swimmer.xml", 4, 5.0
    cost_floor_strict, cost_meaning = True, "the control cost w sum_i a_i^2 (w >= 0.5) of a Gaussian policy is positive at every step"

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"goal_velocity": rng.uniform(0.0, 1.0), "noise_var": rng.uniform(0.0, 0.5),
                "cost_weight": rng.uniform(0.5, 1.0)}

    def _check(self, params: dict[str, Any]) -> None:
        P.number(self.name, params, "goal_velocity")
        P.number(self.name, params, "noise_var", low=0.0)
        P.number(self.name, params, "cost_weight", low=0.0)


class HumanoidDirDistribution(LocomotionDistribution):
    name, xml, frame_skip, paper_d = "humanoid_dir", "humanoid.xml", 5, 20.0
    cost_floor_strict, cost_meaning = True, "the control cost sum_i a_i^2 of a Gaussian policy is positive at every step"

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"direction": rng.uniform(0.0, math.pi / 2)}

    def _check(self, params: dict[str, Any]) -> None:
        P.number(self.name, params, "direction")


# --------------------------------------------------------------------------- batched envs
class LocomotionEnv:
    """`num_envs` copies of each of the tasks `params` (block k = copies k*num_envs ... of task k,
    draws from the generator of seeds[k]); BatchEnv conventions of base.py. Task parameters are
    per-copy arrays [N] in `params`, so every step is vectorised over the copies of all tasks,
    and block k evolves exactly as an env of task k alone with seed seeds[k].

    Subclasses define the observation, the tracked position (for v), reward, cost and failure.
    """

    reset_noise: float = 0.0

    def __init__(self, dist: LocomotionDistribution, params: list[dict[str, Any]], num_envs: int, seeds: list[int],
                 device: Any) -> None:
        self.per_task, self.num_tasks = num_envs, len(params)
        self.params = {k: np.repeat([float(p[k]) for p in params], num_envs) for k in params[0] if k != "d"}
        self.num_envs, self.horizon = num_envs * len(params), dist.horizon
        self.model = gym_model(dist.xml)
        self.sim = self._make_stepper(dist.frame_skip, dist.sim_threads)
        self.rngs = [np.random.default_rng(seed) for seed in seeds]
        limits = [np.asarray(p["d"], dtype=np.float64) for p in params]
        self.cost_limits = limits[0] if len(limits) == 1 else np.stack(limits)   # [p], or [tasks, p]
        self.num_constraints = 1
        self._low, self._high = self.model.actuator_ctrlrange.T.copy()
        self.action_space = spaces.Box(self._low.astype(np.float32), self._high.astype(np.float32))
        self.clock = EpisodeClock(self.num_envs, self.horizon, 1, device)
        self.device = self.clock.device
        dim = self.reset().shape[1]
        self.observation_space = spaces.Box(-np.inf, np.inf, (dim,), np.float32)

    def _make_stepper(self, frame_skip: int, threads: int | None) -> BatchSim:
        return BatchSim(self.model, self.num_envs, frame_skip, threads)

    def _initial_state(self) -> tuple[np.ndarray, np.ndarray]:
        """Every block's start, drawn from its task's generator."""
        starts = [self._draw_start(rng, self.per_task) for rng in self.rngs]
        return np.concatenate([q for q, _ in starts]), np.concatenate([v for _, v in starts])

    def _draw_start(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """gymnasium's reset of n copies: uniform noise of scale `reset_noise` on qpos and qvel."""
        m, s = self.model, self.reset_noise
        qpos = m.qpos0 + rng.uniform(-s, s, (n, m.nq))
        qvel = rng.uniform(-s, s, (n, m.nv))
        return qpos, qvel

    def reset(self) -> Any:
        qpos, qvel = self._initial_state()
        self.sim.set_state(np.arange(self.num_envs), qpos, qvel)
        self._state = None
        return self.clock.reset(self._obs())

    def detach(self) -> None:
        """Stop gradients from flowing back past the current state (differentiable steps)."""
        if self._state is not None:
            self._state = self._state.detach()

    def step(self, actions: Any) -> StepResult:
        if isinstance(actions, torch.Tensor) and actions.requires_grad and torch.is_grad_enabled():
            return self._differentiable_step(actions)
        self._state = None
        a = as_numpy_actions(actions, self.num_envs, self._low, self._high)
        active = ~self.clock.done
        before = self._position().copy()
        self.sim.step(a, active)
        velocity = (self._position() - before) / self.sim.dt
        self._after_physics(active)
        return self.clock.finish(self._obs(), self._reward(velocity), self._cost(a), self._failed())

    def _differentiable_step(self, actions: torch.Tensor) -> StepResult:
        """One step whose outputs carry gradients to the actions and the state (module doc)."""
        nq = self.model.nq
        if nq != self.model.nv or self.model.na:
            raise ValueError(f"{type(self).__name__}: differentiable steps need nq == nv and no actuator state")
        if self._state is None:
            self._state = torch.from_numpy(np.concatenate([self.sim.qpos, self.sim.qvel], 1)).to(self.device)
        low, high = (torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in (self._low, self._high))
        a = torch.maximum(torch.minimum(actions.to(torch.float64), high), low)
        if not torch.isfinite(a).all():
            raise ValueError("actions contain NaN or inf")
        was_done = torch.from_numpy(self.clock.done.copy()).to(self.device)
        jac_a, jac_b = self.sim.step_jacobians(a.detach().cpu().numpy(), ~self.clock.done)
        after = torch.from_numpy(np.concatenate([self.sim.qpos, self.sim.qvel], 1)).to(self.device)
        before = self._state
        self._state = FDTransition.apply(before, a, *(torch.from_numpy(j).to(self.device) for j in (jac_a, jac_b)), after)
        velocity = (self._state[:, 0] - before[:, 0]) / self.sim.dt
        reward, cost = self._torch_reward(velocity), self._torch_cost(self._state[:, :nq], a)
        zero = torch.zeros_like(reward)
        reward, cost = torch.where(was_done, zero, reward), torch.where(was_done, zero, cost)
        obs = self._torch_obs(self._state[:, :nq], self._state[:, nq:]).to(torch.float32)
        self.clock.done |= self._failed()
        self.clock.t += 1
        return StepResult(obs=obs, reward=reward.to(torch.float32), cost=cost.to(torch.float32)[:, None],
                          terminated=torch.from_numpy(self.clock.done.copy()).to(self.device),
                          truncated=torch.full((self.num_envs,), self.clock.t >= self.horizon, device=self.device))

    def set_state(self, qpos: np.ndarray, qvel: np.ndarray) -> Any:
        """Put every copy at a hand-built state (tests, diagnostics); returns the observation."""
        self.sim.set_state(np.arange(self.num_envs), np.broadcast_to(qpos, (self.num_envs, self.model.nq)),
                           np.broadcast_to(qvel, (self.num_envs, self.model.nv)))
        self._state = None
        return self.clock.reset(self._obs())

    def close(self) -> None:
        self.sim.close()

    # scenario hooks
    def _obs(self) -> np.ndarray:
        raise NotImplementedError

    def _position(self) -> np.ndarray:
        return self.sim.qpos[:, 0]

    def _reward(self, velocity: np.ndarray) -> np.ndarray:
        return -np.abs(velocity - self.params["goal_velocity"])

    def _cost(self, a: np.ndarray) -> np.ndarray:
        return np.sum(a * a, axis=1)

    def _failed(self) -> np.ndarray:
        return np.zeros(self.num_envs, bool)

    def _after_physics(self, active: np.ndarray) -> None:
        pass

    # the same in torch, for differentiable steps (tasks that are "differentiable" define them)
    def _torch_obs(self, qpos: torch.Tensor, qvel: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no differentiable steps")

    def _torch_reward(self, velocity: torch.Tensor) -> torch.Tensor:
        return -torch.abs(velocity - torch.as_tensor(self.params["goal_velocity"], device=velocity.device))

    def _torch_cost(self, qpos: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no differentiable steps")


class HalfCheetahVelEnv(LocomotionEnv):
    reset_noise = 0.1

    def __init__(self, *args: Any) -> None:
        model = gym_model(HalfCheetahVelDistribution.xml)
        head = model.geom("head")
        self._torso_z = float(model.body_pos[head.bodyid[0], 2])
        self._head_xz = (float(model.geom_pos[head.id, 0]), float(model.geom_pos[head.id, 2]))
        super().__init__(*args)

    def _draw_start(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        qpos, _ = super()._draw_start(rng, n)  # gymnasium: velocity noise is Gaussian for the cheetah
        return qpos, self.reset_noise * rng.standard_normal((n, self.model.nv))

    def head_height(self, qpos, lib: Any = np):
        """World z of the head geom centre: torso at (rootx, torso_z + rootz), pitched by rooty
        (`lib`: numpy for arrays, torch for tensors)."""
        gx, gz = self._head_xz
        pitch = qpos[:, 2]
        return self._torso_z + qpos[:, 1] - lib.sin(pitch) * gx + lib.cos(pitch) * gz

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.sim.qpos[:, 1:], self.sim.qvel], axis=1)

    def _cost(self, a: np.ndarray) -> np.ndarray:
        return np.maximum(0.0, self.head_height(self.sim.qpos) - CHEETAH_HEAD_H0)

    def _torch_obs(self, qpos: torch.Tensor, qvel: torch.Tensor) -> torch.Tensor:
        return torch.cat([qpos[:, 1:], qvel], dim=1)

    def _torch_cost(self, qpos: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.head_height(qpos, torch) - CHEETAH_HEAD_H0, min=0.0)


class HopperVelEnv(LocomotionEnv):
    reset_noise = 5e-3

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.sim.qpos[:, 1:], np.clip(self.sim.qvel, -10.0, 10.0)], axis=1)


class SwimmerVelEnv(LocomotionEnv):
    reset_noise = 0.1

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.sim.qpos[:, 2:], self.sim.qvel], axis=1)

    def _cost(self, a: np.ndarray) -> np.ndarray:
        return self.params["cost_weight"] * np.sum(a * a, axis=1)

    def __init__(self, dist: LocomotionDistribution, params: list[dict[str, Any]], num_envs: int, *args: Any) -> None:
        self._noise_scale = np.repeat([math.sqrt(float(p["noise_var"])) for p in params], num_envs)[:, None]  # sigma
        super().__init__(dist, params, num_envs, *args)

    def _after_physics(self, active: np.ndarray) -> None:
        draws = np.concatenate([rng.standard_normal((self.per_task, self.model.nv)) for rng in self.rngs])
        self.sim.add_qvel(self._noise_scale * draws * active[:, None])


class HumanoidDirEnv(LocomotionEnv):
    reset_noise = 1e-2
    _fields = ("cinert", "cvel", "qfrc_actuator", "cfrc_ext", "xipos")

    def _make_stepper(self, frame_skip: int, threads: int | None) -> BatchSim:
        self._mass = self.model.body_mass / self.model.body_mass.sum()
        return BatchSim(self.model, self.num_envs, frame_skip, threads, self._fields, post_constraint=True)

    def _obs(self) -> np.ndarray:
        b, n = self.sim.buffers, self.num_envs
        return np.concatenate([b["qpos"][:, 2:], b["qvel"], b["cinert"].reshape(n, -1), b["cvel"].reshape(n, -1),
                               b["qfrc_actuator"], b["cfrc_ext"].reshape(n, -1)], axis=1)

    def _position(self) -> np.ndarray:
        return np.einsum("b,nbk->nk", self._mass, self.sim.buffers["xipos"][:, :, :2])

    def __init__(self, dist: LocomotionDistribution, params: list[dict[str, Any]], num_envs: int, *args: Any) -> None:
        self._heading = np.stack([np.repeat([f(float(p["direction"])) for p in params], num_envs)
                                  for f in (math.cos, math.sin)])          # [2, N]: cos, sin of the direction
        super().__init__(dist, params, num_envs, *args)

    def _reward(self, velocity: np.ndarray) -> np.ndarray:
        return velocity[:, 0] * self._heading[0] + velocity[:, 1] * self._heading[1]

    def _failed(self) -> np.ndarray:
        z = self.sim.qpos[:, 2]
        return (z <= HUMANOID_HEALTHY_Z[0]) | (z >= HUMANOID_HEALTHY_Z[1])


HalfCheetahVelDistribution.env_class = HalfCheetahVelEnv
HopperVelDistribution.env_class = HopperVelEnv
SwimmerVelDistribution.env_class = SwimmerVelEnv
HumanoidDirDistribution.env_class = HumanoidDirEnv
