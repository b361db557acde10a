"""CPU hours of a config's whole grid (default config/paper.yaml), estimated from measured unit costs.

The jobs are the Snakefile's: per seed, a meta_train and a meta_test job for every (scenario,
method) pair and a single_task job for every (scenario, learner) pair (the `tasks`, aggregate and
plot jobs take seconds and are left out). Their unit costs are measured by running the real
commands at the config's sizes, shortened, in a temporary directory:

- meta_train and meta_test of (scenario, algorithm): `job_resources.measure` (ITERATIONS
  meta-iterations, STEPS adaptation steps): the CPU seconds of one meta-iteration, one evaluation,
  one meta-test step and the commands' start-up;
- single_task of (scenario, learner): LEARNER_ITERATIONS iterations on one task: the CPU seconds of
  one iteration (sampling and update) and of the initial policy's evaluation.

A job's hours are then start-up + its count of each unit x the unit's seconds (meta_train:
iterations, iterations // eval_every + 1 evaluations; meta_test: adapt_steps steps and step 0;
single_task: n_tasks x (iterations + 1)). Methods of one algorithm on a scenario (the safemeta_delta*
sweep) share safemeta's measured costs: the margin delta changes what is adapted, not the work.
Where the early policy's episodes end early (humanoid_dir's fall: `lived`, the share of the horizon
it lives, < 1), later policies live longer and the jobs grow: the measured hours are a lower bound
there and the "long" columns (the meta jobs / lived: sampling and computation both grow with the
states) the estimate with every episode as long as the horizon.

With --reference SRC (a source tree of the package, e.g. main's src/ before issue 15), every unit
is measured on that code too, concurrently with this tree's (one process each, one core each on a
machine with two or more; CPU seconds, so load matters little), and ref/this prints the ratio of
each job type's hours and of the grid's (issue 15's goal: >= 1.8).

    .venv/bin/python benchmarks/paper_cpu_hours.py [--config F] [--scenarios a b ...] [--reference SRC]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from job_resources import measure as measure_meta, prepare, run, seconds  # noqa: E402

from safemeta.config import select, validate_config  # noqa: E402
from safemeta.plugins import grid  # noqa: E402
from safemeta.results import read_dataset  # noqa: E402


def measure_learner(raw: dict, scenario: str, learner: str, iterations: int, work: Path) -> dict:
    """CPU seconds of one single_task iteration of `learner` on `scenario` (one task, `iterations`
    iterations), of the initial policy's evaluation, and of the command's start-up."""
    short = copy.deepcopy(raw)
    short["learners"][learner] = {**short["learners"][learner], "iterations": iterations, "n_tasks": 1}
    exe, common, tasks = prepare(short, scenario, learner, work)
    out = work / f"{scenario}-{learner}.nc"
    wall, cpu, _ = run([*exe, "single-task", *common, "--learner", learner, "--tasks", str(tasks),
                        "--out", str(out), "--threads", "1"])
    ds = read_dataset(out)
    scale = min(1.0, cpu / wall)
    traced = seconds(ds, ("time", "time_sampling"))
    return {"iteration": scale * seconds(ds, ("time", "time_sampling"), step=slice(1, None)) / iterations,
            "initial": scale * seconds(ds, ("time", "time_sampling"), step=0),
            "startup": scale * (wall - traced), "load": 1 / scale}


def _tree_env(src: str | None) -> dict:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src
    return env


def unit_costs(raw: dict, full: dict, scenarios: list[str], args, work: Path) -> dict:
    """Every unit cost of the grid on the importable tree (module docstring), keyed by
    ("meta", scenario, algorithm) or ("learner", scenario, learner); the commands inherit this
    process's PYTHONPATH, so they run the same tree."""
    units = {}
    for scenario, method in grid(full, "methods"):
        if scenario not in scenarios:
            continue
        key = ("meta", scenario, select(full, "methods", method)["algorithm"])
        if key not in units:
            units[key] = measure_meta(raw, scenario, args.iterations, args.steps, 1, work, method=method)
    for scenario, learner in grid(full, "learners") if args.learners else []:
        if scenario in scenarios:
            units[("learner", scenario, learner)] = measure_learner(raw, scenario, learner,
                                                                   args.learner_iterations, work)
    return units


def job_hours(full: dict, scenarios: list[str], units: dict, learners: bool = True,
              full_length: bool = False) -> dict:
    """Hours per (stage, scenario, label) summed over the config's seeds (`learners` False: the
    meta_train and meta_test jobs only; `full_length`: the meta jobs divided by `lived`, as if
    every episode lasted the horizon: sampling and computation both grow with the states)."""
    seeds = len(full["seeds"])
    hours = {}
    for scenario, method in grid(full, "methods"):
        if scenario not in scenarios:
            continue
        u = units[("meta", scenario, select(full, "methods", method)["algorithm"])]
        grow = 1.0 / u["lived"] if full_length else 1.0
        hours[("meta_train", scenario, method)] = seeds * u["train_full_h"] * grow
        hours[("meta_test", scenario, method)] = seeds * u["test_full_h"] * grow
    for scenario, learner in grid(full, "learners") if learners else []:
        if scenario not in scenarios:
            continue
        u, entry = units[("learner", scenario, learner)], select(full, "learners", learner)
        n_tasks = entry["n_tasks"] or full["scenarios"][scenario]["n_test_tasks"]
        hours[("single_task", scenario, learner)] = seeds * (
            u["startup"] + n_tasks * (u["initial"] + entry["iterations"] * u["iteration"])) / 3600
    return hours


