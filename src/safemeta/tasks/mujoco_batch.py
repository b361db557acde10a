"""Batched MuJoCo stepping: `num_envs` copies of one compiled model (or of several models with
one signature, e.g. one per task) advanced together.

`BatchSim` keeps each copy's integration state (MuJoCo's mjSTATE_INTEGRATION: time, qpos, qvel,
act, the solver's warm start, controls, applied forces, ...: all mj_step depends on) in one
array, and steps the copies in a tight loop on one working MjData per thread and model: state
in, mj_step, state and the requested fields out. The working MjData stays in the core's cache,
where one persistent MjData per copy would stream every copy's whole MjData through memory at
every step (measured: 0.8 of a bare one-MjData loop at 100 copies, against about 0.95). Stepping
is bit for bit that of a persistent MjData per copy (gymnasium's), as MuJoCo documents for this
state and as the tests check. The loop is split across a persistent thread pool (mj_step releases
the GIL, so threads run physics in parallel). After each env step the requested MjData fields
are gathered into `[N, ...]` numpy buffers, so reward, cost and observation code is vectorised
over copies. Copies may use different models (the tasks of a navigation batch: their own
hazards and walls) when those agree in the dimensions the buffers, controls and states read (nq,
nv, nu, na, the gathered fields, the state size) and in the timestep. `benchmarks/bench_envs.py`
measures the loop against a bare `mj_step` loop on one MjData and against `mujoco.rollout`
(which also zeroes the solver warm start at every call and stops a copy at the first MuJoCo
warning).

Sensor values: with `forward=True`, BatchSim runs mj_forward after the substeps of an env step,
so sensors and derived quantities describe the state after stepping (as Safety-Gymnasium does);
otherwise they are those MuJoCo computed inside the last substep, before its integration (one
substep old, as gymnasium's MuJoCo envs give them). After `set_state` they are exact (mj_forward).
`contacts=True` also keeps each copy's contact geom pairs of its last step. `data(i)` rebuilds
copy i as an MjData (its state, then mj_forward) for inspection.

`EpisodeClock` is the BatchEnv bookkeeping the MuJoCo families share: step counter, which copies
have terminated (they stay frozen with zero reward and cost until reset), tensor conversion.

Gradients (a differentiable step, for tasks that offer one): `BatchSim.step_jacobians` steps and
returns MuJoCo's finite-difference transition Jacobians of every copy (mjd_transitionFD per
substep, chained over the frame skip); `FDTransition` turns them into an autograd function, so
a torch graph of state and controls passes through the simulator.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import mujoco
import numpy as np
import torch

from .base import StepResult

STATE = mujoco.mjtState.mjSTATE_INTEGRATION   # everything mj_step's result depends on


def default_threads() -> int:
    """Threads for physics: the CPUs this process may use, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4))


