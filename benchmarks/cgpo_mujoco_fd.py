"""CGPO beyond the paper: GBE on half_cheetah_vel from MuJoCo's finite-difference transition
Jacobians (mjd_transitionFD, chained over the frame skip; tasks/mujoco_batch.py), without a
learned model. Two measurements (the machine's load affects the absolute times, not the ratios):

1. cost per step: seconds per environment step of one GBE rollout (FD Jacobians, reparameterised
   actions, back-propagation; BPTT over the horizon, and SHAC windows of 10 with critics as the
   cgpo operator runs) against a plain sampling rollout of the same N episodes
   (`rollout_policy`), timed in the same run;
2. the estimate's error (the paper's Fig. 5 kind): from fresh policies (the default 2 x 64 tanh
   network), for horizons H and update norms ||delta||, the predicted change q.delta of J_C
   (head-height cost; BPTT gradients of N episodes) against the realised change, on the same
   episodes (common random numbers: the same initial states and action noise) and on `eval`
   fresh ones; eq. (74) relative errors, medians over `repetitions` batches. Directions: -q (the
   recovery step of case a) and the CGPO step (case c here: mostly along g's part orthogonal to
   q, so the first-order change of J_C is small and eq. (74) divides by a second-order change);
   and J_R's change g.delta along g.

    python benchmarks/cgpo_mujoco_fd.py            # minutes
Writes OUT/cgpo_mujoco_fd.csv, OUT/cgpo_mujoco_fd_cost.csv and OUT/cgpo_mujoco_fd.png.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

from safemeta.adaptation.cgpo import solve_subproblem
from safemeta.adaptation.gbe import Critics, CriticSettings, estimate
from safemeta.policies import GaussianMLPPolicy
from safemeta.rollout import SamplingSettings, derived_seed, rollout_policy
from safemeta.tasks import Task, get_distribution


def make(horizon: int):
    dist = get_distribution("half_cheetah_vel", horizon=horizon, sim_threads=1)
    return dist, Task("half_cheetah_vel", {"goal_velocity": 1.0, "d": [dist.cost_limit]})


def episode_totals(dist, task, policy, n: int, seed: int) -> tuple[float, float]:
    """Mean episode (reward, cost) of n reparameterised episodes drawn as `gbe.estimate` draws them."""
    env = dist.make_env(task, n, derived_seed(seed, 0))
    gen = torch.Generator().manual_seed(derived_seed(seed, 1))
    obs, reward, cost = env.reset(), 0.0, 0.0
    with torch.no_grad():
        for _ in range(env.horizon):
            step = env.step(policy.rsample(obs, torch.randn((n, 6), generator=gen, dtype=torch.float64)))
            reward, cost, obs = reward + float(step.reward.double().mean()), cost + float(step.cost.double().mean()), step.obs
    return reward, cost


def cost_per_step(rollouts: int, horizon: int, repeats: int) -> list[dict[str, object]]:
    dist, task = make(horizon)
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(17, 6)
    sampling = SamplingSettings(rollouts, 0.99, 1.0)
    critics = Critics(17, horizon, CriticSettings((64, 64), 1e-3, 64, 50, 0.95), 0, "cpu", torch.float32)
    times: dict[str, list[float]] = {"plain rollout": [], "GBE, BPTT": [], "GBE, windows of 10": []}
    for r in range(repeats):
        for name in times:
            start = time.perf_counter()
            if name == "plain rollout":
                rollout_policy(dist, task, policy, sampling, derived_seed(1, r))
            else:
                env = dist.make_env(task, rollouts, derived_seed(1, r, 0))
                estimate(env, policy, None if "BPTT" in name else critics, horizon if "BPTT" in name else 10,
                         torch.Generator().manual_seed(derived_seed(1, r, 1)))
            times[name].append((time.perf_counter() - start) / (rollouts * horizon))
    base = float(np.median(times["plain rollout"]))
    return [{"what": name, "seconds_per_env_step": f"{np.median(v):.4g}", "ratio_to_plain": f"{np.median(v) / base:.3g}",
             "rollouts": rollouts, "horizon": horizon} for name, v in times.items()]


def estimate_errors(horizons, norms, rollouts: int, n_eval: int, repetitions: int, start: float):
    rows = []
    for horizon in horizons:
        dist, task = make(horizon)
        limit = float(task.params["d"][0])
        for rep in range(repetitions):
            torch.manual_seed(derived_seed(2, rep))
            policy = GaussianMLPPolicy(17, 6)
            seed = derived_seed(3, horizon, rep)
            est = estimate(dist.make_env(task, rollouts, derived_seed(seed, 0)), policy, None, horizon,
                           torch.Generator().manual_seed(derived_seed(seed, 1)))
            g, q = est.g.double().numpy(), est.q.double().numpy()
            step, case = solve_subproblem(g, q, est.cost - limit, 1e-4)
            directions = {"cgpo step": step / np.linalg.norm(step), "-q": -q / np.linalg.norm(q),
                          "g": g / np.linalg.norm(g)}
            theta = policy.flat()
            fresh0 = episode_totals(dist, task, policy, n_eval, derived_seed(seed, 9))
            for (name, direction), norm in itertools.product(directions.items(), norms):
                delta = norm * direction
                policy.load_flat(theta + torch.as_tensor(delta, dtype=theta.dtype))
                same = episode_totals(dist, task, policy, rollouts, seed)
                fresh = episode_totals(dist, task, policy, n_eval, derived_seed(seed, 9))
                policy.load_flat(theta)
                for what, pred, real_same, real_fresh in (
                        ("cost", float(q @ delta), same[1] - est.cost, fresh[1] - fresh0[1]),
                        ("reward", float(g @ delta), same[0] - est.reward, fresh[0] - fresh0[0])):
                    if (what == "cost" and name == "g") or (what == "reward" and name == "-q"):
                        continue
                    rows.append({"horizon": horizon, "norm": norm, "direction": name, "repetition": rep,
                                 "signal": what, "case": case, "gradient_norm": float(np.linalg.norm(q if what == "cost" else g)),
                                 "predicted": pred, "realised_same": real_same, "realised_fresh": real_fresh,
                                 "error_same": abs(real_same - pred) / abs(real_same) if real_same else np.nan,
                                 "error_fresh": abs(real_fresh - pred) / abs(real_fresh) if real_fresh else np.nan})
            print(f"H {horizon} repetition {rep}: J_C {est.cost:.3f} (b {limit:g}), |q| {np.linalg.norm(q):.3g}; "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--horizons", type=int, nargs="*", default=[5, 10, 25, 50, 100])
    parser.add_argument("--norms", type=float, nargs="*", default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=4)
    parser.add_argument("--out", default="results/benchmarks/cgpo")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    costs = cost_per_step(args.rollouts, 100, 3)
    for row in costs:
        print(f"{row['what']}: {row['seconds_per_env_step']} s per env step ({row['ratio_to_plain']} x plain)")
    rows = estimate_errors(args.horizons, args.norms, args.rollouts, args.eval, args.repetitions, start)
    with (out / "cgpo_mujoco_fd_cost.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(costs[0]))
        writer.writeheader()
        writer.writerows(costs)
    with (out / "cgpo_mujoco_fd.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    summary = plot(out / "cgpo_mujoco_fd.png", rows, args)
    for line in summary:
        print(line)
    print(f"wrote {out}/cgpo_mujoco_fd.csv, cgpo_mujoco_fd_cost.csv, cgpo_mujoco_fd.png "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


def plot(path: Path, rows, args) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("cost", "-q"), ("cost", "cgpo step"), ("reward", "g")]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4), sharey=True)
    summary = []
    for ax, (signal, direction) in zip(axes, panels):
        for norm in args.norms:
            for where, style in (("same", "o-"), ("fresh", "s--")):
                med = [np.nanmedian([r[f"error_{where}"] for r in rows if r["horizon"] == h and r["norm"] == norm
                                     and r["signal"] == signal and r["direction"] == direction]) for h in args.horizons]
                ax.plot(args.horizons, med, style, label=f"||delta|| = {norm:g}, {where} episodes")
                summary.append(f"{signal} along {direction}, ||delta|| {norm:g}, {where} episodes: median relative "
                               "error by horizon " + ", ".join(f"{h}: {m:.3g}" for h, m in zip(args.horizons, med)))
        ax.axhline(1.0, color="k", ls=":", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="horizon H (BPTT over the whole episode)",
               title=f"J_{'C' if signal == 'cost' else 'R'} change along {direction}")
    axes[0].set_ylabel("median relative error (eq. 74)")
    axes[0].legend(fontsize=7)
    fig.suptitle("half_cheetah_vel: GBE from MuJoCo finite-difference Jacobians, fresh policies")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return summary


if __name__ == "__main__":
    sys.exit(main())
