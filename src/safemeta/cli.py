"""`safemeta` command line: one subcommand per pipeline stage.

This is the only module that touches file paths and configuration files; the algorithms
receive a `Scenario`, tasks and settings, built through the registries (`plugins.py`), so
nothing here depends on which algorithm runs. Every output is written atomically. Errors in the
config, the task files or the task parameters end the command with one line naming the problem
and exit status 2.
"""
from __future__ import annotations

import argparse
import inspect
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .atomic import atomic_path, write_text
from .config import ConfigError, config_hash, effective, load_config, select, stage_config
from .devices import resolve_device
from .evaluate import meta_test, sequence_vars
from .meta.base import train
from .plugins import build_learner, build_meta_learner, build_operator, build_scenario
from .policies import TabularSoftmaxPolicy, policy_from_checkpoint
from .provenance import provenance_attrs
from .registry import kind_of
from .results import metatrain_dataset, sequence_dataset, write_dataset
from .rollout import derived_seed
from .tasks import BatchEnvError, Task, TaskParamError, distribution_class, get_distribution

TASKS_FORMAT = "safemeta.tasks/1"


class InputError(ValueError):
    """A file given on the command line is missing or malformed."""


# --------------------------------------------------------------------------- helpers
def _distribution(config: dict[str, Any], scenario: str, threads: int | None = None):
    """The scenario's task distribution; a job's --threads also sets MuJoCo's simulation threads
    (unless task_options name sim_threads), so parallel jobs do not oversubscribe the cores."""
    scen = select(config, "scenarios", scenario)
    options = dict(scen["task_options"])
    try:
        if threads and "sim_threads" not in options:
            if "sim_threads" in inspect.signature(distribution_class(scen["distribution"])).parameters:
                options["sim_threads"] = threads
        return get_distribution(scen["distribution"], **options)
    except TaskParamError as exc:
        raise ConfigError(f"config key 'scenarios.{scenario}.task_options': {exc}") from None


def _read_tasks(path: str, scenario: str, distribution: str) -> dict[str, Any]:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"tasks file {path} does not exist (run `safemeta tasks` first)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"tasks file {path} is not valid JSON: {exc}") from None
    if obj.get("format") != TASKS_FORMAT:
        raise InputError(f"tasks file {path} is not a {TASKS_FORMAT} file")
    if obj.get("scenario") != scenario or obj.get("distribution") != distribution:
        raise InputError(f"tasks file {path} holds scenario {obj.get('scenario')!r} ({obj.get('distribution')!r}), "
                         f"not {scenario!r} ({distribution!r})")
    for split in ("train", "test"):
        obj[split] = [Task.from_json(t) for t in obj[split]]
    return obj


def _progress(prefix: str, total: int, batch: int, limits: np.ndarray, first: int):
    """Per-iteration progress line: evaluation reward, worst cost - d, switch count, time left."""
    start = time.perf_counter()

    def report(state) -> None:
        rec = state.records[-1]
        per_it = (time.perf_counter() - start) / max(state.iteration - first, 1)
        left = time.strftime("%H:%M:%S", time.gmtime(per_it * (total - state.iteration)))
        if "batch_reward" in rec:  # sampled: the iteration's training tasks (adapted ones)
            where, reward, cost = "batch", rec["batch_reward"], f"max cost {np.max(rec['batch_cost']):8.3f}"
        else:                      # exact: every evaluation task
            where, reward, cost = "eval", np.mean(rec["reward"]), f"max(cost-d) {np.max(rec['cost'] - limits):+8.4f}"
        print(f"{prefix} iter {rec['iteration'] + 1:>4}/{total}  {where} reward {reward:9.4f}  {cost}  "
              f"cost-step {rec['n_violating']}/{batch}  {per_it:6.2f} s/it  left {left}", file=sys.stderr, flush=True)

    return report


