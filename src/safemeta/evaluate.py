"""Meta-test protocol (Cor. 1): K repeated adaptation steps from the meta-policy on each test task.

pi_[0] = pi_phi (the meta-policy), pi_[k+1] = A^s(pi_[k]) with delta = 0. Every policy that
explores the task, k = 0 included, is recorded: its reward, its cost per constraint, the
multipliers and KL of the step that produced it, whether that step's problem (1) was feasible,
and the wall time of the step. Anytime safety is max over tasks of cost[:, k] <= d for every k.
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
    u: np.ndarray          # [K+1, p]  multipliers of the step that produced pi_[k] (NaN at k=0)
    kl: np.ndarray         # [K+1]     E_nu[KL(pi_[k] || pi_[k-1])] (NaN at k=0)
    feasible: np.ndarray   # [K+1] bool
    time: np.ndarray       # [K+1] seconds of the step (evaluation only at k=0)


def adaptation_sequence_exact(cmdp: TabularCMDP, logits: np.ndarray, steps: int,
                              adaptation: AdaptationSettings, delta: float = 0.0) -> AdaptationSequence:
    """Exact values of pi_[0..K] on one tabular task."""
    p = cmdp.num_constraints
    reward, cost = np.empty(steps + 1), np.empty((steps + 1, p))
    u, kl = np.full((steps + 1, p), np.nan), np.full(steps + 1, np.nan)
    feasible, seconds = np.ones(steps + 1, dtype=bool), np.empty(steps + 1)
    t0 = time.perf_counter()
    probs = np.exp(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
    ev = evaluate(cmdp, probs)
    reward[0], cost[0], seconds[0] = ev.J, ev.Jc, time.perf_counter() - t0
    current = np.asarray(logits, dtype=np.float64)
    for k in range(1, steps + 1):
        t0 = time.perf_counter()
        res = adaptation.adapt(cmdp, current, delta=delta)
        current = res.logits
        ev = evaluate(cmdp, np.exp(current))
        reward[k], cost[k], u[k], kl[k], feasible[k] = ev.J, ev.Jc, res.u, res.kl, res.feasible
        seconds[k] = time.perf_counter() - t0
    return AdaptationSequence(reward, cost, u, kl, feasible, seconds)


def meta_test_exact(cmdps: list[TabularCMDP], logits: np.ndarray, steps: int,
                    adaptation: AdaptationSettings, delta: float = 0.0) -> dict[str, np.ndarray]:
    """Adaptation sequences on every test task, stacked with a leading task axis."""
    seqs = [adaptation_sequence_exact(m, logits, steps, adaptation, delta) for m in cmdps]
    return {name: np.stack([getattr(s, name) for s in seqs]) for name in AdaptationSequence.__dataclass_fields__}
