"""Tabular CMDPs with exact evaluation, two seeded task families, and a sampled BatchEnv.

Notation follows the paper (section 2): P[s,a,s'], r[s,a], c[i,s,a] (p costs), rho[s], gamma,
limits d[i]. Rewards and costs are expected one-step values r(s,a) = E_{s'} r(s,a,s').
`evaluate` solves the Bellman equations by linear solves (no sampling) and returns V, Q, A, J
for the reward and for every cost, and the normalised discounted visitation
nu(s) = (1-gamma) E_{s0~rho} sum_t gamma^t P(s_t = s).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from . import params as opt
from .base import StepResult, Task, TaskDistribution, TaskParamError

_ATOL = 1e-8


@dataclass(frozen=True)
class TabularCMDP:
    P: np.ndarray      # [S, A, S] transition probabilities
    r: np.ndarray      # [S, A] expected reward
    c: np.ndarray      # [p, S, A] expected costs (non-negative)
    rho: np.ndarray    # [S] initial state distribution
    gamma: float
    d: np.ndarray      # [p] cost limits

    def __post_init__(self) -> None:
        P = _as_array("P", self.P, ndim=3)
        S, A, S2 = P.shape
        if S2 != S:
            raise ValueError(f"P must have shape [S, A, S]; got {P.shape} (last axis {S2} != S={S})")
        if (P < -_ATOL).any():
            raise ValueError(f"P has negative entries (min {P.min():.3g})")
        rows = P.sum(axis=2)
        if not np.allclose(rows, 1.0, atol=1e-6):
            s, a = np.unravel_index(np.abs(rows - 1).argmax(), rows.shape)
            raise ValueError(f"P is not row-stochastic: sum_s' P[{s},{a},s'] = {rows[s, a]:.6g}")
        r = _as_array("r", self.r, ndim=2)
        if r.shape != (S, A):
            raise ValueError(f"r must have shape [S, A] = {(S, A)}; got {r.shape}")
        c = _as_array("c", self.c, ndim=3)
        if c.shape[1:] != (S, A):
            raise ValueError(f"c must have shape [p, S, A] with S, A = {(S, A)}; got {c.shape}"
                             " (for one constraint pass c[None])")
        if (c < 0).any():
            raise ValueError(f"c must be non-negative; min is {c.min():.3g}")
        rho = _as_array("rho", self.rho, ndim=1)
        if rho.shape != (S,):
            raise ValueError(f"rho must have shape [S] = ({S},); got {rho.shape}")
        if (rho < 0).any() or not np.isclose(rho.sum(), 1.0, atol=1e-6):
            raise ValueError(f"rho must be a probability vector; sum {rho.sum():.6g}, min {rho.min():.3g}")
        if not (0.0 <= float(self.gamma) < 1.0):
            raise ValueError(f"gamma must be in [0, 1); got {self.gamma!r}")
        d = _as_array("d", self.d, ndim=1)
        if d.shape != (c.shape[0],):
            raise ValueError(f"d must have shape [p] = ({c.shape[0]},); got {d.shape}")
        for name, value in (("P", P), ("r", r), ("c", c), ("rho", rho), ("d", d)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "gamma", float(self.gamma))

    @property
    def num_states(self) -> int:
        return self.P.shape[0]

    @property
    def num_actions(self) -> int:
        return self.P.shape[1]

    @property
    def num_constraints(self) -> int:
        return self.c.shape[0]

    def signals(self) -> np.ndarray:
        """Reward and costs stacked: [1 + p, S, A] (index 0 is the reward)."""
        return np.concatenate([self.r[None], self.c], axis=0)


def _as_array(name: str, value: Any, ndim: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-d array; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has non-finite entries")
    return arr


# --------------------------------------------------------------------------- exact evaluation
@dataclass
class Evaluation:
    """Exact values of one policy. Index 0 of the stacked arrays is the reward, 1.. the costs."""

    V: Any    # [S]
    Q: Any    # [S, A]
    A: Any    # [S, A]
    J: Any    # scalar
    Vc: Any   # [p, S]
    Qc: Any   # [p, S, A]
    Ac: Any   # [p, S, A]
    Jc: Any   # [p]
    nu: Any   # [S] normalised discounted state visitation


def evaluate_torch(cmdp: TabularCMDP, probs: torch.Tensor) -> Evaluation:
    """Differentiable exact evaluation of `probs [S, A]` (float64 torch): Evaluation of tensors."""
    P = torch.as_tensor(cmdp.P, dtype=probs.dtype)
    R = torch.as_tensor(cmdp.signals(), dtype=probs.dtype)                  # [k, S, A]
    rho = torch.as_tensor(cmdp.rho, dtype=probs.dtype)
    gamma = cmdp.gamma
    S = P.shape[0]
    P_pi = torch.einsum("sa,sat->st", probs, P)                             # [S, S]
    M = torch.eye(S, dtype=probs.dtype) - gamma * P_pi
    r_pi = torch.einsum("sa,ksa->sk", probs, R)                             # [S, k]
    V = torch.linalg.solve(M, r_pi).T                                       # [k, S]
    Q = R + gamma * torch.einsum("sat,kt->ksa", P, V)                       # [k, S, A]
    A = Q - V[:, :, None]
    J = V @ rho                                                             # [k]
    nu = (1.0 - gamma) * torch.linalg.solve(M.T, rho)                       # [S]
    return Evaluation(V=V[0], Q=Q[0], A=A[0], J=J[0], Vc=V[1:], Qc=Q[1:], Ac=A[1:], Jc=J[1:], nu=nu)


def evaluate(cmdp: TabularCMDP, probs: np.ndarray) -> Evaluation:
    """Exact V, Q, A, J for the reward and each cost, and nu, of policy `probs [S, A]` (numpy)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (cmdp.num_states, cmdp.num_actions):
        raise ValueError(f"probs must have shape [S, A] = {(cmdp.num_states, cmdp.num_actions)}; got {probs.shape}")
    if (probs < -_ATOL).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("probs rows must be probability vectors")
    with torch.no_grad():
        ev = evaluate_torch(cmdp, torch.from_numpy(probs))
    return Evaluation(**{k: v.numpy() if v.ndim else float(v) for k, v in vars(ev).items()})


