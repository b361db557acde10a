"""CGPO's Table 1 kind (Conv. Steps, Vio. Ratio; App. F.2) and two ablations, from single-task runs
of the registered learners (the same code as the pipeline's `single_task` stage).

Suites (`--suites`, default all):
- table1: cgpo vs shac_lag (the Lagrangian on the same GBE gradients) on cartpole_pos and
  point_circle_diff;
- mb: MB-CGPO (world-model gradients, Alg. 3) vs CGPO (the task's own gradients, which miss the
  floor term) on function_env_floor;
- radius, radius_pcd: CGPO on function_env (where reward = cost, so g is parallel to q and the
  case (c) step, the nearest point of the boundary, does not depend on the radius) and on
  point_circle_diff with eq. (18)'s unstated (eta1, eta2) varied, and a static radius.

Every run trains from a fresh policy on one task for `iterations` CGPO/SHAC-Lag iterations of
`rollouts` episodes (task parameters: CGPO's centre values; horizon 100, d scaled with it; on
FunctionEnv the policy's initial log-std is -1.5 and CGPO's gradients are whole-episode BPTT, as
in tests/test_cgpo.py). Its curve is (cumulative env steps, J_R, J_C, standard error of J_C) of
every iterate.

Metrics (curves.py; the paper gives no parameter values, these are ours):
- Conv. Steps: window 10 iterates, threshold 10% of the range of all returns of that task (every
  algorithm and seed pooled), feasibility J_C <= b at the start of the window; -1 = never;
- Vio. Ratio: critical area J_C > b - 10% |b|, violation J_C > b + 2 SE (the iterate's own
  standard error of J_C: the soft margin of a sampled constraint).

    python benchmarks/cgpo_table1.py                     # 60 iterations x 3 seeds (tens of minutes on 2 cores)
    python benchmarks/cgpo_table1.py --full              # Table 4's 100 iterations x 5 seeds
    python benchmarks/cgpo_table1.py --suites table1 --iterations 20 --seeds 1   # a quick look
Writes OUT/cgpo_table1.csv (per run and mean +- std per task and algorithm), OUT/cgpo_curves.csv
and OUT/cgpo_table1.png (learning curves, limit dashed).
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

from safemeta.config import load_config
from safemeta.curves import convergence_step, violation_ratio
from safemeta.plugins import build_learner, build_scenario
from safemeta.tasks import Task, get_distribution

BPTT = {"cgpo": {"window": 100}, "mb_cgpo": {"window": 100}}   # FunctionEnv: whole-episode gradients, T = 100
TASKS = {   # scenario block (horizon 100) and the task's parameters (CGPO's centre values)
    "cartpole_pos": ({"distribution": "cartpole_pos", "task_options": {"horizon": 100}},
                     {"pole_mass": 0.1, "pole_half_length": 0.5}),
    "point_circle_diff": ({"distribution": "point_circle_diff", "task_options": {"horizon": 100}},
                          {"radius": 1.25, "wall_factor": 0.65}),
    "function_env": ({"distribution": "function_env", "policy": {"init_log_std": -1.5}, "adaptation": BPTT},
                     {"shift": 0.0}),
    "function_env_floor": ({"distribution": "function_env_floor", "policy": {"init_log_std": -1.5}, "adaptation": BPTT},
                           {"shift": 0.0}),
}
ALGORITHMS = {   # label -> learner block
    "cgpo": {"algorithm": "cgpo"},
    "shac_lag": {"algorithm": "shac_lag"},
    "mb_cgpo": {"algorithm": "mb_cgpo"},
    "cgpo eta=(0.1,0.5)": {"algorithm": "cgpo", "adaptation": {"eta1": 0.1, "eta2": 0.5}},
    "cgpo eta=(0.25,0.75)": {"algorithm": "cgpo", "adaptation": {"eta1": 0.25, "eta2": 0.75}},
    "cgpo eta=(0.5,0.9)": {"algorithm": "cgpo", "adaptation": {"eta1": 0.5, "eta2": 0.9}},
    "cgpo static radius": {"algorithm": "cgpo", "adaptation": {"adapt_radius": False}},
}
SUITES = {
    "table1": [("cartpole_pos", "cgpo"), ("cartpole_pos", "shac_lag"), ("point_circle_diff", "cgpo"),
               ("point_circle_diff", "shac_lag")],
    "mb": [("function_env_floor", "cgpo"), ("function_env_floor", "mb_cgpo")],
    "radius": [("function_env", label) for label in ALGORITHMS if label.startswith("cgpo ")],
    "radius_pcd": [("point_circle_diff", label) for label in ALGORITHMS if label.startswith("cgpo ")],
}
WINDOW, THRESHOLD_FRACTION, AREA_FRACTION, SE_MARGIN = 10, 0.1, 0.1, 2.0


def run(task_name: str, label: str, seed: int, iterations: int, rollouts: int) -> dict[str, np.ndarray]:
    """One single-task run through the registries; its curve."""
    block, params = TASKS[task_name]
    scen = {**block, "rollouts": rollouts}
    config = load_config({"device": "cpu", "scenarios": {"s": scen},
                          "learners": {"l": {**ALGORITHMS[label], "iterations": iterations, "n_tasks": 1}}})
    dist = get_distribution(scen["distribution"], **scen.get("task_options", {}))
    scenario = build_scenario(config, "s", dist, "cpu")
    task = Task(dist.name, {**params, "d": [dist.cost_limit]})
    out = build_learner(config, scenario, "l").run([task], seed=seed)
    return {"env_steps": np.cumsum(out["env_steps"][0]), "reward": out["reward"][0], "cost": out["cost"][0, :, 0],
            "cost_se": out["cost_se"][0, :, 0], "limit": float(dist.cost_limit)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", nargs="*", default=["table1", "mb", "radius"], choices=list(SUITES),
                        help="default: table1 mb radius (files cgpo_table1*); any other choice adds its names "
                             "to the file names")
    parser.add_argument("--full", action="store_true", help="Table 4's size: 100 iterations x 5 seeds")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--out", default="results/benchmarks/cgpo")
    parser.add_argument("--replot", metavar="CURVES_CSV", help="redraw figure and table from a curves CSV this "
                                                                   "script wrote, without running")
    args = parser.parse_args(argv)
    if args.replot:
        curves = read_curves(Path(args.replot))
        tag = Path(args.replot).stem.removeprefix("cgpo_curves")
        write(Path(args.replot).parent, metrics(curves), curves, tag)
        plot(Path(args.replot).parent / f"cgpo_table1{tag}.png", curves)
        return 0
    iterations = args.iterations or (100 if args.full else 60)
    seeds = args.seeds or (5 if args.full else 3)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves: dict[tuple[str, str], list[dict[str, np.ndarray]]] = {}
    start = time.perf_counter()
    for suite in args.suites:
        for task_name, label in SUITES[suite]:
            for seed in range(seeds):
                curves.setdefault((task_name, label), []).append(run(task_name, label, seed, iterations, args.rollouts))
                c = curves[(task_name, label)][-1]
                print(f"{task_name} {label} seed {seed}: final J_R {c['reward'][-1]:.3f} J_C {c['cost'][-1]:.3f} "
                      f"(b = {c['limit']:g}; {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    rows = metrics(curves)
    tag = "" if args.suites == ["table1", "mb", "radius"] else "_" + "_".join(args.suites)
    write(out, rows, curves, tag)
    plot(out / f"cgpo_table1{tag}.png", curves)
    for row in rows:
        if row["seed"] == "mean":
            print(f"{row['task']:>20} {row['algorithm']:>22}: Conv. Steps {row['conv_steps']}  Vio. Ratio (%) "
                  f"{row['vio_ratio_pct']}  final J_C {row['final_cost']} (b = {row['limit']})")
    print(f"wrote {out}/cgpo_table1{tag}.csv, cgpo_curves{tag}.csv, cgpo_table1{tag}.png ({iterations} iterations x {seeds} seeds, "
          f"N = {args.rollouts}, {time.perf_counter() - start:.0f} s)")
    return 0


def metrics(curves: dict[tuple[str, str], list[dict[str, np.ndarray]]]) -> list[dict[str, object]]:
    """Per run and per (task, algorithm) mean +- std: Conv. Steps, Vio. Ratio, final J_R, J_C."""
    spans = {}
    for (task_name, _), runs in curves.items():
        values = np.concatenate([r["reward"] for r in runs])
        lo, hi = spans.get(task_name, (np.inf, -np.inf))
        spans[task_name] = (min(lo, values.min()), max(hi, values.max()))
    rows: list[dict[str, object]] = []
    for (task_name, label), runs in curves.items():
        threshold = THRESHOLD_FRACTION * (spans[task_name][1] - spans[task_name][0])
        per_run = []
        for seed, r in enumerate(runs):
            b = r["limit"]
            conv = convergence_step(r["env_steps"], r["reward"], r["cost"], b, WINDOW, threshold)
            vio = violation_ratio(r["cost"], b, AREA_FRACTION * abs(b), SE_MARGIN * r["cost_se"])
            per_run.append((conv, vio, r["reward"][-1], r["cost"][-1]))
            rows.append({"task": task_name, "algorithm": label, "seed": seed, "conv_steps": f"{conv:.4g}",
                         "vio_ratio_pct": f"{100 * vio:.2f}" if vio >= 0 else "-1", "final_reward": f"{r['reward'][-1]:.4g}",
                         "final_cost": f"{r['cost'][-1]:.4g}", "limit": f"{b:.4g}", "threshold": f"{threshold:.4g}"})
        arr = np.array(per_run)
        conv_ok, vio_ok = arr[arr[:, 0] >= 0, 0], arr[arr[:, 1] >= 0, 1]
        rows.append({"task": task_name, "algorithm": label, "seed": "mean",
                     "conv_steps": _mean_std(conv_ok, f"converged {len(conv_ok)}/{len(arr)}"),
                     "vio_ratio_pct": _mean_std(100 * vio_ok, f"in area {len(vio_ok)}/{len(arr)}"),
                     "final_reward": _mean_std(arr[:, 2]), "final_cost": _mean_std(arr[:, 3]),
                     "limit": f"{runs[0]['limit']:.4g}", "threshold": f"{threshold:.4g}"})
    return rows


def _mean_std(values: np.ndarray, note: str = "") -> str:
    if len(values) == 0:
        return f"- ({note})" if note else "-"
    text = f"{np.mean(values):.4g} +- {np.std(values):.2g}"
    return f"{text} ({note})" if note else text


def write(out: Path, rows: list[dict[str, object]], curves, tag: str) -> None:
    with (out / f"cgpo_table1{tag}.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with (out / f"cgpo_curves{tag}.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["task", "algorithm", "seed", "iterate", "env_steps", "reward", "cost", "cost_se", "limit"])
        for (task_name, label), runs in curves.items():
            for seed, r in enumerate(runs):
                for k in range(len(r["reward"])):
                    writer.writerow([task_name, label, seed, k, int(r["env_steps"][k]), f"{r['reward'][k]:.6g}",
                                     f"{r['cost'][k]:.6g}", f"{r['cost_se'][k]:.4g}", r["limit"]])


def read_curves(path: Path) -> dict[tuple[str, str], list[dict[str, np.ndarray]]]:
    """The curves of a cgpo_curves*.csv, as `run` returns them."""
    rows: dict[tuple[str, str, int], list[dict[str, str]]] = {}
    with path.open() as fh:
        for row in csv.DictReader(fh):
            rows.setdefault((row["task"], row["algorithm"], int(row["seed"])), []).append(row)
    curves: dict[tuple[str, str], list[dict[str, np.ndarray]]] = {}
    for (task_name, label, _), items in rows.items():
        items.sort(key=lambda r: int(r["iterate"]))
        curve = {key: np.array([float(r[key]) for r in items]) for key in ("env_steps", "reward", "cost", "cost_se")}
        curves.setdefault((task_name, label), []).append({**curve, "limit": float(items[0]["limit"])})
    return curves


def plot(path: Path, curves) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(task for task, _ in curves))
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.5), squeeze=False)
    for col, task_name in enumerate(tasks):
        limit = next(runs[0]["limit"] for (t, _), runs in curves.items() if t == task_name)
        for (t, label), runs in curves.items():
            if t != task_name:
                continue
            steps = np.mean([r["env_steps"] for r in runs], 0)
            for row, key in enumerate(("reward", "cost")):
                values = np.array([r[key] for r in runs])
                line, = axes[row, col].plot(steps, values.mean(0), label=label)
                axes[row, col].fill_between(steps, values.mean(0) - values.std(0), values.mean(0) + values.std(0),
                                            color=line.get_color(), alpha=0.2)
        axes[1, col].axhline(limit, color="k", ls="--", lw=1)
        axes[0, col].set_title(task_name)
        axes[1, col].set_xlabel("environment steps")
        axes[0, col].legend(fontsize=7)
    axes[0, 0].set_ylabel("episode return J_R")
    axes[1, 0].set_ylabel("episode cost J_C (limit dashed)")
    fig.suptitle("Single-task learning curves: mean +- std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
