"""Anytime safety of meta-test operators on trained meta-policies: violations and reward per step.

    python benchmarks/safety_sweep.py --config config/config.yaml --results results \
        --scenarios half_cheetah_vel point_circle --seeds 0 1 --tasks 20 --steps 10 \
        --set kappa=0,1,2 --set lam_c=0,10

For each scenario and seed, the meta-policy `RESULTS/metatrain/{scenario}/{method}/seed{seed}/policy.pt`
is meta-tested on the first `--tasks` test tasks of that seed (sampled again from the config with
as many test tasks, so the first ones are the pipeline's) with the scenario's operator and every
combination of the `--set` values (operator options), through the same code as `safemeta
meta-test` (seeds derived from the seed as there). Prints per setting the number of tasks whose
cost exceeds d and d + 2 SE at each step k, the run's violation rate, and the mean reward per
step; `--csv` writes the same as a table.
"""
from __future__ import annotations

import argparse
import copy
import csv
import itertools
import sys

import numpy as np
import torch

from safemeta.config import load_config
from safemeta.evaluate import meta_test
from safemeta.plugins import build_operator, build_scenario
from safemeta.policies import policy_from_checkpoint
from safemeta.results import violations
from safemeta.rollout import derived_seed
from safemeta.tasks import get_distribution


def parse_value(text: str):
    if text in ("null", "None"):
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--results", default="results")
    parser.add_argument("--method", default="safemeta")
    parser.add_argument("--scenarios", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--tasks", type=int, default=None, help="test tasks (default: the config's)")
    parser.add_argument("--steps", type=int, default=None, help="adaptation steps (default: the config's)")
    parser.add_argument("--set", action="append", default=[], help="operator option values, name=v1,v2,...")
    parser.add_argument("--csv", help="write the per-step table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid = {k: [parse_value(v) for v in vals.split(",")] for k, vals in (s.split("=", 1) for s in args.set)}
    rows = []
    for scenario_key in args.scenarios:
        for values in itertools.product(*grid.values()) if grid else [()]:
            change = dict(zip(grid, values))
            raw = load_config(args.config)
            config = copy.deepcopy(raw)
            scen = config["scenarios"][scenario_key]
            if args.tasks:
                scen["n_test_tasks"] = args.tasks
            if args.steps:
                scen.setdefault("metatest", {})["adapt_steps"] = args.steps
            operator_name = "dual_pgd"
            scen["adaptation"].setdefault(operator_name, {}).update(change)
            if "kl_target" in change and change["kl_target"] is None:
                scen["adaptation"][operator_name].setdefault("lam", 1.0)
            config = load_config(config)
            steps = config["scenarios"][scenario_key].get("metatest", {}).get("adapt_steps",
                                                                                config["metatest"]["adapt_steps"])
            dist = get_distribution(scen["distribution"], **scen["task_options"])
            scenario = build_scenario(config, scenario_key, dist, "cpu")
            operator = build_operator(config, "meta_test", scenario, args.method)
            per_seed = []
            for seed in args.seeds:
                tasks = dist.sample(scen["n_test_tasks"], (seed, 1))
                path = f"{args.results}/metatrain/{scenario_key}/{args.method}/seed{seed}/policy.pt"
                policy = policy_from_checkpoint(torch.load(path, weights_only=False))
                arrays = meta_test(operator, tasks, policy, steps, seed=derived_seed(seed, 9))
                per_seed.append(arrays)
            import xarray as xr

            cost = xr.DataArray(np.concatenate([a["cost"] for a in per_seed]), dims=("task", "step", "constraint"))
            se = xr.DataArray(np.concatenate([a["cost_se"] for a in per_seed]), dims=("task", "step", "constraint"))
            limit = xr.DataArray(np.stack([np.asarray(t.params["d"]) for seed in args.seeds
                                           for t in dist.sample(scen["n_test_tasks"], (seed, 1))]),
                                 dims=("task", "constraint"))
            over = violations(cost, se, limit).values
            over2 = violations(cost, se, limit, 2.0).values
            reward = np.concatenate([a["reward"] for a in per_seed]).mean(0)
            n = cost.sizes["task"]
            label = " ".join(f"{k}={v}" for k, v in change.items()) or "config"
            print(f"{scenario_key} [{label}] {n} task-runs, violation rate {over.sum() / over.size / n:.3f}")
            print(f"   >d     per k: {' '.join(f'{int(v):2d}' for v in over)}")
            print(f"   >d+2SE per k: {' '.join(f'{int(v):2d}' for v in over2)}")
            print(f"   reward per k: {' '.join(f'{v:7.2f}' for v in reward)}", flush=True)
            for k in range(len(over)):
                rows.append({"scenario": scenario_key, "setting": label, "step": k, "violations": int(over[k]),
                             "violations_2se": int(over2[k]), "task_runs": n, "reward": float(reward[k])})
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
