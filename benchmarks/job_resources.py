"""Peak memory and run time of the long jobs (meta_train, meta_test) at a config's sizes.

The numbers behind the `runtime` and `mem_mb` of profiles/slurm (table in its README). For each
scenario of the config (default config/paper.yaml) and its first method, in a temporary
directory, the real commands run: `safemeta tasks`; `safemeta meta-train` with the scenario's
metatrain settings except ITERATIONS meta-iterations (default 2); `safemeta meta-test` with
STEPS adaptation steps (default 1). Measured per command: its peak RSS, wall and CPU time
(os.wait4); from the traces: one meta-iteration without evaluation (record 1), one evaluation
(the final record, which only evaluates) and one meta-test step (sampling and computation, all
test tasks), scaled by the command's CPU/wall ratio, so a shared machine measures the seconds of
a core of its own (with --threads > 1, the seconds of that many cores). Printed per scenario, with
the full job extrapolated linearly (startup included once):

    meta_train ~ startup + iterations * iteration + (iterations // eval_every + 1) * evaluation
    meta_test  ~ startup + adapt_steps * step + evaluation of step 0

`lived` is the mean episode length of the meta-policy over the horizon (1 where episodes never
end early): where it is below 1 (hopper, humanoid fall), later policies live longer and the jobs
grow up to 1/lived times the sampling share of these numbers.

    .venv/bin/python benchmarks/job_resources.py [--config F] [--scenarios a b ...] [--threads N]

Times scale with the cores' speed; the wall/cpu column says how shared the machine was.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from safemeta.config import effective, validate_config
from safemeta.plugins import runs_on
from safemeta.results import read_dataset
from safemeta.tasks import get_distribution


def run(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{proc.stderr.read()}")
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def seconds(ds, names: tuple[str, ...], **index) -> float:
    return float(sum(ds[n].isel(**index).sum() for n in names if n in ds))


def prepare(short: dict, scenario: str, label: str, work: Path) -> tuple[list[str], list[str], Path]:
    """Write the shortened config and sample the scenario's tasks (seed 0) in `work`: the CLI
    command, its common arguments and the tasks file of the commands that follow."""
    config = work / f"{scenario}-{label}.json"
    config.write_text(json.dumps(short))
    exe = [sys.executable, "-m", "safemeta.cli"]
    common = ["--config", str(config), "--scenario", scenario, "--seed", "0"]
    tasks = work / f"{scenario}-{label}-tasks.json"
    run([*exe, "tasks", *common, "--out", str(tasks)])
    return exe, common, tasks


def measure(raw: dict, scenario: str, iterations: int, steps: int, threads: int, work: Path,
            method: str | None = None) -> dict:
    """The jobs of `method` (default: the scenario's first) on `scenario`, shortened (module docstring)."""
    full = validate_config(copy.deepcopy(raw))
    method = method or runs_on(full, "methods", scenario)[0]
    train_cfg, test_cfg = effective(full, "metatrain", scenario), effective(full, "metatest", scenario)
    short = copy.deepcopy(raw)
    scen = short["scenarios"][scenario]
    scen["metatrain"] = {**scen.get("metatrain", {}), "iterations": iterations}
    scen["metatest"] = {**scen.get("metatest", {}), "adapt_steps": steps}
    exe, common, tasks = prepare(short, scenario, method, work)
    out = work / f"{scenario}-{method}"
    train_wall, train_cpu, train_rss = run([*exe, "meta-train", *common, "--method", method, "--tasks", str(tasks),
                                 "--out-dir", str(out), "--threads", str(threads), "--quiet"])
    test_wall, test_cpu, test_rss = run([*exe, "meta-test", *common, "--method", method, "--tasks", str(tasks),
                               "--policy", str(out / "policy.pt"), "--out", str(out / "metatest.nc"),
                               "--threads", str(threads)])
    trace, test = read_dataset(out / "trace.nc"), read_dataset(out / "metatest.nc")
    # The traces time wall seconds; scaled by the command's CPU/wall ratio they are the seconds of
    # a core of its own (on a shared machine the wall times are longer).
    train_scale, test_scale = min(1.0, train_cpu / train_wall), min(1.0, test_cpu / test_wall)
    timing = ("time_sampling", "time_compute")
    iteration = train_scale * seconds(trace, timing, iteration=1) if iterations > 1 else float("nan")
    evaluation = train_scale * seconds(trace, timing, iteration=-1)
    train_start = train_scale * (train_wall - seconds(trace, timing))
    step = test_scale * seconds(test, ("time", "time_sampling"), step=-1)
    test_start = test_scale * (test_wall - seconds(test, ("time", "time_sampling")))
    n_eval = train_cfg["iterations"] // train_cfg["eval_every"] + 1
    # Episodes that end early (a fallen hopper or humanoid) grow with training: the share of the
    # horizon the early meta-policy lives is the factor by which sampling can still grow.
    scen_full = full["scenarios"][scenario]
    horizon = get_distribution(scen_full["distribution"], **scen_full["task_options"]).horizon
    steps = float(test["env_steps"].isel(step=0).sum()) if "env_steps" in test else 0.0
    lived = steps / (test.sizes["task"] * scen_full["rollouts"] * horizon) if steps else 1.0
    return {"scenario": scenario, "method": method, "train_rss": train_rss, "test_rss": test_rss, "lived": lived,
            "iteration": iteration, "evaluation": evaluation, "step": step, "load": 1 / train_scale,
            "train_full_h": (train_start + train_cfg["iterations"] * iteration + n_eval * evaluation) / 3600,
            "test_full_h": (test_start + test_cfg["adapt_steps"] * step
                            + test_scale * seconds(test, ("time_sampling",), step=0)) / 3600}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config/paper.yaml")
    parser.add_argument("--scenarios", nargs="*", help="default: every scenario of the config")
    parser.add_argument("--iterations", type=int, default=2, help="meta-iterations measured (at least 2)")
    parser.add_argument("--steps", type=int, default=1, help="meta-test adaptation steps measured")
    parser.add_argument("--threads", type=int, default=1, help="MuJoCo simulation threads (the CLI's --threads)")
    args = parser.parse_args()
    raw = yaml.safe_load(Path(args.config).read_text())
    print(f"{args.config}, --threads {args.threads}; CPU-scaled seconds per meta-iteration, evaluation, "
          "meta-test step; peak RSS in MiB; full jobs extrapolated in hours; wall/CPU of the meta-train run")
    print(f"{'scenario':<20} {'iter s':>8} {'eval s':>8} {'step s':>8} {'train MiB':>9} {'test MiB':>8} "
          f"{'train h':>8} {'test h':>7} {'lived':>6} {'wall/cpu':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in args.scenarios or list(raw["scenarios"]):
            r = measure(raw, scenario, args.iterations, args.steps, args.threads, Path(tmp))
            print(f"{r['scenario']:<20} {r['iteration']:8.2f} {r['evaluation']:8.2f} {r['step']:8.2f} "
                  f"{r['train_rss']:9.0f} {r['test_rss']:8.0f} {r['train_full_h']:8.2f} {r['test_full_h']:7.2f} "
                  f"{r['lived']:6.2f} {r['load']:8.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
