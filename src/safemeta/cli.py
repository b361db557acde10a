"""`safemeta` command line: one subcommand per pipeline stage.

This is the only module that touches file paths and configuration files; the algorithms
receive a `Scenario`, tasks and settings, built through the registries (`plugins.py`), so
nothing here depends on which algorithm runs. Every output is written atomically (leftovers of
a torn write are removed first). Errors that come from the input (the config, the files given,
task parameters, numbers that make a run diverge or degenerate) end the command with one line
naming the problem and exit status 2; an interrupt (Ctrl-C, SIGTERM) with one line and status
130; internal errors keep their traceback.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .atomic import atomic_path, remove_leftovers, write_text
from .checks import CheckSettings, RunChecks, RunStopped
from .config import ConfigError, config_hash, effective, load_config, select, settings, stage_config
from .console import Console
from .devices import resolve_device
from .evaluate import meta_test, sequence_vars
from .inputs import (TASKS_FORMAT, InputError, check_architecture, check_policy_origin, input_identity,
                     load_policy_file, read_netcdf, read_tasks)
from .meta.base import train
from .plugins import RESULT_FREE, build_learner, build_meta_learner, build_operator, build_scenario
from .policies import TabularSoftmaxPolicy, policy_from_checkpoint
from .provenance import provenance_attrs
from .registry import kind_of
from .results import metatrain_dataset, sequence_dataset, write_dataset
from .rollout import derived_seed
from .stages import stage_code_hash
from .tasks import BatchEnvError, Task, TaskParamError, distribution_options, get_distribution

__all__ = ["InputError", "TASKS_FORMAT", "build_parser", "main"]


class Interrupted(Exception):
    """Ctrl-C or SIGTERM; the message says what was kept (exit status 130)."""


# --------------------------------------------------------------------------- helpers
def _distribution(config: dict[str, Any], scenario: str, threads: int | None = None):
    """The scenario's task distribution; a job's --threads also sets MuJoCo's simulation threads
    (unless task_options set sim_threads), so parallel jobs do not oversubscribe the cores."""
    scen = select(config, "scenarios", scenario)
    options = dict(scen["task_options"])
    try:
        if threads and options.get("sim_threads") is None and "sim_threads" in distribution_options(scen["distribution"]):
            options["sim_threads"] = threads
        return get_distribution(scen["distribution"], **options)
    except TaskParamError as exc:
        raise ConfigError(f"config key 'scenarios.{scenario}.task_options': {exc}") from None


def _console(args: argparse.Namespace) -> Console:
    try:
        return Console(args.echo_fd, args.echo_every)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _prepare(console: Console, *outputs: str | Path) -> None:
    """Remove what torn writes of the outputs left behind (a kill during a write)."""
    removed = [p for out in outputs for p in remove_leftovers(out)]
    if removed:
        console.log(f"removed {len(removed)} temporary file(s) left by an interrupted write: "
                    + ", ".join(str(p) for p in removed))


def _finite(value: float, fmt: str, missing: str) -> str:
    return format(value, fmt) if np.isfinite(value) else missing


def _progress(prefix: str, total: int, batch: int, limits: np.ndarray, first: int):
    """Per-iteration progress line: evaluation reward, worst cost - d, switch count, time left."""
    start = time.perf_counter()

    def line(state) -> str:
        rec = state.records[-1]
        per_it = (time.perf_counter() - start) / max(state.iteration - first, 1)
        left = time.strftime("%H:%M:%S", time.gmtime(per_it * (total - state.iteration)))
        if "batch_reward" in rec:  # sampled: the iteration's training tasks (adapted ones)
            cost = np.max(rec["batch_cost"])
            where = "batch"
            reward = _finite(rec["batch_reward"], "9.4f", "     none")   # none: no task adapted (all violate)
            cost = f"max cost {_finite(cost, '8.3f', '    none')}"
        else:                      # exact: every evaluation task
            where, reward = "eval", format(np.mean(rec["reward"]), "9.4f")
            cost = f"max(cost-d) {np.max(rec['cost'] - limits):+8.4f}"
        return (f"{prefix} iter {rec['iteration'] + 1:>4}/{total}  {where} reward {reward}  {cost}  "
                f"cost-step {rec['n_violating']}/{batch}  {per_it:6.2f} s/it  left {left}")

    return line


def _task_progress(prefix: str, tasks: list[Task], what: str):
    """Per-task progress line of a meta-test or single-task run: worst cost - d over its steps."""
    start = time.perf_counter()

    def line(j: int, seq: dict[str, np.ndarray]) -> str:
        per_task = (time.perf_counter() - start) / (j + 1)
        left = time.strftime("%H:%M:%S", time.gmtime(per_task * (len(tasks) - j - 1)))
        worst = float(np.max(seq["cost"] - np.asarray(tasks[j].params["d"], dtype=np.float64)))
        return (f"{prefix} task {j + 1:>3}/{len(tasks)}  {what} reward {float(seq['reward'][-1]):9.4f}  "
                f"max(cost-d) over steps {worst:+8.4f}  {per_task:6.2f} s/task  left {left}")

    return line


def _inputs(tasks: dict[str, Any], **more: dict[str, Any]) -> dict[str, Any]:
    """Provenance of the inputs: the tasks file's identity (hashed as written: tasks as JSON), and more."""
    written = {**tasks, **{split: [t.to_json() for t in tasks[split]] for split in ("train", "test")}}
    return {"tasks": input_identity(written), **more}