class BatchSim:
    """N copies of `model` (or copy i of `model[i]`, a sequence of N models of one signature),
    stepped `frame_skip` substeps per env step (module docstring).

    `buffers[name]` is `[N, *shape]` for each MjData field in `fields` (qpos and qvel are always
    gathered). `post_constraint` runs mj_rnePostConstraint after stepping (fills cfrc_ext);
    `forward` runs mj_forward after stepping (fresh sensors, positions and contacts); `contacts`
    keeps `contacts[i]`, the geom pairs [ncon, 2] of copy i's contacts after its last step.
    """

    def __init__(self, model: mujoco.MjModel | Sequence[mujoco.MjModel], num_envs: int, frame_skip: int,
                 threads: int | None = None, fields: Sequence[str] = (), post_constraint: bool = False,
                 forward: bool = False, contacts: bool = False) -> None:
        self.num_envs, self.frame_skip = int(num_envs), int(frame_skip)
        self.models = list(model) if isinstance(model, Sequence) else [model] * self.num_envs
        if len(self.models) != self.num_envs:
            raise ValueError(f"BatchSim: {len(self.models)} models for {self.num_envs} copies")
        self.model = self.models[0]
        self.dt = self.model.opt.timestep * self.frame_skip
        threads = default_threads() if threads is None else int(threads)
        self.threads = max(1, min(threads, self.num_envs))
        self.post_constraint, self.forward = bool(post_constraint), bool(forward)
        self.fields = ("qpos", "qvel") + tuple(f for f in fields if f not in ("qpos", "qvel"))
        distinct = list({id(m): m for m in self.models}.values())
        probes = {id(m): mujoco.MjData(m) for m in distinct}
        _check_signature(distinct, [probes[id(m)] for m in distinct], self.fields)
        first = probes[id(self.model)]
        self.buffers = {name: np.zeros((self.num_envs,) + np.shape(getattr(first, name))) for name in self.fields}
        self.states = np.stack([_state_of(m, probes[id(m)]) for m in self.models])   # [N, state size]
        self._qvel = slice(*(mujoco.mj_stateSize(self.model, s) for s in (
            mujoco.mjtState.mjSTATE_TIME | mujoco.mjtState.mjSTATE_QPOS,
            mujoco.mjtState.mjSTATE_TIME | mujoco.mjtState.mjSTATE_QPOS | mujoco.mjtState.mjSTATE_QVEL)))
        self.contacts: list[np.ndarray] | None = [np.zeros((0, 2), int)] * self.num_envs if contacts else None
        self._executor = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        bounds = np.linspace(0, self.num_envs, self.threads + 1).astype(int)
        self._chunks = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        # one working MjData per thread and model, with the (buffer, MjData field view) pairs that
        # `_store` copies (MuJoCo's field arrays stay in place for the MjData's life)
        self._work = [{id(m): self._working_data(m) for m in distinct} for _ in self._chunks]

    @property
    def qpos(self) -> np.ndarray:
        return self.buffers["qpos"]

    @property
    def qvel(self) -> np.ndarray:
        return self.buffers["qvel"]

    def data(self, i: int) -> mujoco.MjData:
        """A new MjData holding copy i's state, with mj_forward's quantities of that state."""
        m = self.models[i]
        d = mujoco.MjData(m)
        mujoco.mj_setState(m, d, self.states[i], STATE)
        mujoco.mj_forward(m, d)
        return d

    def _working_data(self, model: mujoco.MjModel) -> tuple[mujoco.MjData, list[tuple[np.ndarray, np.ndarray]]]:
        d = mujoco.MjData(model)
        return d, [(self.buffers[name], getattr(d, name)) for name in self.fields]

    def _store(self, i: int, d: mujoco.MjData, views: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Copy i's state and gathered fields (`views` of d) out of the working MjData d."""
        mujoco.mj_getState(self.models[i], d, self.states[i], STATE)
        for buffer, view in views:
            buffer[i] = view
        if self.contacts is not None:
            self.contacts[i] = d.contact.geom.copy() if d.ncon else np.zeros((0, 2), int)

    def set_state(self, rows: Sequence[int], qpos: np.ndarray, qvel: np.ndarray) -> None:
        """Reset copies `rows` to (qpos[k], qvel[k]) at time 0 (the model is untouched) and run mj_forward."""
        work = self._work[0]
        for k, r in enumerate(rows):
            m = self.models[r]
            d, views = work[id(m)]
            mujoco.mj_resetData(m, d)
            d.qpos[:], d.qvel[:] = qpos[k], qvel[k]
            mujoco.mj_forward(m, d)
            if self.post_constraint:
                mujoco.mj_rnePostConstraint(m, d)
            self._store(r, d, views)

    def add_qvel(self, delta: np.ndarray) -> None:
        """Add `delta [N, nv]` to every copy's joint velocities (transition noise)."""
        self.states[:, self._qvel] += delta
        self.buffers["qvel"] += delta

    def _run(self, chunk: int, ctrl: np.ndarray, active: np.ndarray) -> None:
        lo, hi = self._chunks[chunk]
        work, models, states = self._work[chunk], self.models, self.states
        fs, post, forward, step = self.frame_skip, self.post_constraint, self.forward, mujoco.mj_step
        for i in range(lo, hi):
            if active[i]:
                m = models[i]
                d, views = work[id(m)]
                mujoco.mj_setState(m, d, states[i], STATE)
                d.ctrl[:] = ctrl[i]
                step(m, d, nstep=fs)
                if forward:
                    mujoco.mj_forward(m, d)
                if post:
                    mujoco.mj_rnePostConstraint(m, d)
                self._store(i, d, views)

    def step(self, ctrl: np.ndarray, active: np.ndarray | None = None) -> None:
        """Advance the `active` copies (all by default) by one env step under controls `ctrl [N, nu]`."""
        active = np.ones(self.num_envs, bool) if active is None else active
        if self._executor is None:
            self._run(0, ctrl, active)
            return
        futures = [self._executor.submit(self._run, c, ctrl, active) for c in range(len(self._chunks))]
        for f in futures:
            f.result()

    def step_jacobians(self, ctrl: np.ndarray, active: np.ndarray | None = None, eps: float = 1e-6,
                       centered: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`step`, also returning each copy's transition Jacobians of the whole env step:
        A = dx'/dx [N, n, n] and B = dx'/dctrl [N, n, nu], x = (qpos tangent, qvel, act), n = 2 nv + na.

        Per physics substep MuJoCo's finite differences (mjd_transitionFD, at the substep's state
        and the env step's controls) give (A_i, B_i); over frame_skip substeps with the control
        held, A = A_k ... A_1 and B = sum_i A_k ... A_{i+1} B_i. Copies not active keep A = I, B = 0.
        """
        active = np.ones(self.num_envs, bool) if active is None else active
        n, nu = 2 * self.model.nv + self.model.na, self.model.nu
        jac_a = np.broadcast_to(np.eye(n), (self.num_envs, n, n)).copy()
        jac_b = np.zeros((self.num_envs, n, nu))
        work = [(c, ctrl, active, jac_a, jac_b, eps, centered) for c in range(len(self._chunks))]
        if self._executor is None:
            for args in work:
                self._run_jacobians(*args)
        else:
            for f in [self._executor.submit(self._run_jacobians, *args) for args in work]:
                f.result()
        return jac_a, jac_b

    def _run_jacobians(self, chunk: int, ctrl: np.ndarray, active: np.ndarray, jac_a: np.ndarray,
                       jac_b: np.ndarray, eps: float, centered: bool) -> None:
        lo, hi = self._chunks[chunk]
        n = 2 * self.model.nv + self.model.na
        a_sub, b_sub = np.zeros((n, n)), np.zeros((n, self.model.nu))
        for i in range(lo, hi):
            if not active[i]:
                continue
            m = self.models[i]
            d, views = self._work[chunk][id(m)]
            mujoco.mj_setState(m, d, self.states[i], STATE)
            d.ctrl[:] = ctrl[i]
            for _ in range(self.frame_skip):
                mujoco.mjd_transitionFD(m, d, eps, centered, a_sub, b_sub, None, None)
                jac_b[i] = a_sub @ jac_b[i] + b_sub
                jac_a[i] = a_sub @ jac_a[i]
                mujoco.mj_step(m, d)
            if self.post_constraint:
                mujoco.mj_rnePostConstraint(m, d)
            self._store(i, d, views)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def __del__(self) -> None:
        if getattr(self, "_executor", None) is not None:
            self.close()


def _state_of(model: mujoco.MjModel, data: mujoco.MjData) -> np.ndarray:
    out = np.empty(mujoco.mj_stateSize(model, STATE))
    mujoco.mj_getState(model, data, out, STATE)
    return out


def _check_signature(models: list[mujoco.MjModel], datas: list[mujoco.MjData], fields: Sequence[str]) -> None:
    """Copies of different models must agree in what BatchSim gathers, controls and stores."""
    def signature(m: mujoco.MjModel, d: mujoco.MjData) -> tuple:
        return (m.nq, m.nv, m.nu, m.na, m.opt.timestep, mujoco.mj_stateSize(m, STATE),
                *(np.shape(getattr(d, f)) for f in fields))

    first = signature(models[0], datas[0])
    for i, (m, d) in enumerate(zip(models, datas)):
        if signature(m, d) != first:
            raise ValueError(f"BatchSim: model {i} differs from model 0 in (nq, nv, nu, na, timestep, state size, "
                             f"{', '.join(fields)}): {signature(m, d)} vs {first}")


class EpisodeClock:
    """Step counter, terminated mask and tensor output shared by the MuJoCo BatchEnvs."""

    def __init__(self, num_envs: int, horizon: int, num_constraints: int, device: Any) -> None:
        self.num_envs, self.horizon, self.p = int(num_envs), int(horizon), int(num_constraints)
        self.device = torch.device(device)
        self.t = 0
        self.done = np.zeros(self.num_envs, bool)

    def reset(self, obs: np.ndarray) -> torch.Tensor:
        self.t = 0
        self.done[:] = False
        return self.tensor(obs.astype(np.float32))

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def finish(self, obs: np.ndarray, reward: np.ndarray, cost: np.ndarray, failed: np.ndarray) -> StepResult:
        """Zero the reward and cost of copies already done (their state was not stepped), record new
        terminations, build the StepResult."""
        was_done = self.done.copy()
        reward = np.where(was_done, 0.0, reward).astype(np.float32)
        cost = np.where(was_done[:, None], 0.0, np.reshape(cost, (self.num_envs, self.p))).astype(np.float32)
        self.done |= failed
        self.t += 1
        truncated = np.full(self.num_envs, self.t >= self.horizon)
        return StepResult(obs=self.tensor(obs.astype(np.float32)), reward=self.tensor(reward), cost=self.tensor(cost),
                          terminated=self.tensor(self.done.copy()), truncated=self.tensor(truncated))


class FDTransition(torch.autograd.Function):
    """x' as a differentiable function of (x, u) whose backward pass multiplies by the
    finite-difference Jacobians of `BatchSim.step_jacobians`: dL/dx = dL/dx' A, dL/du = dL/dx' B.

    apply(x [N, n], u [N, nu], A [N, n, n], B [N, n, nu], x_next [N, n]) -> x_next (the values the
    simulator computed, carrying the graph to x and u)."""

    @staticmethod
    def forward(ctx, state, ctrl, jac_a, jac_b, next_state):
        ctx.save_for_backward(jac_a, jac_b)
        return next_state.clone()

    @staticmethod
    def backward(ctx, grad):
        jac_a, jac_b = ctx.saved_tensors
        g = grad.to(jac_a.dtype)[:, None, :]
        return (g @ jac_a)[:, 0].to(grad.dtype), (g @ jac_b)[:, 0].to(grad.dtype), None, None, None


def as_numpy_actions(actions: Any, num_envs: int, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Actions `[N, act_dim]` (torch or numpy) -> float64 numpy clipped to the control range."""
    if isinstance(actions, torch.Tensor):
        actions = actions.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(actions, dtype=np.float64)
    if a.shape != (num_envs, low.shape[0]):
        raise ValueError(f"actions must have shape [{num_envs}, {low.shape[0]}], got {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError("actions contain NaN or inf")
    return np.clip(a, low, high)
