"""Meta-test protocol (Cor. 1): K repeated adaptation steps from the meta-policy on each test task.

pi_[0] = pi_phi (the meta-policy), pi_[k+1] = A^s(pi_[k]) with delta = 0. Every policy that
explores the task, k = 0 included, is recorded: its reward, its cost per constraint, the
multipliers and KL of the step that produced it, whether that step's problem (1) was feasible,
the computation time of that step and the time spent evaluating (sampling) pi_[k].
Anytime safety is max over tasks of cost[:, k] <= d for every k.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .meta.safe_meta_exact import AdaptationSettings
from .tasks.tabular import TabularCMDP, evaluate


@dataclass
class AdaptationSequence:
    """Arrays over steps k = 0..K of one task (index 0 is the meta-policy)."""

    reward: np.ndarray     # [K+1]
    cost: np.ndarray       # [K+1, p]
    cost_se: np.ndarray    # [K+1, p]  standard error of `cost` over rollouts (0 for exact values)
    u: np.ndarray          # [K+1, p]  multipliers of the step that produced pi_[k] (NaN at k=0)
    kl: np.ndarray         # [K+1]     E_nu[KL(pi_[k] || pi_[k-1])] (NaN at k=0)
    feasible: np.ndarray   # [K+1] bool
    time: np.ndarray       # [K+1] seconds computing the adaptation that produced pi_[k] (0 at k=0)
    time_sampling: np.ndarray  # [K+1] seconds evaluating pi_[k] (rollouts; exact solves on tabular)


def adaptation_sequence_exact(cmdp: TabularCMDP, logits: np.ndarray, steps: int,
                              adaptation: AdaptationSettings, delta: float = 0.0) -> AdaptationSequence:
    """Exact values of pi_[0..K] on one tabular task."""
    p = cmdp.num_constraints
    reward, cost = np.empty(steps + 1), np.empty((steps + 1, p))
    u, kl = np.full((steps + 1, p), np.nan), np.full(steps + 1, np.nan)
    feasible, seconds, sampling = np.ones(steps + 1, dtype=bool), np.zeros(steps + 1), np.zeros(steps + 1)
    current = np.asarray(logits, dtype=np.float64)
    current = current - np.logaddexp.reduce(current, axis=-1, keepdims=True)
    for k in range(steps + 1):
        if k > 0:
            t0 = time.perf_counter()
            res = adaptation.adapt(cmdp, current, delta=delta)
            current = res.logits
            u[k], kl[k], feasible[k], seconds[k] = res.u, res.kl, res.feasible, time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = evaluate(cmdp, np.exp(current))
        reward[k], cost[k], sampling[k] = ev.J, ev.Jc, time.perf_counter() - t0
    return AdaptationSequence(reward, cost, np.zeros_like(cost), u, kl, feasible, seconds, sampling)


def meta_test_exact(cmdps: list[TabularCMDP], logits: np.ndarray, steps: int,
                    adaptation: AdaptationSettings, delta: float = 0.0) -> dict[str, np.ndarray]:
    """Adaptation sequences on every test task, stacked with a leading task axis."""
    seqs = [adaptation_sequence_exact(m, logits, steps, adaptation, delta) for m in cmdps]
    return {name: np.stack([getattr(s, name) for s in seqs]) for name in AdaptationSequence.__dataclass_fields__}


def adaptation_sequence_sampled(dist, task, policy, steps: int, adaptation, sampling, seed: int,
                                delta: float | list[float] = 0.0, device="cpu") -> AdaptationSequence:
    """pi_[0..K] on one sampled task: each policy explores (its rollouts estimate its reward and
    cost, and are the data of the next adaptation step), as the meta-test of the paper.

    reward is the mean undiscounted episode return; cost is the constrained J_c per constraint
    (sampling.constraint_gamma; 1 = undiscounted episode cost); time is the step's wall time.
    """
    import dataclasses

    from .adaptation.dual_pgd import adapt_sampled
    from .meta.safe_meta import derived_seed, rollout_policy

    d = np.asarray(task.params["d"], dtype=np.float64)
    settings = dataclasses.replace(adaptation, delta=delta)
    p = d.shape[0]
    reward, cost, cost_se = np.empty(steps + 1), np.empty((steps + 1, p)), np.empty((steps + 1, p))
    u, kl = np.full((steps + 1, p), np.nan), np.full(steps + 1, np.nan)
    feasible, seconds, sampled = np.ones(steps + 1, dtype=bool), np.zeros(steps + 1), np.zeros(steps + 1)
    current = policy
    for k in range(steps + 1):
        batch = rollout_policy(dist, task, current, sampling, derived_seed(seed, k), device)
        reward[k], sampled[k] = float(batch.episode_reward.mean()), batch.sampling_time
        cost[k] = batch.constraint_value.double().cpu().numpy()
        cost_se[k] = batch.constraint_value_se.double().cpu().numpy()
        if k < steps:
            t0 = time.perf_counter()
            res = adapt_sampled(current, batch, d, settings)
            current = res.policy
            u[k + 1], kl[k + 1], feasible[k + 1] = res.u, res.kl, res.feasible
            seconds[k + 1] = time.perf_counter() - t0
    return AdaptationSequence(reward, cost, cost_se, u, kl, feasible, seconds, sampled)


def meta_test_sampled(dist, tasks, policy, steps: int, adaptation, sampling, seed: int,
                      delta: float | list[float] = 0.0, device="cpu") -> dict[str, np.ndarray]:
    """Sampled adaptation sequences on every test task, stacked with a leading task axis."""
    from .meta.safe_meta import derived_seed

    seqs = [adaptation_sequence_sampled(dist, t, policy, steps, adaptation, sampling, derived_seed(seed, j), delta, device)
            for j, t in enumerate(tasks)]
    return {name: np.stack([getattr(s, name) for s in seqs]) for name in AdaptationSequence.__dataclass_fields__}
