"""The navigation scenarios in the real Safety-Gymnasium 1.0.0: sg_point_circle, sg_car_circle_hazard,
sg_point_button.

Same task distributions, task parameters, start distribution, horizon and limits as
navigation.py's point_circle, car_circle_hazard and point_button (the paper's App. D.1; the same
seed samples the same tasks); physics, rules and observations are Safety-Gymnasium's own,
computed by its envs in worker processes under Python 3.10 (sg_worker.py, environment built by
`safemeta sg-setup`, located by sg_setup.py). `SGWorkerEnv` follows the BatchEnv conventions, so
every method and the pipeline run on these scenarios unchanged.

- Copies: one Safety-Gymnasium env per copy, seeded per copy from the env seed (results do not
  depend on how copies are split over workers). Options: `sim_threads` = worker processes
  sharing the copies (default: usable CPUs, at most 4; a job's --threads sets it), `transport` =
  "shm" (shared memory, default) or "pipe" (arrays in the frames; for the benchmark).
- Starts: drawn by navigation.draw_starts from the env seed exactly as the native env draws them
  (same seed, same starts) and given to Safety-Gymnasium as the agent's fixed location and
  rotation, with the reset's goal button; goals after a press are Safety-Gymnasium's draws.
- Each reset rebuilds Safety-Gymnasium's MuJoCo model (its design; the skybox is replaced at
  load, see sg_worker).
- Worker processes outlive an env: they wait in a pool of this process and are re-initialised for
  the next task (keeping the envs of a repeated task, reseeded: the same results as new ones);
  they exit with it (their stdin closes).
- `set_pose` puts the robots at hand-built states, as the native env's (for the cross-check).
- Errors: BatchEnvError, one line, when the worker environment is missing, a worker dies, reports
  an error, or does not answer within its time limit (it is then killed); never a hang.
"""
from __future__ import annotations

import atexit
import json
import select
import subprocess
import tempfile
import weakref
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces

from . import params as P
from . import sg_worker as W
from .base import BatchEnvError, StepResult, Task, TaskParamError
from .mujoco_batch import EpisodeClock, as_numpy_actions, default_threads
from .navigation import (CAR, CAR_START_Z, POINT, CarCircleHazardDistribution, Layout, PointButtonDistribution,
                         PointCircleDistribution, Robot, draw_starts, observation_dim)
from .sg_setup import missing_message, worker_python

TRANSPORTS = ("shm", "pipe")
SEED_KEY = 0x5347                    # "SG": the copies' Safety-Gymnasium seeds come from (seed, SEED_KEY)
# time limits of a worker's answer, seconds: fixed part, per copy it serves
INIT_SECONDS, RESET_SECONDS, STEP_SECONDS = (60.0, 10.0), (30.0, 5.0), (10.0, 1.0)


# --------------------------------------------------------------------------- worker processes
class Worker:
    """One worker process and its frame channel; stderr goes to a temporary file (its tail is quoted
    in errors)."""

    def __init__(self, python: Path) -> None:
        self.python = python
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([str(python), W.__file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, bufsize=0)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, code: bytes, payload: bytes, what: str) -> None:
        try:
            W.write_frame(self.proc.stdin, code, payload)
        except OSError:
            raise self._died(what) from None

    def receive(self, timeout: float, what: str) -> bytes:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            raise BatchEnvError(f"the Safety-Gymnasium worker (pid {self.proc.pid}) did not answer {what} within "
                                f"{timeout:g} s and was killed{self._tail()}")
        try:
            status, reply = W.read_frame(self.proc.stdout)
        except EOFError:
            raise self._died(what) from None
        if status == W.ERROR:
            raise BatchEnvError(f"the Safety-Gymnasium worker failed at {what}: {reply.decode(errors='replace')}")
        return reply

    def _died(self, what: str) -> BatchEnvError:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.returncode
        return BatchEnvError(f"the Safety-Gymnasium worker (pid {self.proc.pid}) exited with status {code} during "
                             f"{what}{self._tail()}")

    def _tail(self) -> str:
        self.log.seek(0)
        lines = [ln for ln in self.log.read().decode(errors="replace").splitlines() if ln.strip()]
        return "; its last output: " + " | ".join(lines[-3:]) if lines else ""

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.alive():
            try:
                W.write_frame(self.proc.stdin, W.CLOSE)
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()


_IDLE: list[Worker] = []


def _acquire(python: Path) -> Worker:
    while _IDLE:
        worker = _IDLE.pop()
        if worker.alive() and worker.python == python:
            return worker
        worker.kill()
    return Worker(python)


@atexit.register
def close_idle_workers() -> None:
    while _IDLE:
        _IDLE.pop().close()


