"""Computation time of Meta-CPO against the paper's method on the same scenario, and what the
official Meta-CPO code's per-parameter backward loop would cost.

Per scenario (one task distribution, the same tasks, seed and batch sizes for both methods):
- meta-iteration: each method's meta-learner, built from one config through the registries as
  the pipeline builds it, runs `--iterations` meta-iterations; the median of the recorded
  `time_compute` (sampling excluded, the paper's Fig. 2/5 quantity) over iterations 1.. (the
  first and the last also evaluate) is compared: meta_cpo / safemeta;
- meta-test step: one adaptation step from the same meta-policy batch, the operator `cpo`
  against the paper's `dual_pgd` (median of repeats): cpo / dual_pgd;
- per-parameter loop (Mgineer117/Meta-CPO, algos/CPOMeta.py `update(meta_update=True)`; see
  reference/baselines.md 4.2): per inner step and task, for every parameter index i one
  backward pass of the step's i-th entry into the normalised gradient and one Hessian row of
  that gradient. Timed here on `--loop-samples` evenly spaced indices, with the step in our
  closed form and the official identity metric (a lower bound: the official backward goes
  through a cvxpylayers cone program instead), and extrapolated to all P parameters; compared
  with our meta-gradient of one task (the reverse-mode derivative through the Fisher CPO step,
  with and without the derivative of the Fisher).

    .venv/bin/python benchmarks/bench_meta_cpo.py [--quick] [--scenarios a b ...]

Wall times are noisy on a shared machine; the ratios are measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from safemeta.adaptation.cpo import BatchSurrogates, cpo_direction, sampled_cpo_step
from safemeta.config import load_config
from safemeta.meta.base import train
from safemeta.plugins import build_meta_learner, build_operator, build_scenario
from safemeta.registry import kind_of
from safemeta.rollout import derived_seed
from safemeta.tasks import get_distribution

SCENARIOS = {  # name -> (rollouts, horizon, Table 2 lam): App. D.2 sizes
    "tabular_random": (None, None, 1.0), "half_cheetah_vel": (40, 200, 1.0), "hopper_vel": (40, 200, 1.0),
    "swimmer_vel": (40, 200, 0.2), "humanoid_dir": (40, 200, 5.0), "point_circle": (10, 500, 0.5),
    "car_circle_hazard": (10, 500, 0.5), "point_button": (10, 500, 0.5),
}


def config_for(name: str, rollouts: int | None, horizon: int | None, lam: float, tasks: int, iterations: int) -> dict:
    scen = {"distribution": name, "n_train_tasks": max(tasks, 20), "n_test_tasks": 2}
    if rollouts is None:    # tabular: exact values, the paper's method with eq. (6)
        scen.update(adaptation={"dual_pgd": {"lam": lam, "lam_c": lam, "delta": 0.0}},
                    methods={"safemeta": {"meta_gradient": "eq6"}})
    else:                   # as config/paper.yaml: Table 2's lam_c, lam solved for App. D.4's KL
        scen.update(task_options={"horizon": horizon}, rollouts=rollouts,
                    adaptation={"dual_pgd": {"lam_c": lam, "delta": 0.0, "kl_target": 0.03}})
    return {"seeds": [0], "device": "cpu", "scenarios": {name: scen},
            "methods": {"safemeta": {"algorithm": "safemeta"}, "meta_cpo": {"algorithm": "meta_cpo"}},
            "metatrain": {"iterations": iterations, "tasks_per_iteration": tasks, "max_kl": 0.001, "cg_damping": 0.1,
                          "eval_every": iterations + 1, "eval_tasks": 1}}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def meta_iteration_times(config: dict, name: str) -> dict[str, float]:
    """Median computation time of a meta-iteration per method (iterations 1.. ; 0 and the last evaluate)."""
    scen = config["scenarios"][name]
    dist = get_distribution(scen["distribution"], **scen["task_options"])
    scenario = build_scenario(config, name, dist, "cpu")
    train_tasks, test = dist.sample(scen["n_train_tasks"], (0, 0)), dist.sample(scen["n_test_tasks"], (0, 1))
    out = {}
    for method in ("safemeta", "meta_cpo"):
        learner = build_meta_learner(config, scenario, method, train_tasks, test, seed=0)
        records = train(learner, learner.initial_state()).records
        out[method] = statistics.median(r["time_compute"] for r in records[1:-1])
    return out


def meta_test_step_times(config: dict, name: str, repeats: int) -> dict[str, float]:
    """Median time of one adaptation step from the same policy and batch, per operator."""
    scen = config["scenarios"][name]
    dist = get_distribution(scen["distribution"], **scen["task_options"])
    scenario = build_scenario(config, name, dist, "cpu")
    task = dist.sample(1, (0, 1))[0]
    out, policy, observation = {}, None, None
    for method, operator_name in (("safemeta", "dual_pgd"), ("meta_cpo", "cpo")):
        operator = build_operator(config, "meta_test", scenario, method)
        state = operator.start(task, None, 0)
        if policy is None:
            policy = scenario.fresh_policy(task, 0, kind_of(type(operator), scenario.kinds))
            observation = operator.observe(state, policy, derived_seed(0, 1))
        out[operator_name] = median_time(lambda: operator.step(state, policy, observation), repeats)
    return out


def per_parameter_loop(config: dict, name: str, samples: int) -> dict[str, float]:
    """The official loop's structure on one task's batch (module docstring), against our meta-gradient."""
    scen = config["scenarios"][name]
    dist = get_distribution(scen["distribution"], **scen["task_options"])
    scenario = build_scenario(config, name, dist, "cpu")
    task = dist.sample(1, (0, 0))[0]
    meta = scenario.fresh_policy(task, 0, "sampled")
    limit = float(scenario.limits(task)[0])
    batch = scenario.rollout(task, meta, derived_seed(0, 1))
    surrogates = BatchSurrogates(meta, batch, limit)
    theta = meta.flat().requires_grad_()
    P = theta.numel()

    # the official step: identity metric, unit-normalised gradients (q = s = 1), closed form of the QP;
    # c = -sqrt(max_kl) puts it in the general case (the plane cuts the ball, nu* > 0 or not)
    grad_r = torch.autograd.grad(surrogates.reward(theta), theta, create_graph=True)[0]
    grad_c = torch.autograd.grad(surrogates.cost(theta), theta, create_graph=True)[0]
    g_hat, a_hat = grad_r / grad_r.norm(), grad_c / grad_c.norm()
    g_leaf, a_leaf = g_hat.detach().requires_grad_(), a_hat.detach().requires_grad_()
    step = cpo_direction(g_leaf, a_leaf, -0.01 ** 0.5, g_leaf, a_leaf, 0.01).x
    indices = np.linspace(0, P - 1, min(samples, P)).astype(int)
    t_backward, t_row = [], []
    for i in indices:
        start = time.perf_counter()
        torch.autograd.grad(step[i], [g_leaf, a_leaf], retain_graph=True, allow_unused=True)  # step[i].backward()
        t_backward.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.autograd.grad(g_hat[i], theta, retain_graph=True)             # the Hessian row of g_hat_i
        t_row.append(time.perf_counter() - start)
    per_index = statistics.median(t_backward) + statistics.median(t_row)

    # ours: the meta-gradient of one task through the Fisher CPO step (inner step, adapted-batch gradient)
    operator = build_operator(config, "meta_train", scenario, "meta_cpo")
    adapted_batch = batch    # the same samples stand in for the adapted policy's (timing only)

    def ours(fisher_derivative: bool):
        th = meta.flat().requires_grad_()
        inner = sampled_cpo_step(surrogates, th, operator.settings, differentiable=True,
                                 fisher_derivative=fisher_derivative)
        outer = BatchSurrogates(meta, adapted_batch, limit)
        torch.autograd.grad(outer.reward(inner.params), th, retain_graph=True)
        torch.autograd.grad(outer.cost(inner.params), th)

    return {"P": P, "per_index": per_index, "loop_step": P * per_index, "ours_task": median_time(lambda: ours(True), 3),
            "ours_task_no_dF": median_time(lambda: ours(False), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=["tabular_random", "half_cheetah_vel", "point_circle"],
                        choices=list(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="a quarter of the horizon, 4 tasks per iteration")
    parser.add_argument("--tasks", type=int, default=10, help="tasks per meta-iteration (App. D.2: 10)")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-samples", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = 4 if args.quick else args.tasks
    print(f"tasks per iteration {tasks}; computation time, sampling excluded (medians); ratios in the same run")
    print(f"{'scenario':18s} {'safemeta it s':>13s} {'meta_cpo it s':>13s} {'ratio':>6s}   "
          f"{'dual_pgd step s':>15s} {'cpo step s':>10s} {'ratio':>6s}")
    loops = []
    for name in args.scenarios:
        rollouts, horizon, lam = SCENARIOS[name]
        if args.quick and horizon:
            horizon //= 4
        config = load_config(config_for(name, rollouts, horizon, lam, tasks, args.iterations))
        it = meta_iteration_times(config, name)
        st = meta_test_step_times(config, name, args.repeats)
        print(f"{name:18s} {it['safemeta']:13.3f} {it['meta_cpo']:13.3f} {it['meta_cpo'] / it['safemeta']:6.2f}   "
              f"{st['dual_pgd']:15.4f} {st['cpo']:10.4f} {st['cpo'] / st['dual_pgd']:6.2f}", flush=True)
        if rollouts is not None:
            loops.append((name, per_parameter_loop(config, name, args.loop_samples), it["meta_cpo"]))
    print("\nofficial per-parameter loop (identity metric, closed-form backward: a lower bound), extrapolated:")
    print(f"{'scenario':18s} {'P':>6s} {'per index ms':>12s} {'loop/step s':>11s} {'ours/task s':>11s} "
          f"{'(no dF) s':>9s} {'loop/ours':>9s} {'official it s':>13s} {'paper-budget it s':>17s}")
    for name, loop, ours_it in loops:
        official = 3 * 3 * loop["loop_step"]     # env_num 3 x local_num 3 inner steps (official defaults)
        paper = tasks * loop["loop_step"]        # our budget: `tasks` tasks x one inner step
        print(f"{name:18s} {loop['P']:6d} {1e3 * loop['per_index']:12.3f} {loop['loop_step']:11.2f} "
              f"{loop['ours_task']:11.3f} {loop['ours_task_no_dF']:9.3f} {loop['loop_step'] / loop['ours_task']:9.1f} "
              f"{official:13.1f} {paper:17.1f}",
              flush=True)


if __name__ == "__main__":
    main()