def child(args) -> None:
    """Measure every unit on the importable tree's CLI (PYTHONPATH decides which) and print them."""
    raw = yaml.safe_load(Path(args.config).read_text())
    full = validate_config(copy.deepcopy(raw))
    scenarios = args.scenarios or list(raw["scenarios"])
    with tempfile.TemporaryDirectory() as tmp:
        units = unit_costs(raw, full, scenarios, args, Path(tmp))
    print("RESULT " + json.dumps([[list(k), v] for k, v in units.items()]), flush=True)


def run_child(args, src: str | None, config: str) -> dict:
    """The unit costs measured by a child process on tree `src` (None: this tree) with `config`."""
    cmd = [sys.executable, __file__, "--child", "--config", config, "--iterations", str(args.iterations),
           "--steps", str(args.steps), "--learner-iterations", str(args.learner_iterations)]
    if not args.learners:
        cmd.append("--no-learners")
    if args.scenarios:
        cmd += ["--scenarios", *args.scenarios]
    out = subprocess.run(cmd, env=_tree_env(src), capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"measurement on {src or 'this tree'} failed:\n{out.stderr[-3000:]}")
    return {tuple(k): v for k, v in json.loads(lines[-1][len("RESULT "):])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config/paper.yaml")
    parser.add_argument("--scenarios", nargs="*", help="default: every scenario of the config")
    parser.add_argument("--iterations", type=int, default=2, help="meta-iterations measured (at least 2)")
    parser.add_argument("--steps", type=int, default=1, help="meta-test adaptation steps measured")
    parser.add_argument("--learner-iterations", type=int, default=2, help="single-task iterations measured")
    parser.add_argument("--no-learners", dest="learners", action="store_false",
                        help="the meta_train and meta_test jobs only (no single_task)")
    parser.add_argument("--reference", help="source tree of the reference package (e.g. main's src/)")
    parser.add_argument("--reference-config", help="the reference's config (default --config; e.g. its own "
                                                   "paper.yaml where this one sets keys it does not know)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    raw = yaml.safe_load(Path(args.config).read_text())
    full = validate_config(copy.deepcopy(raw))
    scenarios = args.scenarios or list(raw["scenarios"])
    trees = [(None, args.config)] + ([(os.path.abspath(args.reference), args.reference_config or args.config)]
                                     if args.reference else [])
    with ThreadPoolExecutor(len(trees)) as pool:
        measured = list(pool.map(lambda tree: run_child(args, *tree), trees))
    this = job_hours(full, scenarios, measured[0], args.learners)
    longest = job_hours(full, scenarios, measured[0], args.learners, full_length=True)
    ref = None
    if args.reference:   # the reference's grid: the same jobs (its config may differ in keys this tree adds)
        ref_full = validate_config(copy.deepcopy(yaml.safe_load(Path(args.reference_config or args.config).read_text())))
        ref = job_hours(ref_full, scenarios, measured[1], args.learners)
        ref_longest = job_hours(ref_full, scenarios, measured[1], args.learners, full_length=True)
    print(f"{args.config}" + (f" (reference: {args.reference} with {args.reference_config or args.config})"
                               if args.reference else "") + f": {len(full['seeds'])} seeds; CPU hours of one core per (stage, scenario, label), "
          f"summed over the seeds; units measured with {args.iterations} meta-iterations, {args.steps} "
          f"meta-test step(s), {args.learner_iterations} single-task iterations; 'long': every episode of the "
          f"horizon (h / lived, where the early policy falls)")
    head = f"{'stage':<12} {'scenario':<20} {'label':<18} {'this h':>8} {'long':>8}"
    print(head + (f" {'ref h':>8} {'long':>8} {'ref/this':>8}" if ref else ""))
    rows = [(k, [k]) for k in this] + [((stage or "total", "", ""), [k for k in this if stage in (None, k[0])])
                                       for stage in ("meta_train", "meta_test", "single_task", None)]
    for key, keys in rows:
        if not keys:
            continue
        total, long = sum(this[k] for k in keys), sum(longest[k] for k in keys)
        line = f"{key[0]:<12} {key[1]:<20} {key[2]:<18} {total:8.2f} {long:8.2f}"
        if ref:
            ref_total = sum(ref[k] for k in keys)
            line += f" {ref_total:8.2f} {sum(ref_longest[k] for k in keys):8.2f} {ref_total / total:8.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
