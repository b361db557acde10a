"""How closely the native navigation tasks follow Safety-Gymnasium 1.0.0, and how closely
Safety-Gymnasium follows itself.

For each scenario, tasks x copies start from the same states (the envs' own reset draws, same
seed) and are driven by the same uniformly random actions for `--steps` steps:
- native vs SG: the native env (MuJoCo 4) against the sg_* env (the real SG, MuJoCo 2.3.3);
- SG vs SG: the sg_* env against itself with every start heading turned by 1e-9 rad (set_pose),
  the sensitivity of SG's own dynamics to a perturbation far below any modelling difference.
Printed per pair: the largest robot-position difference at steps 10, 100 and the last; the
largest observation difference per group over the first 10 steps and over the whole run; the
largest per-step reward difference; the share of steps whose costs differ; the episode costs.
Needs the worker environment (`safemeta sg-setup`).

    .venv/bin/python benchmarks/sg_agreement.py                      # 3 tasks x 4 copies x 500 steps
    .venv/bin/python benchmarks/sg_agreement.py --tasks 1 --steps 100
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from safemeta.tasks import Task, get_distribution
from safemeta.tasks.navigation import LIDAR_BINS

SCENARIOS = ["point_circle", "car_circle_hazard", "point_button"]


def groups(name: str) -> dict[str, slice]:
    """Observation groups by index (navigation.py's layout)."""
    out = {"accelerometer": slice(0, 3), "velocimeter": slice(3, 6), "gyro": slice(6, 9), "magnetometer": slice(9, 12)}
    base = 12
    if name == "car_circle_hazard":
        out.update(ballangvel=slice(12, 15), ballquat=slice(15, 24))
        base = 24
    lidars = ["circle"] + (["hazards"] if name == "car_circle_hazard" else []) if "circle" in name else \
        ["buttons", "goal", "hazards"]
    for k, g in enumerate(lidars):
        out[f"{g} lidar"] = slice(base + k * LIDAR_BINS, base + (k + 1) * LIDAR_BINS)
    return out


def lockstep(a, b, steps: int, rng: np.random.Generator, start_a=None, start_b=None) -> dict[str, np.ndarray]:
    """Step two BatchEnvs of one task with the same random actions; per-step differences."""
    oa = a.reset() if start_a is None else a.set_pose(*start_a)
    ob = b.reset() if start_b is None else b.set_pose(*start_b)
    n = a.num_envs
    rec = {"obs": [(oa - ob).abs().numpy()], "pos": [], "reward": [], "cost": [], "cost_a": 0.0, "cost_b": 0.0}
    for _ in range(steps):
        act = torch.from_numpy(rng.uniform(-1, 1, (n, 2)))
        sa, sb = a.step(act), b.step(act)
        rec["obs"].append((sa.obs - sb.obs).abs().numpy())
        rec["pos"].append(np.abs(a.positions() - b.positions()).max(axis=1))
        rec["reward"].append((sa.reward - sb.reward).abs().numpy())
        rec["cost"].append((sa.cost != sb.cost).numpy()[:, 0])
        rec["cost_a"] += float(sa.cost.sum())
        rec["cost_b"] += float(sb.cost.sum())
    return {k: (np.array(v) if isinstance(v, list) else v) for k, v in rec.items()}


def pairs(name: str, task_seed: int, copies: int):
    """(label, env a, env b, start a, start b) for both comparisons of one task."""
    native_dist, sg_dist = get_distribution(name, sim_threads=1), get_distribution(f"sg_{name}", sim_threads=1)
    task = native_dist.sample(1, seed=task_seed)[0]
    native = native_dist.make_env(task, copies, seed=task_seed)
    sg = sg_dist.make_env(Task(sg_dist.name, task.params), copies, seed=task_seed)
    yield "native vs SG", native, sg, None, None
    sg2 = sg_dist.make_env(Task(sg_dist.name, task.params), copies, seed=task_seed)
    sg.reset()
    xy, heading = sg.positions(), np.random.default_rng(task_seed).uniform(0, 2 * np.pi, copies)
    goal = np.maximum(sg.goal, 0)
    yield "SG vs SG (1e-9 rad)", sg, sg2, (xy, heading, None, goal), (xy, heading + 1e-9, None, goal)


def summarize(name: str, label: str, runs: list[dict[str, np.ndarray]]) -> None:
    obs = np.concatenate([r["obs"] for r in runs], axis=1)        # [T+1, N, D]
    pos = np.concatenate([r["pos"] for r in runs], axis=1)
    reward = np.concatenate([r["reward"] for r in runs], axis=1)
    cost = np.concatenate([r["cost"] for r in runs], axis=1)
    t = pos.shape[0]
    print(f"{name:<18} {label:<20} position diff at 10/100/{t}: {pos[min(9, t - 1)].max():.1e} / "
          f"{pos[min(99, t - 1)].max():.1e} / {pos[-1].max():.1e} m; max reward diff {reward.max():.1e}; "
          f"cost differs in {100 * cost.mean():.2f}% of steps (episode costs {sum(r['cost_a'] for r in runs):.0f} "
          f"vs {sum(r['cost_b'] for r in runs):.0f})")
    for group, sl in groups(name).items():
        print(f"{'':<40} {group:<14} first 10 steps {obs[:11, :, sl].max():9.2e}   whole run {obs[:, :, sl].max():9.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=SCENARIOS)
    parser.add_argument("--tasks", type=int, default=3, help="tasks per scenario (task seeds 0..)")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.scenarios:
        results: dict[str, list] = {}
        for seed in range(args.tasks):
            for label, a, b, start_a, start_b in pairs(name, seed, args.copies):
                rng = np.random.default_rng(seed)
                results.setdefault(label, []).append(lockstep(a, b, args.steps, rng, start_a, start_b))
        for label, runs in results.items():
            summarize(name, label, runs)


if __name__ == "__main__":
    main()