def optimal_value(cmdp: TabularCMDP, signal: int, maximize: bool) -> tuple[float, np.ndarray]:
    """Optimal J for one signal (0 = reward, i = cost i-1) by exact policy iteration.

    Returns (J*, deterministic policy probs). Used to set per-task limits and in tests.
    """
    S, A = cmdp.num_states, cmdp.num_actions
    sign = 1.0 if maximize else -1.0
    action = np.zeros(S, dtype=int)
    for _ in range(10 * S * A + 10):  # policy iteration terminates in finitely many steps
        probs = np.eye(A)[action]
        ev = evaluate(cmdp, probs)
        Q = ev.Q if signal == 0 else ev.Qc[signal - 1]
        improved = (sign * Q).argmax(axis=1)
        keep = sign * Q[np.arange(S), improved] <= sign * Q[np.arange(S), action] + 1e-12
        improved[keep] = action[keep]
        if (improved == action).all():
            J = ev.J if signal == 0 else ev.Jc[signal - 1]
            return float(J), probs
        action = improved
    raise RuntimeError("policy iteration did not terminate")  # pragma: no cover


def limits_between(cmdp_no_limit: TabularCMDP, fractions: np.ndarray) -> np.ndarray:
    """d_i = Jc_i^min + kappa_i (Jc_i(uniform) - Jc_i^min): kappa < 1 makes the uniform policy unsafe."""
    A = cmdp_no_limit.num_actions
    uniform = evaluate(cmdp_no_limit, np.full((cmdp_no_limit.num_states, A), 1.0 / A)).Jc
    lowest = np.array([optimal_value(cmdp_no_limit, i + 1, maximize=False)[0]
                       for i in range(cmdp_no_limit.num_constraints)])
    return lowest + np.asarray(fractions) * (uniform - lowest)