# --------------------------------------------------------------------------- subcommands
def cmd_tasks(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    console = _console(args)
    _prepare(console, args.out)
    scen = select(config, "scenarios", args.scenario)
    dist = _distribution(config, args.scenario)
    train = dist.sample(scen["n_train_tasks"], (args.seed, 0))
    test = dist.sample(scen["n_test_tasks"], (args.seed, 1))
    part = stage_config(config, "tasks", args.scenario)
    out = {"format": TASKS_FORMAT, "scenario": args.scenario, "distribution": scen["distribution"],
           "task_options": scen["task_options"], "seed": args.seed,
           "provenance": provenance_attrs(part, args.seed, stage="tasks", scenario=args.scenario,
                                          stage_code_hash=stage_code_hash(config, "tasks", args.scenario)),
           "train": [t.to_json() for t in train], "test": [t.to_json() for t in test]}
    write_text(args.out, json.dumps(out, indent=1, sort_keys=True))
    console.say(f"wrote {len(train)} train and {len(test)} test tasks of {args.scenario} to {args.out}")


def _device(config: dict[str, Any]) -> str:
    try:
        return resolve_device(config["device"])
    except RuntimeError as exc:
        raise ConfigError(f"config key 'device': {exc}") from None


def _limits(tasks: list[Task]) -> np.ndarray:
    return np.stack([np.asarray(t.params["d"], dtype=np.float64) for t in tasks])


def _scenario(config: dict[str, Any], args: argparse.Namespace):
    """The scenario of a job (its distribution built with the job's threads) and its task file,
    checked against the config and the command's seed."""
    distribution = _distribution(config, args.scenario, args.threads)
    scenario = build_scenario(config, args.scenario, distribution, _device(config))
    return scenario, read_tasks(args.tasks, config, args.scenario, args.seed, distribution)


def _identity(part: dict[str, Any], config: dict[str, Any], args: argparse.Namespace, train: list[Task]) -> dict[str, Any]:
    """What a checkpoint must have been made with to be resumed: the config part (less the
    sections that change no result), the seed, the train tasks and the code of the stage."""
    return {"config": config_hash({k: v for k, v in part.items() if k not in RESULT_FREE}), "seed": args.seed,
            "tasks": config_hash([t.to_json() for t in train]),
            "code": stage_code_hash(config, "meta_train", args.scenario, args.method)}


def cmd_meta_train(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    console = _console(args)
    _set_threads(args.threads)
    select(config, "methods", args.method)
    scenario, tasks = _scenario(config, args)
    metatrain = effective(config, "metatrain", args.scenario)
    prefix = f"[meta-train {args.scenario}/{args.method} seed {args.seed}]"
    console.log(f"{prefix} device {scenario.device} (config device: {config['device']})")
    learner = build_meta_learner(config, scenario, args.method, tasks["train"], tasks["test"], args.seed)
    part = stage_config(config, "meta_train", args.scenario, args.method)
    out_dir = Path(args.out_dir)
    checkpoint = Path(args.checkpoint) if args.checkpoint else out_dir / "checkpoint.pt"
    _prepare(console, checkpoint, out_dir / "policy.pt", out_dir / "trace.nc")
    identity = _identity(part, config, args, tasks["train"])

    state = _load_checkpoint(console, checkpoint, identity, learner.State)
    if state is None:
        state = learner.initial_state()
    else:
        console.say(f"{prefix} resuming from {checkpoint} at iteration {state.iteration}")
    limits = _limits(learner.evaluation)
    progress = _progress(prefix, metatrain["iterations"], metatrain["tasks_per_iteration"], limits, state.iteration)
    checks = RunChecks(settings(CheckSettings, config["checks"]), prefix, limits)
    checks.replay(state.records)   # a resumed run is judged as the uninterrupted one
    saved = state.iteration if checkpoint.exists() else 0

    def on_iteration(st) -> None:
        nonlocal saved
        with atomic_path(checkpoint) as tmp:
            torch.save({"identity": identity, "state": vars(st)}, tmp)
        saved = st.iteration
        if not args.quiet:
            console.progress(progress(st))
        for warning in checks.observe(st.records[-1]):
            console.say(warning)

    try:
        state = train(learner, state, on_iteration)
    except KeyboardInterrupt:
        kept = f"{checkpoint} holds {saved} of {metatrain['iterations']} iterations" if saved else "no checkpoint yet"
        raise Interrupted(f"{kept}; run the same command again to resume (a Snakemake run that was killed "
                          "itself first needs `snakemake --unlock`)") from None
    attrs = provenance_attrs(part, args.seed, _inputs(tasks), stage="meta_train", scenario=args.scenario,
                             method=args.method, stage_code_hash=identity["code"])
    with atomic_path(out_dir / "policy.pt") as tmp:
        torch.save({**learner.policy(state).to_checkpoint(), "provenance": attrs}, tmp)
    ds = metatrain_dataset(state.records, limits, [t.params for t in learner.evaluation], attrs,
                           learner.adapt.return_kind(), learner.trace_vars(type(learner.adapt)))
    write_dataset(ds, out_dir / "trace.nc")
    checkpoint.unlink(missing_ok=True)
    console.say(f"wrote {out_dir / 'policy.pt'} and {out_dir / 'trace.nc'}")


_IDENTITY_PARTS = {"config": "another config", "seed": "another seed", "tasks": "other train tasks",
                   "code": "other code (the stage's code hash differs: the package was edited)"}


def _load_checkpoint(console: Console, path: Path, identity: dict[str, Any], state_class: type):
    if not path.exists():
        return None
    try:
        obj = torch.load(path, weights_only=False)
        made = obj["identity"]
    except Exception as exc:  # a torn or foreign file: start over rather than fail
        console.say(f"ignoring unreadable checkpoint {path} ({type(exc).__name__}); starting over")
        return None
    differ = [_IDENTITY_PARTS[k] for k in identity if not isinstance(made, dict) or made.get(k) != identity[k]]
    if differ:
        console.say(f"ignoring checkpoint {path}: it was made with {', '.join(differ)}; starting over")
        return None
    return state_class(**obj["state"])


def _read_policy(path: str, scenario, operator, tasks: list[Task], config: dict[str, Any], args: argparse.Namespace):
    """The meta-policy of policy.pt, checked against the command and the form of policy the
    config gives the scenario; and the file's identity for provenance."""
    obj = load_policy_file(path)
    check_policy_origin(path, obj, config, args.scenario, args.method, args.seed)
    try:
        policy = policy_from_checkpoint(obj)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"policy file {path} is not a safemeta policy: {reason:.200}") from None
    kind = kind_of(type(operator), scenario.kinds)
    expected = scenario.fresh_policy(tasks[0], 0, kind)
    identity = input_identity(obj)
    if kind == "exact":
        if not isinstance(policy, TabularSoftmaxPolicy):
            raise InputError(f"policy file {path} holds a {policy.kind} policy; the exact scenario {scenario.name} "
                             f"needs a tabular one")
        if policy.logits.shape != expected.logits.shape:
            raise InputError(f"policy file {path} is a tabular policy of {policy.logits.shape[0]} states x "
                             f"{policy.logits.shape[1]} actions; the tasks of {scenario.name} have "
                             f"{expected.logits.shape[0]} x {expected.logits.shape[1]}")
        return policy, identity
    if isinstance(policy, TabularSoftmaxPolicy):
        raise InputError(f"policy file {path} is tabular; scenario {scenario.name} needs a neural policy")
    check_architecture(path, policy, expected, scenario.name)
    return policy.to(scenario.device), {**identity, "architecture": policy.config}


def cmd_meta_test(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    console = _console(args)
    _set_threads(args.threads)
    select(config, "methods", args.method)
    _prepare(console, args.out)
    scenario, tasks = _scenario(config, args)
    metatest = effective(config, "metatest", args.scenario)
    operator = build_operator(config, "meta_test", scenario, args.method)
    test = tasks["test"]
    policy, policy_identity = _read_policy(args.policy, scenario, operator, test, config, args)
    prefix = f"[meta-test {args.scenario}/{args.method} seed {args.seed}]"
    progress = _task_progress(prefix, test, f"k={metatest['adapt_steps']}")
    arrays = _interruptible(lambda: meta_test(operator, test, policy, metatest["adapt_steps"],
                                              seed=derived_seed(args.seed, 9),
                                              on_task=lambda j, seq: console.progress(progress(j, seq))))
    part = stage_config(config, "meta_test", args.scenario, args.method)
    attrs = provenance_attrs(part, args.seed, _inputs(tasks, policy=policy_identity), stage="meta_test",
                             scenario=args.scenario, method=args.method, adapter=operator.name,
                             stage_code_hash=stage_code_hash(config, "meta_test", args.scenario, args.method))
    ds = sequence_dataset(arrays, _limits(test), [t.params for t in test], attrs, operator.return_kind(),
                          sequence_vars(operator))
    write_dataset(ds, args.out)
    worst = float((ds.cost - ds.limit).max())
    console.say(f"wrote {args.out}: {ds.sizes['task']} tasks x {ds.sizes['step']} policies; "
                f"largest cost - d over all policies {worst:+.4g}")


def cmd_single_task(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    console = _console(args)
    _set_threads(args.threads)
    select(config, "learners", args.learner)
    _prepare(console, args.out)
    scenario, tasks = _scenario(config, args)
    learner = build_learner(config, scenario, args.learner)
    trained_on = learner.tasks(tasks["test"])
    prefix = f"[single-task {args.scenario}/{args.learner} seed {args.seed}]"
    progress = _task_progress(prefix, trained_on, f"k={learner.settings.iterations}")
    arrays = _interruptible(lambda: learner.run(tasks["test"], seed=derived_seed(args.seed, 13),
                                                on_task=lambda j, seq: console.progress(progress(j, seq))))
    part = stage_config(config, "single_task", args.scenario, args.learner)
    attrs = provenance_attrs(part, args.seed, _inputs(tasks), stage="single_task", scenario=args.scenario,
                             learner=args.learner, adapter=learner.adapt.name,
                             stage_code_hash=stage_code_hash(config, "single_task", args.scenario, args.learner))
    ds = sequence_dataset(arrays, _limits(trained_on), [t.params for t in trained_on], attrs,
                          learner.adapt.return_kind(), learner.trace_vars(type(learner.adapt)))
    write_dataset(ds, args.out)
    worst = float((ds.cost - ds.limit).max())
    console.say(f"wrote {args.out}: {ds.sizes['task']} tasks x {ds.sizes['step']} policies from scratch; "
                f"largest cost - d over all policies {worst:+.4g}")


def _interruptible(run):
    try:
        return run()
    except KeyboardInterrupt:
        raise Interrupted("nothing written (this stage keeps no checkpoint); run the same command again") from None


def _set_threads(threads: int | None) -> None:
    """One torch intra-op thread: the policies are small, and more threads only contend (measured
    7x slower on 2 busy cores). --threads goes to MuJoCo's simulation threads (_distribution)."""
    del threads
    torch.set_num_threads(1)


def cmd_aggregate(args: argparse.Namespace) -> None:
    from .provenance import code_hash
    from .results import aggregate_traces

    console = _console(args)
    _prepare(console, args.out)
    missing = [p for p in args.traces if not Path(p).is_file()]
    if missing:
        raise InputError(f"trace {missing[0]} does not exist ({len(missing)} of {len(args.traces)} missing)")
    try:
        summary = aggregate_traces(args.traces)
    except OSError as exc:     # a torn or foreign netCDF file (HDF error)
        raise InputError(f"trace {exc.filename or '?'} is not a readable netCDF file ({exc.strerror or exc}); "
                         f"rerun the stage that wrote it") from None
    except ValueError as exc:
        raise InputError(str(exc)) from None
    summary.attrs.update(safemeta_version=__version__, code_hash=code_hash(), stage="aggregate",
                         created=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()))
    write_dataset(summary, args.out)
    console.say(f"wrote {args.out}: " + ", ".join(f"{d} {n}" for d, n in summary.sizes.items()))


def cmd_plot(args: argparse.Namespace) -> None:
    from .plots import FIGURES, write_figures

    console = _console(args)
    _prepare(console, *(Path(args.out_dir) / f"{name}.png" for name in FIGURES))
    summary = read_netcdf(args.summary, "summary", "safemeta aggregate")
    for path in write_figures(summary, args.out_dir):
        console.say(f"wrote {path}")


def cmd_sg_setup(args: argparse.Namespace) -> None:
    from .tasks.sg_setup import setup

    setup(args.python, Path(args.prefix) if args.prefix else None, force=args.force)


def cmd_compare(args: argparse.Namespace) -> None:
    from .comparison import comparison_table, write_table
    from .plots import write_comparison_figure

    console = _console(args)
    _prepare(console, *(p for p in (args.csv, args.html, args.figure) if p))
    summary = read_netcdf(args.summary, "summary", "safemeta aggregate")
    if "metatest_reward" not in summary:
        raise InputError(f"summary {args.summary} holds no meta-test traces to compare")
    table = comparison_table(summary)
    write_table(table, args.csv, args.html)
    console.say(f"wrote {args.csv}" + (f" and {args.html}" if args.html else "") + f": {len(table)} rows")
    if args.figure:
        console.say(f"wrote {write_comparison_figure(summary, args.figure)}")


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safemeta", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"safemeta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def threads_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=int, help="MuJoCo simulation threads of the batched environments "
                                                   "(Snakemake passes {threads}); torch uses one thread")

    def echo_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--echo-fd", type=int, metavar="FD",
                       help="also write results, warnings and progress lines (at most one per --echo-every "
                            "seconds) to this open file descriptor; the workflow passes its terminal as 3")
        p.add_argument("--echo-every", type=float, default=30.0, metavar="SECONDS",
                       help="seconds between progress lines on --echo-fd (default 30)")

    def common(p: argparse.ArgumentParser, method: bool = True) -> None:
        p.add_argument("--config", required=True,
                       help="config file (YAML/JSON) or an inline JSON object; validated, defaults filled")
        p.add_argument("--scenario", required=True, help="scenario key in the config's `scenarios`")
        if method:
            p.add_argument("--method", required=True, help="method key in the config's `methods`")
        p.add_argument("--seed", type=int, required=True, help="seed (tasks, training and evaluation draws)")
        echo_options(p)

    p = sub.add_parser("tasks", help="sample the train and test tasks of a scenario",
                       description="Sample n_train_tasks and n_test_tasks of a scenario from the seed and "
                                   "write them (JSON) for the later stages.")
    common(p, method=False)
    p.add_argument("--out", required=True, help="output JSON file, e.g. results/tasks/{scenario}/seed{seed}.json")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("meta-train", help="meta-train a meta-policy (Alg. 2) on a scenario's train tasks",
                       description="Meta-train with the safe meta-gradient and the CRPO-style switch; writes "
                                   "policy.pt and trace.nc (per-iteration evaluation on the test tasks). "
                                   "Checkpoints every iteration and resumes from a checkpoint made with the same "
                                   "config, seed, tasks and code. Stops a degenerate run and warns about a stalled "
                                   "one (config section `checks`).")
    common(p)
    p.add_argument("--tasks", required=True, help="tasks JSON written by `safemeta tasks`")
    p.add_argument("--out-dir", required=True, help="directory for policy.pt and trace.nc")
    p.add_argument("--checkpoint", help="resume checkpoint (default: OUT_DIR/checkpoint.pt); removed on success")
    p.add_argument("--quiet", action="store_true", help="no per-iteration progress lines")
    threads_option(p)
    p.set_defaults(func=cmd_meta_train)

    p = sub.add_parser("meta-test", help="anytime-safety meta-test: K adaptation steps on each test task",
                       description="From the meta-policy, run metatest.adapt_steps steps of the method's "
                                   "operator (or metatest.adapter; delta = metatest.delta) on every test task "
                                   "and record reward and cost of every policy used, k = 0 included.")
    common(p)
    p.add_argument("--tasks", required=True, help="tasks JSON written by `safemeta tasks`")
    p.add_argument("--policy", required=True, help="policy.pt written by `safemeta meta-train`")
    p.add_argument("--out", required=True, help="output trace.nc")
    threads_option(p)
    p.set_defaults(func=cmd_meta_test)

    p = sub.add_parser("single-task", help="train a single-task learner from scratch on each test task",
                       description="From a fresh policy, run the learner (its operator repeated `iterations` "
                                   "times) on the first n_tasks test tasks and record reward and cost of every "
                                   "policy, as a meta-test records them.")
    common(p, method=False)
    p.add_argument("--learner", required=True, help="learner key in the config's `learners`")
    p.add_argument("--tasks", required=True, help="tasks JSON written by `safemeta tasks`")
    p.add_argument("--out", required=True, help="output trace.nc")
    threads_option(p)
    p.set_defaults(func=cmd_single_task)

    p = sub.add_parser("aggregate", help="merge meta-train and meta-test traces into summary.nc",
                       description="Merge trace.nc files into one dataset with dims (scenario, method_name or "
                                   "learner, seed, task, iteration / step / single_step, constraint); labels come "
                                   "from each trace's provenance attributes. Scenarios of different sizes are "
                                   "padded with NaN.")
    p.add_argument("traces", nargs="+", help="trace.nc files written by `safemeta meta-train` / `meta-test` / "
                                             "`single-task`")
    p.add_argument("--out", required=True, help="output netCDF file, e.g. results/summary.nc")
    echo_options(p)
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("plot", help="draw the figures (PNG) from summary.nc",
                       description="Draw metatrain.png (reward and max cost of the one-step adapted policy per "
                                   "meta-iteration), metatest.png (the same per adaptation step, limit d dashed) "
                                   "compute_time.png (normalised computation time per method) and single_task.png "
                                   "(single-task learners and meta-test curves against environment steps).")
    p.add_argument("--summary", required=True, help="summary.nc written by `safemeta aggregate`")
    p.add_argument("--out-dir", required=True, help="directory for the PNG files, e.g. results/figures")
    echo_options(p)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("sg-setup", help="build the Python 3.10 Safety-Gymnasium worker environment (sg_* scenarios)",
                       description="Create a Python 3.10 virtual environment with the pinned safety-gymnasium 1.0.0 "
                                   "stack (src/safemeta/tasks/assets/sg-worker.lock) and check that its worker builds "
                                   "each navigation task. Does nothing if an up-to-date build exists.")
    p.add_argument("--python", help="Python 3.10 interpreter (default: python3.10 on PATH, else pyenv's 3.10.*)")
    p.add_argument("--prefix", help="where to build it (default: $SAFEMETA_SG_ENV, else "
                                    "~/.cache/safemeta/sg-worker-<lock hash>); other places need SAFEMETA_SG_ENV later")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    p.set_defaults(func=cmd_sg_setup)

    p = sub.add_parser("compare", help="the side-by-side comparison of the methods (table and figure) from summary.nc",
                       description="Per scenario and method: final meta-test reward (mean, SE over seeds) and its "
                                   "ratio to the best baseline, meta-test steps whose max cost exceeds d and d + 2 SE, "
                                   "median computation times and their ratios to Meta-CPO (CSV, and HTML for the "
                                   "report); and comparison.png in the paper's Fig. 1/4 layout.")
    p.add_argument("--summary", required=True, help="summary.nc written by `safemeta aggregate`")
    p.add_argument("--csv", required=True, help="output table, e.g. results/comparison.csv")
    p.add_argument("--html", help="the same table as an HTML page (the report shows it)")
    p.add_argument("--figure", help="output PNG, e.g. results/figures/comparison.png")
    echo_options(p)
    p.set_defaults(func=cmd_compare)
    return parser


# Errors that come from the input: one line, exit status 2. FloatingPointError: a run that
# diverged under its settings (the message names the iteration and the quantity).
INPUT_ERRORS = (ConfigError, InputError, TaskParamError, BatchEnvError, RunStopped, FloatingPointError)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt   # SIGTERM (Snakemake stopping a job, scancel, a time limit) as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        args.func(args)
    except INPUT_ERRORS as exc:
        print(f"safemeta {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as exc:
        print(f"safemeta {args.command}: interrupted" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
