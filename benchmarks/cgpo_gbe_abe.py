"""CGPO's Fig. 1(b) / Fig. 5 kind: relative error of the predicted change of the finite-horizon
undiscounted constraint for equal-length updates, GBE (eq. 73) against ABE (eq. 72, the CPO-style
advantage estimate), at four stages of a CGPO training run.

Protocol (ours where App. C.2 is silent):
- tasks: function_env (shift 0, T = 100, b = 8; policy log-std -1.5; CGPO with BPTT) and
  cartpole_pos (CGPO's centre physics, T = 100, b = -50/3; CGPO with windows of 10);
- stages: the CGPO iterates 0, K/3, 2K/3, K of one seeded run (K = `iterations`);
- per stage, `repetitions` independent batches of N = `rollouts` reparameterised episodes of the
  stage's policy; from each batch both estimates of the change of J_C for the update delta of
  norm 0.01 (App. C.2) along the CGPO step the batch's GBE gradients give (radius 1e-4):
    GBE: q.delta, q the pathwise gradient of the batch's mean episode cost (BPTT);
    ABE: sum_t gamma^t (pi_{theta+delta}/pi_theta - 1)(a_t|s_t) A_c(s_t, a_t), averaged over the
         episodes, = 1/(1-gamma) E_{d^gamma, pi}[(ratio - 1) A] (eq. 72 minus J_C(theta); E_pi[A] = 0),
         A_c = discounted cost-to-go (gamma = 0.99) minus its mean over episodes at each step;
- realised change: on `eval` fresh episodes with common random numbers for theta and theta + delta;
  eq. (74) gives |realised - predicted| / |realised|; also reported on the batch's own episodes.

    python benchmarks/cgpo_gbe_abe.py                 # minutes
    python benchmarks/cgpo_gbe_abe.py --repetitions 100 --iterations 60   # the paper's 100 repetitions
Writes OUT/cgpo_gbe_abe.csv and OUT/cgpo_gbe_abe.png.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

from safemeta.adaptation.cgpo import solve_subproblem
from safemeta.adaptation.gbe import estimate
from safemeta.config import load_config
from safemeta.plugins import build_learner, build_scenario
from safemeta.rollout import derived_seed, returns_to_go, time_baseline
from safemeta.tasks import Task, get_distribution

TASKS = {
    "function_env": ({"distribution": "function_env", "policy": {"init_log_std": -1.5},
                      "adaptation": {"cgpo": {"window": 100}}}, {"shift": 0.0}),
    "cartpole_pos": ({"distribution": "cartpole_pos", "task_options": {"horizon": 100}},
                     {"pole_mass": 0.1, "pole_half_length": 0.5}),
}
STEP_NORM, GAMMA = 0.01, 0.99


def episodes(dist, task, policy, n: int, seed: int, grad: bool = False):
    """n reparameterised episodes as `gbe.estimate` draws them from `seed`: (obs, actions, cost,
    alive) time-major; with `grad`, the mean episode cost keeps its graph to the parameters."""
    env = dist.make_env(task, n, derived_seed(seed, 0))
    gen = torch.Generator().manual_seed(derived_seed(seed, 1))
    act_dim = env.action_space.shape[0]
    obs, alive = env.reset(), torch.ones(n, dtype=torch.bool)
    rows = {"obs": [], "actions": [], "cost": [], "alive": []}
    with torch.set_grad_enabled(grad):
        for _ in range(env.horizon):
            a = policy.rsample(obs, torch.randn((n, act_dim), generator=gen, dtype=torch.float64))
            step = env.step(a)
            for key, value in (("obs", obs), ("actions", a), ("cost", step.cost[:, 0]), ("alive", alive.clone())):
                rows[key].append(value)
            alive = alive & ~step.terminated
            obs = step.obs
            if not alive.any():
                break
    return {k: torch.stack(v) for k, v in rows.items()}


def predicted_changes(dist, task, policy, rollouts: int, seed: int, limit: float):
    """delta, GBE's and ABE's predicted change of J_C, and the batch's own realised change."""
    env = dist.make_env(task, rollouts, derived_seed(seed, 0))
    est = estimate(env, policy, None, env.horizon, torch.Generator().manual_seed(derived_seed(seed, 1)))
    g, q = est.g.double().numpy(), est.q.double().numpy()
    direction, _ = solve_subproblem(g, q, est.cost - limit, 1e-4)
    if not np.linalg.norm(direction) > 0:
        return None
    delta = direction * STEP_NORM / np.linalg.norm(direction)
    batch = episodes(dist, task, policy, rollouts, seed)
    obs, actions, alive = batch["obs"], batch["actions"], batch["alive"]
    cost = batch["cost"].double() * alive
    advantage = returns_to_go(cost, alive, GAMMA)
    advantage = (advantage - time_baseline(advantage, alive)) * alive
    theta = policy.flat()
    with torch.no_grad():
        old = policy.log_prob(obs, actions).double()
        new = policy.log_prob(obs, actions, policy.unflatten(theta + torch.as_tensor(delta, dtype=theta.dtype))).double()
    discount = GAMMA ** torch.arange(obs.shape[0], dtype=torch.float64)[:, None]
    abe = float((discount * (torch.exp(new - old) - 1) * advantage * alive).sum() / rollouts)
    policy.load_flat(theta + torch.as_tensor(delta, dtype=theta.dtype))
    same_after = float((episodes(dist, task, policy, rollouts, seed)["cost"].double().sum(0)).mean())
    policy.load_flat(theta)
    return delta, float(q @ delta), abe, same_after - est.cost