# --------------------------------------------------------------------------- subcommands
def cmd_tasks(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    scen = select(config, "scenarios", args.scenario)
    dist = _distribution(config, args.scenario)
    train = dist.sample(scen["n_train_tasks"], (args.seed, 0))
    test = dist.sample(scen["n_test_tasks"], (args.seed, 1))
    part = stage_config(config, "tasks", args.scenario)
    out = {"format": TASKS_FORMAT, "scenario": args.scenario, "distribution": scen["distribution"],
           "task_options": scen["task_options"], "seed": args.seed,
           "provenance": provenance_attrs(part, args.seed, stage="tasks", scenario=args.scenario),
           "train": [t.to_json() for t in train], "test": [t.to_json() for t in test]}
    write_text(args.out, json.dumps(out, indent=1, sort_keys=True))
    print(f"wrote {len(train)} train and {len(test)} test tasks of {args.scenario} to {args.out}", file=sys.stderr)


def _device(config: dict[str, Any]) -> str:
    try:
        return resolve_device(config["device"])
    except RuntimeError as exc:
        raise ConfigError(f"config key 'device': {exc}") from None


def _limits(tasks: list[Task]) -> np.ndarray:
    return np.stack([np.asarray(t.params["d"], dtype=np.float64) for t in tasks])


def _scenario(config: dict[str, Any], args: argparse.Namespace):
    """The scenario of a job (its distribution built with the job's threads) and its task file."""
    scen = select(config, "scenarios", args.scenario)
    scenario = build_scenario(config, args.scenario, _distribution(config, args.scenario, args.threads), _device(config))
    return scenario, _read_tasks(args.tasks, args.scenario, scen["distribution"])


def cmd_meta_train(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    _set_threads(args.threads)
    select(config, "methods", args.method)
    scenario, tasks = _scenario(config, args)
    metatrain = effective(config, "metatrain", args.scenario)
    prefix = f"[meta-train {args.scenario}/{args.method} seed {args.seed}]"
    print(f"{prefix} device {scenario.device} (config device: {config['device']})", file=sys.stderr)
    learner = build_meta_learner(config, scenario, args.method, tasks["train"], tasks["test"], args.seed)
    part = stage_config(config, "meta_train", args.scenario, args.method)
    out_dir = Path(args.out_dir)
    checkpoint = Path(args.checkpoint) if args.checkpoint else out_dir / "checkpoint.pt"
    identity = {"config": config_hash(part), "seed": args.seed, "tasks": config_hash([t.to_json() for t in tasks["train"]])}

    state = _load_checkpoint(checkpoint, identity, learner.State)
    if state is None:
        state = learner.initial_state()
    else:
        print(f"{prefix} resuming from {checkpoint} at iteration {state.iteration}", file=sys.stderr)
    limits = _limits(learner.evaluation)
    report = _progress(prefix, metatrain["iterations"], metatrain["tasks_per_iteration"], limits, state.iteration)
    saved = state.iteration if checkpoint.exists() else None

    def on_iteration(st) -> None:
        nonlocal saved
        with atomic_path(checkpoint) as tmp:
            torch.save({"identity": identity, "state": vars(st)}, tmp)
        saved = st.iteration
        if not args.quiet:
            report(st)

    previous = signal.signal(signal.SIGTERM, _interrupt)  # scancel, a SLURM time limit, Snakemake's stop
    try:
        state = train(learner, state, on_iteration)
    except KeyboardInterrupt:
        held = f"{checkpoint} holds {saved} of {metatrain['iterations']} iterations" if saved else "no checkpoint yet"
        print(f"{prefix} interrupted: {held}; run the same command again to resume (a Snakemake run that was "
              "killed itself first needs `snakemake --unlock`)", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    attrs = provenance_attrs(part, args.seed, stage="meta_train", scenario=args.scenario, method=args.method)
    with atomic_path(out_dir / "policy.pt") as tmp:
        torch.save({**learner.policy(state).to_checkpoint(), "provenance": attrs}, tmp)
    ds = metatrain_dataset(state.records, limits, [t.params for t in learner.evaluation], attrs,
                           learner.adapt.return_kind(), learner.trace_vars(type(learner.adapt)))
    write_dataset(ds, out_dir / "trace.nc")
    checkpoint.unlink(missing_ok=True)
    print(f"wrote {out_dir / 'policy.pt'} and {out_dir / 'trace.nc'}", file=sys.stderr)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _load_checkpoint(path: Path, identity: dict[str, Any], state_class: type):
    if not path.exists():
        return None
    try:
        obj = torch.load(path, weights_only=False)
    except Exception as exc:  # a torn or foreign file: start over rather than fail
        print(f"ignoring unreadable checkpoint {path}: {exc}", file=sys.stderr)
        return None
    if obj.get("identity") != identity:
        print(f"ignoring checkpoint {path}: it was made with another config, seed or task set", file=sys.stderr)
        return None
    return state_class(**obj["state"])


def _read_policy(path: str, scenario, operator, tasks: list[Task]):
    """The meta-policy of policy.pt, checked against what the operator adapts on this scenario."""
    try:
        policy = policy_from_checkpoint(torch.load(path, weights_only=False))
    except FileNotFoundError:
        raise InputError(f"policy file {path} does not exist (run `safemeta meta-train` first)") from None
    kind = kind_of(type(operator), scenario.kinds)
    if kind == "exact":
        cmdp = scenario.distribution.cmdp(tasks[0])
        if not isinstance(policy, TabularSoftmaxPolicy) or policy.logits.shape != (cmdp.num_states, cmdp.num_actions):
            raise InputError(f"policy {path} ({policy.kind}) does not fit the tabular tasks of {scenario.name}")
        return policy
    if isinstance(policy, TabularSoftmaxPolicy):
        raise InputError(f"policy {path} is tabular; scenario {scenario.name} needs a neural policy")
    return policy.to(scenario.device)


def cmd_meta_test(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    _set_threads(args.threads)
    select(config, "methods", args.method)
    scenario, tasks = _scenario(config, args)
    metatest = effective(config, "metatest", args.scenario)
    operator = build_operator(config, "meta_test", scenario, args.method)
    test = tasks["test"]
    policy = _read_policy(args.policy, scenario, operator, test)
    arrays = meta_test(operator, test, policy, metatest["adapt_steps"], seed=derived_seed(args.seed, 9))
    part = stage_config(config, "meta_test", args.scenario, args.method)
    attrs = provenance_attrs(part, args.seed, stage="meta_test", scenario=args.scenario, method=args.method,
                             adapter=operator.name)
    ds = sequence_dataset(arrays, _limits(test), [t.params for t in test], attrs, operator.return_kind(),
                          sequence_vars(operator))
    write_dataset(ds, args.out)
    worst = float((ds.cost - ds.limit).max())
    print(f"wrote {args.out}: {ds.sizes['task']} tasks x {ds.sizes['step']} policies; "
          f"largest cost - d over all policies {worst:+.4g}", file=sys.stderr)


def cmd_single_task(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    _set_threads(args.threads)
    select(config, "learners", args.learner)
    scenario, tasks = _scenario(config, args)
    learner = build_learner(config, scenario, args.learner)
    trained_on = learner.tasks(tasks["test"])
    arrays = learner.run(tasks["test"], seed=derived_seed(args.seed, 13))
    part = stage_config(config, "single_task", args.scenario, args.learner)
    attrs = provenance_attrs(part, args.seed, stage="single_task", scenario=args.scenario, learner=args.learner,
                             adapter=learner.adapt.name)
    ds = sequence_dataset(arrays, _limits(trained_on), [t.params for t in trained_on], attrs,
                          learner.adapt.return_kind(), learner.trace_vars(type(learner.adapt)))
    write_dataset(ds, args.out)
    worst = float((ds.cost - ds.limit).max())
    print(f"wrote {args.out}: {ds.sizes['task']} tasks x {ds.sizes['step']} policies from scratch; "
          f"largest cost - d over all policies {worst:+.4g}", file=sys.stderr)


def _set_threads(threads: int | None) -> None:
    """One torch intra-op thread: the policies are small, and more threads only contend (measured
    7x slower on 2 busy cores). --threads goes to MuJoCo's simulation threads (_distribution)."""
    del threads
    torch.set_num_threads(1)


def cmd_aggregate(args: argparse.Namespace) -> None:
    from .provenance import code_hash
    from .results import aggregate_traces

    missing = [p for p in args.traces if not Path(p).is_file()]
    if missing:
        raise InputError(f"trace {missing[0]} does not exist ({len(missing)} of {len(args.traces)} missing)")
    try:
        summary = aggregate_traces(args.traces)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    summary.attrs.update(safemeta_version=__version__, code_hash=code_hash(), stage="aggregate",
                         created=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()))
    write_dataset(summary, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{d} {n}" for d, n in summary.sizes.items()), file=sys.stderr)


def cmd_plot(args: argparse.Namespace) -> None:
    from .plots import write_figures
    from .results import read_dataset

    if not Path(args.summary).is_file():
        raise InputError(f"summary {args.summary} does not exist (run `safemeta aggregate` first)")
    for path in write_figures(read_dataset(args.summary), args.out_dir):
        print(f"wrote {path}", file=sys.stderr)


def cmd_sg_setup(args: argparse.Namespace) -> None:
    from .tasks.sg_setup import setup

    setup(args.python, Path(args.prefix) if args.prefix else None, force=args.force)


def cmd_compare(args: argparse.Namespace) -> None:
    from .comparison import comparison_table, write_table
    from .plots import write_comparison_figure
    from .results import read_dataset

    if not Path(args.summary).is_file():
        raise InputError(f"summary {args.summary} does not exist (run `safemeta aggregate` first)")
    summary = read_dataset(args.summary)
    if "metatest_reward" not in summary:
        raise InputError(f"summary {args.summary} holds no meta-test traces to compare")
    table = comparison_table(summary)
    write_table(table, args.csv, args.html)
    print(f"wrote {args.csv}" + (f" and {args.html}" if args.html else "") + f": {len(table)} rows", file=sys.stderr)
    if args.figure:
        print(f"wrote {write_comparison_figure(summary, args.figure)}", file=sys.stderr)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safemeta", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"safemeta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def threads_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=int, help="MuJoCo simulation threads of the batched environments "
                                                   "(Snakemake passes {threads}); torch uses one thread")

    def common(p: argparse.ArgumentParser, method: bool = True) -> None:
        p.add_argument("--config", required=True,
                       help="config file (YAML/JSON) or an inline JSON object; validated, defaults filled")
        p.add_argument("--scenario", required=True, help="scenario key in the config's `scenarios`")
        if method:
            p.add_argument("--method", required=True, help="method key in the config's `methods`")
        p.add_argument("--seed", type=int, required=True, help="seed (tasks, training and evaluation draws)")

    p = sub.add_parser("tasks", help="sample the train and test tasks of a scenario",
                       description="Sample n_train_tasks and n_test_tasks of a scenario from the seed and "
                                   "write them (JSON) for the later stages.")
    common(p, method=False)
    p.add_argument("--out", required=True, help="output JSON file, e.g. results/tasks/{scenario}/seed{seed}.json")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("meta-train", help="meta-train a meta-policy (Alg. 2) on a scenario's train tasks",
                       description="Meta-train with the safe meta-gradient and the CRPO-style switch; writes "
                                   "policy.pt and trace.nc (per-iteration evaluation on the test tasks). "
                                   "Checkpoints every iteration and resumes from a matching checkpoint.")
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
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("plot", help="draw the figures (PNG) from summary.nc",
                       description="Draw metatrain.png (reward and max cost of the one-step adapted policy per "
                                   "meta-iteration), metatest.png (the same per adaptation step, limit d dashed) "
                                   "compute_time.png (normalised computation time per method) and single_task.png "
                                   "(single-task learners and meta-test curves against environment steps).")
    p.add_argument("--summary", required=True, help="summary.nc written by `safemeta aggregate`")
    p.add_argument("--out-dir", required=True, help="directory for the PNG files, e.g. results/figures")
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
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, InputError, TaskParamError, BatchEnvError) as exc:
        print(f"safemeta {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
