"""The adaptation loop: K steps of an operator from a starting policy on one task (Cor. 1).

pi_[0] is the starting policy, pi_[k+1] = operator step from pi_[k]. Every policy that explores
the task, k = 0 included, is recorded: its reward, its cost per constraint (with the standard
error of the estimate), and for the step that produced it the multipliers, the KL to its
predecessor, the computation time and the operator's own step variables.

- meta-test: the loop from the meta-policy on every test task (anytime safety is
  max over tasks of cost[:, k] <= d for every k);
- single-task learners: the loop from a fresh policy;
- meta-training's evaluation: the loop with K = 1 (meta-policy and its one-step adaptation).

`adaptation_sequences` runs the loops of several tasks in lockstep: at every k the tasks'
policies are observed together (`AdaptationOperator.observe_tasks`: one batch of all tasks'
rollouts), then each task takes its step; every task's draws come from its own seeds, so each
sequence is the one `adaptation_sequence` gives.

This module knows operators (adaptation/), never meta-learners.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from .adaptation.base import AdaptationOperator
from .records import Var
from .rollout import derived_seed
from .tasks import Task

# The loop's own variables over steps k = 0..K (index 0 is the starting policy).
LOOP_VARS: dict[str, Var] = {
    "reward": Var(("step",), "reward of the exploration policy pi_[k]", "return"),
    "cost": Var(("step", "constraint"), "cost of the exploration policy pi_[k]", "cost"),
    "cost_se": Var(("step", "constraint"), "standard error of cost over the rollouts (0: exact)", "cost"),
    "u": Var(("step", "constraint"), "multipliers of the adaptation that produced pi_[k] (NaN at k=0)", "1"),
    "kl": Var(("step",), "E_nu KL(pi_[k] || pi_[k-1]) (NaN at k=0)", "nats"),
    "time": Var(("step",), "computation time of the adaptation that produced pi_[k] (0 at k=0)", "s", 0.0),
    "time_sampling": Var(("step",), "time spent evaluating pi_[k] (rollouts, or exact solves on tabular)", "s"),
    "env_steps": Var(("step",), "environment steps taken to explore pi_[k] (0: exact)", "1"),
}


def sequence_vars(operator: type[AdaptationOperator] | AdaptationOperator) -> dict[str, Var]:
    """Every variable of an adaptation sequence of this operator (the loop's, then its own)."""
    own = {name: Var(("step", *v.dims), v.long_name, v.units, v.initial) for name, v in operator.step_vars.items()}
    return {**LOOP_VARS, **own}


def adaptation_sequence(operator: AdaptationOperator, task: Task, policy: Any, steps: int,
                        seed_of_step: Callable[[int], int], start_seed: int = 0) -> dict[str, np.ndarray]:
    """pi_[0..K] on one task: arrays over k (see `sequence_vars`) plus `policies` (pi_[K] last).

    `seed_of_step(k)` seeds the exploration of pi_[k]; `start_seed` the operator's own draws.
    """
    return adaptation_sequences(operator, [task], [policy], steps, [seed_of_step], [start_seed])[0]


def adaptation_sequences(operator: AdaptationOperator, tasks: list[Task], policies: list[Any], steps: int,
                         seed_of_steps: list[Callable[[int], int]], start_seeds: list[int]) -> list[dict[str, np.ndarray]]:
    """`adaptation_sequence` of each task (with its policy, step seeds and start seed), the tasks'
    observations of each k collected together (module docstring)."""
    specs = sequence_vars(operator)
    outs = []
    for task in tasks:
        sizes = {"constraint": operator.scenario.limits(task).shape[0]}
        outs.append({name: np.full((steps + 1, *[sizes[d] for d in var.dims[1:]]), var.initial)
                     for name, var in specs.items()})
    states = [operator.start(task, policy, seed) for task, policy, seed in zip(tasks, policies, start_seeds)]
    current = list(policies)
    for k in range(steps + 1):
        observations = operator.observe_tasks(states, current, [seed_of(k) for seed_of in seed_of_steps])
        for j, (out, state, obs) in enumerate(zip(outs, states, observations)):
            out["reward"][k], out["cost"][k], out["cost_se"][k] = obs.reward, obs.cost, obs.cost_se
            out["time_sampling"][k], out["env_steps"][k] = obs.time_sampling, obs.env_steps
            if k < steps:
                t0 = time.perf_counter()
                step = operator.step(state, current[j], obs)
                out["time"][k + 1] = time.perf_counter() - t0
                out["u"][k + 1], out["kl"][k + 1] = step.u, step.kl
                for name, value in step.record.items():
                    out[name][k + 1] = value
                current[j] = step.policy
    for out, policy in zip(outs, current):
        out["policy"] = policy
    return outs


def stack(sequences: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Sequences of several tasks, stacked with a leading task axis (policies dropped)."""
    return {name: np.stack([s[name] for s in sequences]) for name in sequences[0] if name != "policy"}


def meta_test(operator: AdaptationOperator, tasks: list[Task], policy: Any, steps: int, seed: int,
              on_task: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, np.ndarray]:
    """The meta-test of Cor. 1: the loop from the meta-policy on every test task.

    Task j explores pi_[k] with seed derived_seed(derived_seed(seed, j), k); the tasks step together
    (`adaptation_sequences`), and `on_task(j, sequence)` is called for each task once they are done
    (progress).
    """
    task_seeds = [derived_seed(seed, j) for j in range(len(tasks))]
    sequences = adaptation_sequences(operator, tasks, [policy] * len(tasks), steps,
                                     [lambda k, s=s: derived_seed(s, k) for s in task_seeds],
                                     [derived_seed(s, 1 << 20) for s in task_seeds])
    if on_task is not None:
        for j, sequence in enumerate(sequences):
            on_task(j, sequence)
    return stack(sequences)