def realised_change(dist, task, policy, delta: np.ndarray, n: int, seed: int) -> float:
    theta = policy.flat()
    before = float(episodes(dist, task, policy, n, seed)["cost"].double().sum(0).mean())
    policy.load_flat(theta + torch.as_tensor(delta, dtype=theta.dtype))
    after = float(episodes(dist, task, policy, n, seed)["cost"].double().sum(0).mean())
    policy.load_flat(theta)
    return after - before


def stage_policies(task_name: str, iterations: int, rollouts: int, seed: int):
    """The CGPO iterates 0, K/3, 2K/3, K of one run on the task (through the learner's operator)."""
    block, params = TASKS[task_name]
    config = load_config({"device": "cpu", "scenarios": {"s": {**block, "rollouts": rollouts}},
                          "learners": {"l": {"algorithm": "cgpo", "iterations": iterations, "n_tasks": 1}}})
    dist = get_distribution(block["distribution"], **block.get("task_options", {}))
    scenario = build_scenario(config, "s", dist, "cpu")
    task = Task(dist.name, {**params, "d": [dist.cost_limit]})
    operator = build_learner(config, scenario, "l").adapt
    stages = {iterations // 3, 2 * iterations // 3, iterations}
    policy = scenario.fresh_policy(task, derived_seed(seed, 0), "differentiable")
    state, out = operator.start(task, policy, derived_seed(seed, 2)), [(0, policy)]
    for k in range(iterations):          # the adaptation loop's protocol, keeping the stages' iterates
        policy = operator.step(state, policy, operator.observe(state, policy, derived_seed(seed, 1, k))).policy
        if k + 1 in stages:
            out.append((k + 1, policy))
    return dist, task, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--out", default="results/benchmarks/cgpo")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.perf_counter()
    for task_name in args.tasks:
        dist, task, stages = stage_policies(task_name, args.iterations, args.rollouts, seed=0)
        limit = float(task.params["d"][0])
        for stage, policy in stages:
            errors: dict[str, list[float]] = {"gbe fresh": [], "abe fresh": [], "gbe same": []}
            for rep in range(args.repetitions):
                res = predicted_changes(dist, task, policy, args.rollouts, derived_seed(5, stage, rep), limit)
                if res is None:
                    continue
                delta, gbe, abe, same = res
                realised = realised_change(dist, task, policy, delta, args.eval, derived_seed(6, stage, rep))
                for key, pred, real in (("gbe fresh", gbe, realised), ("abe fresh", abe, realised), ("gbe same", gbe, same)):
                    if real != 0.0:
                        errors[key].append(abs(real - pred) / abs(real))
            for key, values in errors.items():
                estimator, where = key.split()
                rows.append({"task": task_name, "stage": stage, "estimator": estimator, "realised_on": where,
                             "mean": np.mean(values), "std": np.std(values), "median": np.median(values),
                             "n": len(values)})
                print(f"{task_name} stage {stage} {key}: mean {np.mean(values):.4g} median {np.median(values):.4g} "
                      f"({len(values)}; {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    with (out / "cgpo_gbe_abe.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    plot(out / "cgpo_gbe_abe.png", rows, args)
    print(f"wrote {out}/cgpo_gbe_abe.csv and cgpo_gbe_abe.png ({time.perf_counter() - start:.0f} s)")
    return 0


def plot(path: Path, rows, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task_name in zip(axes[0], tasks):
        sub = [r for r in rows if r["task"] == task_name]
        stages = sorted({r["stage"] for r in sub})
        for i, key in enumerate(("gbe fresh", "abe fresh", "gbe same")):
            est, where = key.split()
            vals = [next(r["median"] for r in sub if r["stage"] == s and r["estimator"] == est and r["realised_on"] == where)
                    for s in stages]
            ax.bar(np.arange(len(stages)) + 0.27 * (i - 1), vals, width=0.27,
                   label=f"{est.upper()} (realised on {'fresh' if where == 'fresh' else 'its own'} episodes)")
        ax.axhline(1.0, color="k", ls=":", lw=1)
        ax.set(xticks=np.arange(len(stages)), xticklabels=[f"iterate {s}" for s in stages], yscale="log",
               title=task_name, ylabel="median relative error (eq. 74)")
        ax.legend(fontsize=7)
    fig.suptitle(f"Predicted vs realised change of J_C for ||delta|| = {STEP_NORM} ({args.repetitions} batches of "
                 f"{args.rollouts} episodes per stage)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
