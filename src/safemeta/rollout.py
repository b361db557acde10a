"""Batched on-policy sampling and the Monte-Carlo quantities the algorithms use (App. E.1).

`collect` runs one policy on all copies of a task's BatchEnv for one horizon; the policy is
evaluated once per step for the whole batch. `collect_tasks` does the same on a BatchEnv of
several tasks (`TaskDistribution.make_envs`), each task's block with its own policy and
generator: one env step per step for all blocks, the policy sampled block by block
(`NeuralPolicy.sample_blocks`: a matrix product's rounding depends on its number of rows on some
CPUs), and per task the Batch that `collect` on that task alone gives, bit for bit (tested).
`rollout_policies` is `rollout_policy` for several tasks in one env. A `Batch` is time-major
([T, N, ...]) and holds:
- Q estimates as discounted returns-to-go, Q(s_t, a_t) ~ sum_{k>=t} gamma^{k-t} r_k (no value
  network, as App. E.1; truncated at the horizon);
- the constrained cost J_c = mean over rollouts of sum_t constraint_gamma^t c_t (with
  constraint_gamma = 1, the undiscounted episode cost that is reported and compared with d) and
  its cost-to-go;
- visitation weights gamma^t (the paper's discounted nu), zero after an episode terminates;
- undiscounted episode reward and cost (the reported metrics).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .policies import NeuralPolicy


def returns_to_go(signal: torch.Tensor, alive: torch.Tensor, gamma: float) -> torch.Tensor:
    """sum_{k>=t} gamma^{k-t} x_k over alive steps; signal [T, N, ...], alive [T, N]."""
    mask = alive.reshape(*alive.shape, *[1] * (signal.ndim - alive.ndim)).to(signal.dtype)
    out = torch.zeros_like(signal)
    running = torch.zeros_like(signal[0])
    for t in range(signal.shape[0] - 1, -1, -1):
        running = signal[t] * mask[t] + gamma * running * mask[t]
        out[t] = running
    return out


def time_baseline(values: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Mean over alive rollouts at each step t (an action-independent baseline), broadcast back."""
    mask = alive.reshape(*alive.shape, *[1] * (values.ndim - alive.ndim)).to(values.dtype)
    mean = (values * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1.0)
    return mean.expand_as(values) * mask


@dataclass
class Batch:
    obs: torch.Tensor          # [T, N, obs_dim]
    actions: torch.Tensor      # [T, N, act_dim] or [T, N]
    log_prob: torch.Tensor     # [T, N] behaviour log-probabilities (detached)
    reward: torch.Tensor       # [T, N]
    cost: torch.Tensor         # [T, N, p]
    alive: torch.Tensor        # [T, N] bool: the step was taken before termination
    gamma: float
    constraint_gamma: float
    sampling_time: float = 0.0
    derived: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_rollouts(self) -> int:
        return self.reward.shape[1]

    def _cached(self, key: str, make):
        if key not in self.derived:
            self.derived[key] = make()
        return self.derived[key]

    @property
    def discount(self) -> torch.Tensor:
        """gamma^t on alive steps: unnormalised discounted visitation weights [T, N]."""
        return self._cached("discount", lambda: (self.gamma ** torch.arange(self.reward.shape[0], dtype=self.reward.dtype,
                                                                            device=self.reward.device))[:, None] * self.alive)

    @property
    def constraint_discount(self) -> torch.Tensor:
        return self._cached("constraint_discount", lambda: (self.constraint_gamma ** torch.arange(
            self.reward.shape[0], dtype=self.reward.dtype, device=self.reward.device))[:, None] * self.alive)

    @property
    def q_reward(self) -> torch.Tensor:
        return self._cached("q_reward", lambda: returns_to_go(self.reward, self.alive, self.gamma))

    @property
    def q_cost(self) -> torch.Tensor:
        return self._cached("q_cost", lambda: returns_to_go(self.cost, self.alive, self.gamma))

    @property
    def cost_to_go(self) -> torch.Tensor:
        """Returns-to-go of the constrained cost (constraint_gamma), [T, N, p]."""
        return self._cached("cost_to_go", lambda: returns_to_go(self.cost, self.alive, self.constraint_gamma))

    @property
    def episode_reward(self) -> torch.Tensor:
        return (self.reward * self.alive).sum(0)

    @property
    def episode_cost(self) -> torch.Tensor:
        return (self.cost * self.alive[..., None]).sum(0)

    @property
    def constraint_value(self) -> torch.Tensor:
        """Estimate of the constrained J_c [p]: mean of sum_t constraint_gamma^t c_t."""
        return (self.cost * self.constraint_discount[..., None]).sum(0).mean(0)

    @property
    def constraint_value_se(self) -> torch.Tensor:
        """Standard error over rollouts of `constraint_value` [p] (0 with a single rollout)."""
        per_rollout = (self.cost * self.constraint_discount[..., None]).sum(0)
        n = per_rollout.shape[0]
        return per_rollout.std(0, unbiased=True) / n ** 0.5 if n > 1 else torch.zeros_like(per_rollout[0])

    def visitation(self) -> torch.Tensor:
        """Normalised discounted visitation weights [T, N] (sum to 1): E_nu[x] ~ (w * x).sum()."""
        w = self.discount
        return w / w.sum()