@dataclass
class _Part:
    """The copies `rows` of an env served by one worker, and their buffer."""

    worker: Worker
    rows: np.ndarray
    shm: Any
    buffer: Any
    io: dict[str, np.ndarray] | None
    n_inputs: int
    healthy: bool = True

    def send(self, code: bytes, what: str) -> None:
        payload = b"" if self.shm is not None else bytes(memoryview(self.buffer)[: 8 * self.n_inputs])
        self.worker.send(code, payload, what)

    def receive(self, timeout: float, what: str, outputs: bool = True) -> None:
        """Wait for the worker's answer; with the pipe transport it carries the outputs."""
        try:
            reply = self.worker.receive(timeout, what)
        except BatchEnvError:
            self.healthy = False
            raise
        if outputs and self.shm is None:
            memoryview(self.buffer)[8 * self.n_inputs:] = reply


def _release(parts: list[_Part]) -> None:
    """Give the workers back to the pool (or kill a failed one) and free the shared memory."""
    for part in parts:
        part.io = part.buffer = None                 # no views may remain when the block closes
        if part.shm is not None:
            part.shm.close()
            part.shm.unlink()
        if part.healthy and part.worker.alive():
            _IDLE.append(part.worker)
        else:
            part.worker.kill()
    parts.clear()


# --------------------------------------------------------------------------- the BatchEnv
class SGWorkerEnv:
    """`num_envs` Safety-Gymnasium copies of one navigation task; BatchEnv conventions of base.py."""

    def __init__(self, scenario: str, robot: Robot, layout: Layout, d: np.ndarray, num_envs: int, horizon: int,
                 seed: int, device: Any, workers: int, transport: str) -> None:
        python = worker_python()
        if python is None:
            raise BatchEnvError(f"scenario {scenario} needs {missing_message()}")
        self.scenario, self.robot, self.layout = scenario, robot, layout
        self.num_envs, self.horizon = int(num_envs), int(horizon)
        self.cost_limits, self.num_constraints = np.asarray(d, dtype=np.float64), 1
        self._low, self._high = -np.ones(2), np.ones(2)
        self.action_space = spaces.Box(self._low.astype(np.float32), self._high.astype(np.float32))
        obs_dim = observation_dim(robot, layout)
        self.observation_space = spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.clock = EpisodeClock(self.num_envs, horizon, 1, device)
        self.device = self.clock.device
        self.rng = np.random.default_rng(seed)      # starts: the native env's draws
        sg_seeds = np.random.SeedSequence([int(seed), SEED_KEY]).generate_state(self.num_envs)
        self.goal = np.full(self.num_envs, -1)
        self._xy = np.zeros((self.num_envs, 2))
        # The native env resets when built; a Safety-Gymnasium reset rebuilds every model (tens of ms
        # per copy), and rollouts reset before they step anyway. So the starts of that first reset
        # are drawn now (the generator stays in step with the native env's) and sent only if the
        # env is stepped or posed before any reset().
        self._pending = draw_starts(self.rng, layout, self.num_envs, scenario)
        self._parts: list[_Part] = []
        self._finalizer = weakref.finalize(self, _release, self._parts)
        task = {"radius": layout.radius, "wall": layout.wall if np.isfinite(layout.wall) else None,
                "hazards": layout.hazards.tolist(), "hazard_size": layout.hazard_size,
                "buttons": layout.buttons.tolist(), "button_size": layout.button_size, "extent": layout.extent}
        try:
            for rows in np.array_split(np.arange(self.num_envs), max(1, min(int(workers), self.num_envs))):
                names, n_inputs, total = W.buffer_layout(len(rows), obs_dim, 2)
                shm = shared_memory.SharedMemory(create=True, size=8 * total) if transport == "shm" else None
                buffer = shm.buf if shm is not None else bytearray(8 * total)
                part = _Part(_acquire(python), rows, shm, buffer, W.views(buffer, names), n_inputs)
                self._parts.append(part)
                spec = {"kind": layout.kind, "robot": "car" if robot is CAR else "point", "task": task,
                        "seeds": [int(s) for s in sg_seeds[rows]], "obs_dim": obs_dim, "act_dim": 2,
                        "start_z": CAR_START_Z,
                        "shm": shm.name if shm is not None else None}
                part.worker.send(W.INIT, json.dumps(spec).encode(), "init")
            self._receive(INIT_SECONDS, "init", outputs=False)
        except BaseException:
            self.close()
            raise

    def _command(self, code: bytes, seconds: tuple[float, float], what: str) -> None:
        for part in self._parts:
            part.send(code, what)
        self._receive(seconds, what)

    def _receive(self, seconds: tuple[float, float], what: str, outputs: bool = True) -> None:
        for part in self._parts:   # the workers run in parallel; each answers within its own limit
            part.receive(seconds[0] + seconds[1] * len(part.rows), f"{what} ({self.scenario})", outputs)

    def _gather(self, name: str) -> np.ndarray:
        return np.concatenate([part.io[name] for part in self._parts])

    def reset(self) -> Any:
        """New start poses (and goal buttons) for every copy; Safety-Gymnasium rebuilds its models."""
        self._pending = None
        return self._reset(draw_starts(self.rng, self.layout, self.num_envs, self.scenario))

    def _reset_if_new(self) -> None:
        if self._pending is not None:
            starts, self._pending = self._pending, None
            self._reset(starts)

    def _reset(self, starts: tuple[np.ndarray, np.ndarray, np.ndarray | None]) -> Any:
        xy, heading, goal = starts
        goal = np.zeros(self.num_envs) if goal is None else goal
        for part in self._parts:
            part.io["start"][:] = np.column_stack([xy, heading])[part.rows]
            part.io["goal_in"][:] = goal[part.rows]
        self._command(W.RESET, RESET_SECONDS, "reset")
        self._read_state()
        return self.clock.reset(self._gather("obs"))

    def set_pose(self, xy: np.ndarray, heading: np.ndarray, velocity: np.ndarray | None = None,
                 goal: np.ndarray | None = None) -> Any:
        """As NavigationEnv.set_pose: hand-built positions [N, 2], headings [N], planar velocities
        [N, 2] (and goal buttons [N]); starts an episode there without rebuilding."""
        self._reset_if_new()       # Safety-Gymnasium builds its worlds at the first reset
        n = self.num_envs
        start = np.column_stack([np.asarray(xy, float).reshape(n, 2), np.broadcast_to(heading, (n,))])
        velocity = np.zeros((n, 2)) if velocity is None else np.asarray(velocity, float).reshape(n, 2)
        goal = np.full(n, -1) if goal is None else np.broadcast_to(np.asarray(goal, int), (n,))
        for part in self._parts:
            part.io["start"][:], part.io["velocity"][:], part.io["goal_in"][:] = start[part.rows], velocity[part.rows], \
                goal[part.rows]
        self._command(W.POSE, RESET_SECONDS, "set_pose")
        self._read_state()
        return self.clock.reset(self._gather("obs"))

    def step(self, actions: Any) -> StepResult:
        a = as_numpy_actions(actions, self.num_envs, self._low, self._high)
        self._reset_if_new()
        active = ~self.clock.done
        for part in self._parts:
            part.io["action"][:] = a[part.rows]
            part.io["active"][:] = active[part.rows]
        self._command(W.STEP, STEP_SECONDS, "step")
        self._read_state()
        failed = self._gather("terminated") > 0.5   # a MuJoCo exception inside Safety-Gymnasium
        return self.clock.finish(self._gather("obs"), self._gather("reward"), self._gather("cost"), failed)

    def _read_state(self) -> None:
        self.goal = self._gather("goal").astype(int)
        self._xy = self._gather("xy")

    def positions(self) -> np.ndarray:
        """World xy [N, 2] of every copy's robot."""
        self._reset_if_new()
        return self._xy.copy()

    def close(self) -> None:
        self._finalizer()