def limit_fractions(scenario: str, value: Any) -> tuple[float, float]:
    """Option `limit_fraction` [low, high]: kappa ~ U(low, high) places d = Jc_min + kappa (Jc(uniform)
    - Jc_min) above the exact least cost Jc_min, which only a deterministic policy reaches; at
    kappa <= 0 no softmax policy (every action with positive probability) meets d."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise TaskParamError(f"{scenario}: option 'limit_fraction' must be [low, high], got {value!r}")
    lo, hi = (opt.real(scenario, "limit_fraction", v) for v in value)
    if not 0.0 < lo <= hi:
        raise TaskParamError(f"{scenario}: option 'limit_fraction' {list(value)} must have 0 < low <= high: d = "
                             f"Jc_min + fraction (Jc(uniform) - Jc_min), and at a fraction <= 0 d is at or below the "
                             f"exact least cost Jc_min, which no softmax policy meets")
    return lo, hi


# --------------------------------------------------------------------------- task families
class TabularDistribution(TaskDistribution):
    """Common part of the tabular families: build the CMDP of a task; a sampled BatchEnv."""

    horizon: int = 100
    kinds = ("exact", "sampled")

    def cmdp(self, task: Task) -> TabularCMDP:
        self.validate(task)
        return self._build(task.params)

    def _build(self, params: dict[str, Any]) -> TabularCMDP:
        raise NotImplementedError

    def validate(self, task: Task) -> None:
        super().validate(task)
        try:
            self._build(task.params)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise TaskParamError(f"{self.name} task {task.params!r:.120}: {exc}") from None

    def make_env(self, task: Task, num_envs: int, seed: int, device: Any = "cpu") -> "TabularBatchEnv":
        return TabularBatchEnv(self.cmdp(task), num_envs, self.horizon, seed, device)


_MOVES = np.array([[-1, 0], [0, 1], [1, 0], [0, -1]])  # up, right, down, left


class GridworldDistribution(TabularDistribution):
    """size x size gridworld, 4 moves with slip; goal and hazard cells vary per task.

    Reward 1 for moving onto the goal, after which the agent restarts from rho (the restart
    itself earns and costs nothing); cost 1 for moving onto a hazard cell (hazards are passable). rho puts `1 - rho_uniform` on the start
    cell (0, 0) and spreads `rho_uniform` over all cells (full support, as Assumption 2 asks).
    The goal is drawn from the cells with row + col >= size (the far half); hazards uniformly
    from the remaining cells other than the start. The limit is
    d = Jc_min + kappa (Jc(uniform) - Jc_min), kappa ~ U(limit_fraction).
    """

    name = "tabular_grid"

    def __init__(self, size: int = 5, n_hazards: int | list[int] = 3, slip: float = 0.1,
                 gamma: float = 0.9, rho_uniform: float = 0.1,
                 limit_fraction: list[float] = (0.9, 1.3), horizon: int = 100) -> None:
        name = self.name
        size = opt.integer(name, "size", size, minimum=2)
        lo, hi = opt.count_range(name, "n_hazards", n_hazards)
        if hi > size * size - 2:
            raise TaskParamError(f"{name}: option 'n_hazards' {n_hazards!r} must lie in [0, size^2 - 2] = "
                                 f"[0, {size * size - 2}]")
        self.size, self.hazard_range = size, (lo, hi)
        self.slip = opt.real(name, "slip", slip, low=0.0, high=1.0)
        self.gamma = opt.real(name, "gamma", gamma, low=0.0, high=1.0, strict_high=True)
        self.rho_uniform = opt.real(name, "rho_uniform", rho_uniform, low=0.0, high=1.0, strict_low=True)
        self.limit_fraction = limit_fractions(name, limit_fraction)
        self.horizon = opt.horizon(name, horizon)

    def _sample(self, rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        n_cells = self.size * self.size
        cells = [(i, j) for i in range(self.size) for j in range(self.size)]
        far = [k for k, (i, j) in enumerate(cells) if i + j >= self.size]
        out = []
        for _ in range(n):
            goal = int(rng.choice(far))
            free = [k for k in range(1, n_cells) if k != goal]
            k_haz = int(rng.integers(self.hazard_range[0], self.hazard_range[1] + 1))
            hazards = sorted(int(h) for h in rng.choice(free, size=k_haz, replace=False))
            params = {"size": self.size, "goal": list(cells[goal]), "hazards": [list(cells[h]) for h in hazards],
                      "slip": self.slip, "gamma": self.gamma, "rho_uniform": self.rho_uniform}
            kappa = rng.uniform(*self.limit_fraction, size=1)
            params["d"] = limits_between(self._build({**params, "d": [0.0]}), kappa).tolist()
            out.append(params)
        return out

    def _build(self, params: dict[str, Any]) -> TabularCMDP:
        n = int(params["size"])
        S = n * n
        goal = _cell_index(params["goal"], n, "goal")
        hazards = [_cell_index(h, n, "hazards") for h in params["hazards"]]
        if goal in hazards:
            raise ValueError("the goal cell is also a hazard")
        slip = float(params["slip"])
        P = np.zeros((S, 4, S))
        for s in range(S):
            i, j = divmod(s, n)
            for a in range(4):
                for m, move in enumerate(_MOVES):
                    prob = (1 - slip) * (m == a) + slip / 4
                    ni, nj = i + move[0], j + move[1]
                    t = ni * n + nj if 0 <= ni < n and 0 <= nj < n else s
                    P[s, a, t] += prob
        rho = np.full(S, float(params["rho_uniform"]) / S)
        rho[0] += 1.0 - float(params["rho_uniform"])
        P[goal] = rho  # the goal restarts the episode
        r = P[:, :, goal].copy()
        c = P[:, :, hazards].sum(axis=2)[None] if hazards else np.zeros((1, S, 4))
        r[goal], c[:, goal] = 0.0, 0.0  # a restart is not an arrival
        return TabularCMDP(P=P, r=r, c=c, rho=rho, gamma=float(params["gamma"]), d=np.asarray(params["d"], float))


def _cell_index(cell: Any, n: int, key: str) -> int:
    i, j = (int(v) for v in cell)
    if not (0 <= i < n and 0 <= j < n):
        raise ValueError(f"{key} cell {list(cell)} is outside the {n}x{n} grid")
    return i * n + j


class RandomCMDPDistribution(TabularDistribution):
    """Random CMDPs around a shared base CMDP (drawn from `family_seed`).

    Each task mixes the base transitions with task-specific ones (weight `task_noise`), and
    perturbs rewards and costs; `branching` successor states per (s, a). Limits as in the
    gridworld family. Task params hold the arrays themselves, so a task file alone rebuilds it.
    """

    name = "tabular_random"

    def __init__(self, num_states: int = 8, num_actions: int = 3, num_constraints: int = 1,
                 gamma: float = 0.9, branching: int = 3, task_noise: float = 0.3, family_seed: int = 0,
                 limit_fraction: list[float] = (0.9, 1.3), horizon: int = 100) -> None:
        name = self.name
        self.S = opt.integer(name, "num_states", num_states, minimum=1)
        self.A = opt.integer(name, "num_actions", num_actions, minimum=2)
        self.p = opt.integer(name, "num_constraints", num_constraints, minimum=1)
        self.gamma = opt.real(name, "gamma", gamma, low=0.0, high=1.0, strict_high=True)
        self.branching = opt.integer(name, "branching", branching, minimum=1, maximum=self.S)
        self.task_noise = opt.real(name, "task_noise", task_noise, low=0.0, high=1.0)
        self.family_seed = opt.integer(name, "family_seed", family_seed, minimum=0)
        self.limit_fraction = limit_fractions(name, limit_fraction)
        self.horizon = opt.horizon(name, horizon)

    def _random_parts(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        P = np.zeros((self.S, self.A, self.S))
        for s in range(self.S):
            for a in range(self.A):
                succ = rng.choice(self.S, size=self.branching, replace=False)
                P[s, a, succ] = rng.dirichlet(np.ones(self.branching))
        return P, rng.uniform(0, 1, (self.S, self.A)), rng.uniform(0, 1, (self.p, self.S, self.A))

    def _sample(self, rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        P0, r0, c0 = self._random_parts(np.random.default_rng(self.family_seed))
        rho = np.full(self.S, 1.0 / self.S)
        out = []
        for _ in range(n):
            P1, r1, c1 = self._random_parts(rng)
            w = self.task_noise
            params = {"P": (1 - w) * P0 + w * P1, "r": (1 - w) * r0 + w * r1, "c": (1 - w) * c0 + w * c1,
                      "rho": rho, "gamma": self.gamma, "d": np.zeros(self.p)}
            kappa = rng.uniform(*self.limit_fraction, size=self.p)
            params["d"] = limits_between(self._build(params), kappa)
            out.append(params)
        return out

    def _build(self, params: dict[str, Any]) -> TabularCMDP:
        return TabularCMDP(P=params["P"], r=params["r"], c=params["c"], rho=params["rho"],
                           gamma=params["gamma"], d=params["d"])


# --------------------------------------------------------------------------- sampled BatchEnv
class TabularBatchEnv:
    """`num_envs` sampled copies of a tabular CMDP; observations are one-hot states [N, S]."""

    def __init__(self, cmdp: TabularCMDP, num_envs: int, horizon: int, seed: int, device: Any = "cpu") -> None:
        self.cmdp, self.num_envs, self.horizon, self.device = cmdp, int(num_envs), int(horizon), torch.device(device)
        S, A = cmdp.num_states, cmdp.num_actions
        self.observation_space = spaces.Box(0.0, 1.0, (S,), dtype=np.float32)
        self.action_space = spaces.Discrete(A)
        self.cost_limits = cmdp.d.copy()
        self.num_constraints = cmdp.num_constraints
        self._gen = torch.Generator(device="cpu").manual_seed(int(seed))
        self._P = torch.as_tensor(cmdp.P, dtype=torch.float64).reshape(S * A, S)
        self._r = torch.as_tensor(cmdp.r, dtype=torch.float32).to(self.device)
        self._c = torch.as_tensor(cmdp.c, dtype=torch.float32).to(self.device)
        self._rho = torch.as_tensor(cmdp.rho, dtype=torch.float64)
        self.state = torch.zeros(self.num_envs, dtype=torch.long)
        self._t = 0

    def _obs(self) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.state, self.cmdp.num_states).float().to(self.device)

    def reset(self) -> torch.Tensor:
        self.state = torch.multinomial(self._rho, self.num_envs, replacement=True, generator=self._gen)
        self._t = 0
        return self._obs()

    def step(self, actions: torch.Tensor) -> StepResult:
        a = torch.as_tensor(actions, dtype=torch.long).cpu()
        s = self.state
        reward = self._r[s.to(self.device), a.to(self.device)]
        cost = self._c[:, s.to(self.device), a.to(self.device)].T
        rows = self._P[s * self.cmdp.num_actions + a]
        self.state = torch.multinomial(rows, 1, generator=self._gen).squeeze(1)
        self._t += 1
        done = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        truncated = torch.full_like(done, self._t >= self.horizon)
        return StepResult(obs=self._obs(), reward=reward, cost=cost, terminated=done, truncated=truncated)