def collect(env, policy: NeuralPolicy, generator: torch.Generator, gamma: float,
            constraint_gamma: float = 1.0) -> Batch:
    """One horizon of `policy` on every copy of `env` (reset first)."""
    return collect_tasks(env, [policy], [generator], gamma, constraint_gamma)[0]


def collect_tasks(env, policies: list[NeuralPolicy], generators: list[torch.Generator], gamma: float,
                  constraint_gamma: float = 1.0) -> list[Batch]:
    """One horizon on every copy of `env`, whose copies form len(policies) equal consecutive
    blocks (one per task): block k acts by policies[k], drawing from generators[k]. Block k's
    Batch ends where its own copies have all terminated, as `collect` on that task alone would;
    each Batch's sampling time is its share, by steps taken, of the whole collection's."""
    start = time.perf_counter()
    obs = env.reset()
    K = len(policies)
    n = env.num_envs // K
    groups = _policy_groups(policies)
    alive = torch.ones(env.num_envs, dtype=torch.bool, device=obs.device)
    length = [0] * K                             # steps recorded per block (its own stop)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("obs", "actions", "log_prob", "reward", "cost", "alive")}
    for t in range(env.horizon):
        drawn = [policy.sample_blocks(obs[a * n:b * n], generators[a:b]) for policy, a, b in groups]
        actions, log_prob = (torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*drawn))
        step = env.step(actions)
        for key, value in (("obs", obs), ("actions", actions), ("log_prob", log_prob), ("reward", step.reward),
                           ("cost", step.cost), ("alive", alive.clone())):
            rows[key].append(value)
        was_alive = alive.reshape(K, n).any(1).tolist()
        alive = alive & ~step.terminated
        obs = step.obs
        for k in range(K):
            length[k] += was_alive[k]
        if not alive.any() or bool(step.truncated.all()):
            break
    stacked = {k: torch.stack(v) for k, v in rows.items()}
    for key in ("reward", "cost"):
        stacked[key] = stacked[key].to(stacked["obs"].dtype)
    elapsed = time.perf_counter() - start
    steps = stacked["alive"].reshape(stacked["alive"].shape[0], K, n).sum((0, 2)).tolist()
    batches = []
    for k in range(K):
        part = {key: (v if K == 1 else v[:length[k], k * n:(k + 1) * n].clone()) for key, v in stacked.items()}
        batches.append(Batch(**part, gamma=float(gamma), constraint_gamma=float(constraint_gamma),
                             sampling_time=elapsed * steps[k] / max(sum(steps), 1)))
    return batches


def _policy_groups(policies: list[NeuralPolicy]) -> list[tuple[NeuralPolicy, int, int]]:
    """Runs [a, b) of consecutive blocks that share one policy object: (policy, a, b)."""
    groups: list[tuple[NeuralPolicy, int, int]] = []
    for k, policy in enumerate(policies):
        if groups and groups[-1][0] is policy:
            groups[-1] = (policy, groups[-1][1], k + 1)
        else:
            groups.append((policy, k, k + 1))
    return groups


# --------------------------------------------------------------------------- seeded sampling of one policy
@dataclass(frozen=True)
class SamplingSettings:
    """How a policy is evaluated on a task: rollouts per policy and the discounts (App. D.2).
    Values come from the scenario's config block (`rollouts`, `gamma`, `constraint_gamma`)."""

    rollouts: int
    gamma: float
    constraint_gamma: float


def derived_seed(*keys: int) -> int:
    """A 63-bit seed determined by the integers given (seed, iteration, task, purpose, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def rollout_policy(dist: Any, task: Any, policy: NeuralPolicy, sampling: SamplingSettings, seed: int,
                   device: Any = "cpu") -> Batch:
    """`sampling.rollouts` episodes of `policy` on `task` of distribution `dist`, all draws from `seed`.
    Its sampling time includes building the environment (for an external simulator such as the
    Safety-Gymnasium worker, a large part)."""
    return rollout_policies(dist, [task], [policy], sampling, [seed], device)[0]


def rollout_policies(dist: Any, tasks: list[Any], policies: list[NeuralPolicy], sampling: SamplingSettings,
                     seeds: list[int], device: Any = "cpu") -> list[Batch]:
    """`rollout_policy` of each (task, policy, seed), all tasks stepped as one batch (`collect_tasks`);
    each Batch is the one `rollout_policy` gives, and carries a share of the build time."""
    start = time.perf_counter()
    if len(tasks) == 1:
        env = dist.make_env(tasks[0], sampling.rollouts, derived_seed(seeds[0], 0), device)
    elif hasattr(dist, "make_envs"):
        env = dist.make_envs(tasks, sampling.rollouts, [derived_seed(s, 0) for s in seeds], device)
    else:   # a distribution without the multi-task factory: its envs one after another
        from .tasks.base import ConcatEnv

        env = ConcatEnv([dist.make_env(t, sampling.rollouts, derived_seed(s, 0), device) for t, s in zip(tasks, seeds)])
    built = (time.perf_counter() - start) / len(tasks)
    generators = [torch.Generator(device="cpu").manual_seed(derived_seed(s, 1)) for s in seeds]
    batches = collect_tasks(env, policies, generators, sampling.gamma, sampling.constraint_gamma)
    for batch in batches:
        batch.sampling_time += built
    return batches
