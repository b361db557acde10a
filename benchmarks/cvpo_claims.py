"""CVPO's qualitative claims (its Sec. 4.3, Figs. 2-5) from the single-task traces of a summary.nc.

Against a primal-dual learner trained on the same tasks with the same data per iteration, CVPO
should reach its limit with fewer violations during training and comparable or higher reward.
Per scenario and learner (mean and standard deviation over seeds and tasks), from the training
episodes themselves (the exploration policy of every iteration k = 0..K):

- final reward / final cost: means over the last 20 % of the iterations (the paper's
  "convergence", Fig. 5), and the fraction of runs whose final cost is <= d;
- training cost: sum over iterations of the mean episode cost (times `rollouts` it is the total
  cost of all training episodes; with 0/1 costs, the number of violating steps per rollout slot);
- violating iterations: explored policies (k = 0..K) whose mean episode cost exceeds d;
- at limit from: the first iteration k from which the mean cost of iterations k..K is <= d
  (k at most K + 1 - the last 20 %; NaN when no such k: the run does not reach its limit).

    python benchmarks/cvpo_claims.py results/summary.nc [--csv out.csv]

Made by `snakemake --configfile config/cvpo_claims.yaml --replace-workflow-config` (README "CVPO").
"""
from __future__ import annotations

import argparse
import csv
import sys

import numpy as np

from safemeta.results import read_dataset


def run_metrics(reward: np.ndarray, cost: np.ndarray, d: float) -> dict[str, float]:
    """Metrics of one training run: reward [K+1], cost [K+1] (mean episode values per iteration)."""
    keep = np.isfinite(reward)
    reward, cost = reward[keep], cost[keep]
    tail = max(1, int(round(0.2 * len(reward))))
    tails = np.array([cost[k:].mean() for k in range(len(cost) - tail + 1)])   # windows of at least the tail
    reached = np.flatnonzero(tails <= d)
    return {"final_reward": float(reward[-tail:].mean()), "final_cost": float(cost[-tail:].mean()),
            "final_safe": float(cost[-tail:].mean() <= d), "training_cost": float(cost.sum()),
            "violating_iterations": float((cost > d).sum()), "at_limit_from": float(reached[0]) if reached.size else np.nan,
            "policies": float(len(reward)), "d": d}


def claims(summary) -> list[dict[str, object]]:
    rows = []
    for scenario in summary.scenario.values:
        for learner in summary.learner.values:
            runs = []
            for seed in summary.seed.values:
                sel = summary.sel(scenario=scenario, learner=learner, seed=seed)
                for task in sel.task.values:
                    reward = sel.single_reward.sel(task=task).values
                    if not np.isfinite(reward).any():
                        continue
                    cost = sel.single_cost.sel(task=task).max("constraint").values
                    d = float(summary.limit.sel(scenario=scenario, seed=seed, task=task).max())
                    runs.append(run_metrics(reward, cost, d))
            if not runs:
                continue
            row: dict[str, object] = {"scenario": str(scenario), "learner": str(learner), "runs": len(runs)}
            for key in runs[0]:
                values = np.array([r[key] for r in runs])
                row[key] = float(np.nanmean(values)) if np.isfinite(values).any() else np.nan
                row[key + "_sd"] = float(np.nanstd(values)) if np.isfinite(values).any() else np.nan
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("summary", help="summary.nc with single-task traces")
    parser.add_argument("--csv", help="also write the table as CSV")
    args = parser.parse_args(argv)
    summary = read_dataset(args.summary)
    if "single_reward" not in summary:
        print(f"{args.summary} has no single-task traces", file=sys.stderr)
        return 1
    rows = claims(summary)
    print(f"{'scenario':<18} {'learner':<16} {'runs':>4} {'final reward':>14} {'final cost':>13} {'d':>4} "
          f"{'safe':>5} {'training cost':>15} {'viol. its':>10} {'limit from':>11}")
    for r in rows:
        print(f"{r['scenario']:<18} {r['learner']:<16} {r['runs']:>4} {r['final_reward']:>7.2f} ± {r['final_reward_sd']:<4.2f}"
              f" {r['final_cost']:>6.1f} ± {r['final_cost_sd']:<4.1f} {r['d']:>4.0f} {r['final_safe']:>5.2f}"
              f" {r['training_cost']:>8.0f} ± {r['training_cost_sd']:<5.0f} {r['violating_iterations']:>4.1f}/{r['policies']:<4.0f}"
              f" {r['at_limit_from']:>11.1f}")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