# --------------------------------------------------------------------------- distributions
class _SGNavigation:
    """Safety-Gymnasium version of a native navigation distribution (`native`, the next base class)."""

    native: type = PointCircleDistribution

    def __init__(self, sim_threads: int | None = None, transport: str = "shm", **options: Any) -> None:
        super().__init__(sim_threads=sim_threads, **options)
        if transport not in TRANSPORTS:
            raise TaskParamError(f"{self.name}: option 'transport' must be one of {list(TRANSPORTS)}, got {transport!r}")
        self.transport = transport
        self._twin = self.native(**options)

    def sample(self, n: int, seed: Any) -> list[Task]:
        """The native scenario's tasks for the same seed."""
        return [Task(self.name, t.params) for t in self._twin.sample(n, seed)]

    def make_env(self, task: Task, num_envs: int, seed: int, device: Any = "cpu") -> SGWorkerEnv:
        self.validate(task)
        workers = default_threads() if self.sim_threads is None else self.sim_threads
        return SGWorkerEnv(self.name, self.robot, self.layout(task.params), P.limits(self.name, task.params),
                           int(num_envs), self.horizon, int(seed), device, workers, self.transport)


class SGPointCircleDistribution(_SGNavigation, PointCircleDistribution):
    name = "sg_point_circle"
    native = PointCircleDistribution
    robot = POINT


class SGCarCircleHazardDistribution(_SGNavigation, CarCircleHazardDistribution):
    name = "sg_car_circle_hazard"
    native = CarCircleHazardDistribution
    robot = CAR


class SGPointButtonDistribution(_SGNavigation, PointButtonDistribution):
    name = "sg_point_button"
    native = PointButtonDistribution
    robot = POINT
