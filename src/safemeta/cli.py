"""`safemeta` command line: one subcommand per pipeline stage.

This is the only module that touches file paths and configuration files; the algorithms
receive arrays, tasks and settings. Every output is written atomically. Errors in the config,
the task files or the task parameters end the command with one line naming the problem and
exit status 2.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__
from .atomic import atomic_path, write_text
from .config import ConfigError, config_hash, effective, load_config, select, settings_from, stage_config
from .devices import resolve_device
from .adaptation.dual_pgd import SampledAdaptationSettings
from .evaluate import meta_test_exact, meta_test_sampled
from .meta.safe_meta import (SampledMetaTrainSettings, SampledMetaTrainState, SamplingSettings, derived_seed,
                             initial_sampled_state, meta_train_sampled)
from .meta.safe_meta_exact import (AdaptationSettings, MetaTrainSettings, MetaTrainState, initial_state,
                                   meta_train_exact)
from .policies import TabularSoftmaxPolicy, policy_from_checkpoint
from .provenance import provenance_attrs
from .results import metatest_dataset, metatrain_dataset, write_dataset
from .tasks import Task, TaskParamError, distribution_class, get_distribution
from .tasks.tabular import TabularDistribution

TASKS_FORMAT = "safemeta.tasks/1"
EXACT_RETURN = "exact expected discounted return from rho (tabular, no sampling)"


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


@dataclass
class _Runner:
    """What meta-train needs from an algorithm family (exact tabular or sampled)."""

    state_class: type
    fresh_state: Callable[[], Any]
    run: Callable[[Any, Callable[[Any], None]], Any]
    policy_checkpoint: Callable[[Any], dict[str, Any]]
    evaluation: list[Task]
    return_kind: str


def _exact_runner(dist, tasks, scen, method, metatrain, seed) -> _Runner:
    train = [dist.cmdp(t) for t in tasks["train"]]
    test = [dist.cmdp(t) for t in tasks["test"]]
    settings = settings_from(MetaTrainSettings, metatrain, meta_gradient=method["meta_gradient"])
    adaptation = settings_from(AdaptationSettings, scen["adaptation"])
    return _Runner(MetaTrainState, lambda: initial_state(train[0].num_states, train[0].num_actions, seed),
                   lambda state, hook: meta_train_exact(train, test, settings, adaptation, state, hook),
                   lambda state: TabularSoftmaxPolicy(state.logits).to_checkpoint(), tasks["test"], EXACT_RETURN)


def _sampled_runner(dist, tasks, scen, metatrain, seed, device) -> _Runner:
    settings = settings_from(SampledMetaTrainSettings, metatrain)
    adaptation = settings_from(SampledAdaptationSettings, scen["adaptation"])
    sampling = settings_from(SamplingSettings, scen)
    evaluation = tasks["test"][: metatrain["eval_tasks"] or len(tasks["test"])]
    return _Runner(SampledMetaTrainState, lambda: initial_sampled_state(dist, tasks["train"][0], scen["policy"], seed),
                   lambda state, hook: meta_train_sampled(dist, tasks["train"], evaluation, state, settings, adaptation,
                                                          sampling, seed, device, hook),
                   lambda state: state.policy, evaluation, _sampled_return(sampling))


def _sampled_return(sampling: SamplingSettings) -> str:
    return (f"mean undiscounted episode return over {sampling.rollouts} rollouts; cost is the constrained J_c, "
            f"the mean of sum_t {sampling.constraint_gamma:g}^t c_t")


def _limits(tasks: list[Task]) -> np.ndarray:
    return np.stack([np.asarray(t.params["d"], dtype=np.float64) for t in tasks])


def cmd_meta_train(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    device = _device(config)
    _set_threads(args.threads)
    scen = select(config, "scenarios", args.scenario)
    method = select(config, "methods", args.method)
    dist = _distribution(config, args.scenario, args.threads)
    tasks = _read_tasks(args.tasks, args.scenario, scen["distribution"])
    metatrain = effective(config, "metatrain", args.scenario)
    prefix = f"[meta-train {args.scenario}/{args.method} seed {args.seed}]"
    print(f"{prefix} device {device} (config device: {config['device']})", file=sys.stderr)
    if isinstance(dist, TabularDistribution):
        runner = _exact_runner(dist, tasks, scen, method, metatrain, args.seed)
    else:
        runner = _sampled_runner(dist, tasks, scen, metatrain, args.seed, device)
    part = stage_config(config, "meta_train", args.scenario, args.method)
    out_dir = Path(args.out_dir)
    checkpoint = Path(args.checkpoint) if args.checkpoint else out_dir / "checkpoint.pt"
    identity = {"config": config_hash(part), "seed": args.seed, "tasks": config_hash([t.to_json() for t in tasks["train"]])}

    state = _load_checkpoint(checkpoint, identity, runner.state_class)
    if state is None:
        state = runner.fresh_state()
    else:
        print(f"{prefix} resuming from {checkpoint} at iteration {state.iteration}", file=sys.stderr)
    limits = _limits(runner.evaluation)
    report = _progress(prefix, metatrain["iterations"], metatrain["tasks_per_iteration"], limits, state.iteration)

    def on_iteration(st) -> None:
        with atomic_path(checkpoint) as tmp:
            torch.save({"identity": identity, "state": vars(st)}, tmp)
        if not args.quiet:
            report(st)

    state = runner.run(state, on_iteration)
    attrs = provenance_attrs(part, args.seed, stage="meta_train", scenario=args.scenario, method=args.method)
    with atomic_path(out_dir / "policy.pt") as tmp:
        torch.save({**runner.policy_checkpoint(state), "provenance": attrs}, tmp)
    ds = metatrain_dataset(state.records, limits, [t.params for t in runner.evaluation], attrs, runner.return_kind)
    write_dataset(ds, out_dir / "trace.nc")
    checkpoint.unlink(missing_ok=True)
    print(f"wrote {out_dir / 'policy.pt'} and {out_dir / 'trace.nc'}", file=sys.stderr)


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


def cmd_meta_test(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    device = _device(config)
    _set_threads(args.threads)
    scen = select(config, "scenarios", args.scenario)
    select(config, "methods", args.method)
    dist = _distribution(config, args.scenario, args.threads)
    tasks = _read_tasks(args.tasks, args.scenario, scen["distribution"])
    metatest = effective(config, "metatest", args.scenario)
    try:
        policy = policy_from_checkpoint(torch.load(args.policy, weights_only=False))
    except FileNotFoundError:
        raise InputError(f"policy file {args.policy} does not exist (run `safemeta meta-train` first)") from None
    test = tasks["test"]
    if isinstance(dist, TabularDistribution):
        cmdps = [dist.cmdp(t) for t in test]
        if not isinstance(policy, TabularSoftmaxPolicy) or policy.logits.shape != (cmdps[0].num_states, cmdps[0].num_actions):
            raise InputError(f"policy {args.policy} ({policy.kind}) does not fit the tabular tasks of {args.scenario}")
        arrays = meta_test_exact(cmdps, policy.logits, metatest["adapt_steps"],
                                 settings_from(AdaptationSettings, scen["adaptation"]), delta=metatest["delta"])
        return_kind = EXACT_RETURN
    else:
        if isinstance(policy, TabularSoftmaxPolicy):
            raise InputError(f"policy {args.policy} is tabular; scenario {args.scenario} needs a neural policy")
        sampling = settings_from(SamplingSettings, scen)
        arrays = meta_test_sampled(dist, test, policy.to(device), metatest["adapt_steps"],
                                   settings_from(SampledAdaptationSettings, scen["adaptation"]), sampling,
                                   seed=derived_seed(args.seed, 9), delta=metatest["delta"], device=device)
        return_kind = _sampled_return(sampling)
    part = stage_config(config, "meta_test", args.scenario, args.method)
    attrs = provenance_attrs(part, args.seed, stage="meta_test", scenario=args.scenario, method=args.method)
    ds = metatest_dataset(arrays, _limits(test), [t.params for t in test], attrs, return_kind)
    write_dataset(ds, args.out)
    worst = float((ds.cost - ds.limit).max())
    print(f"wrote {args.out}: {ds.sizes['task']} tasks x {ds.sizes['step']} policies; "
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
                       description="From the meta-policy, run metatest.adapt_steps adaptation steps (delta = "
                                   "metatest.delta) on every test task and record reward and cost of every "
                                   "policy used, k = 0 included.")
    common(p)
    p.add_argument("--tasks", required=True, help="tasks JSON written by `safemeta tasks`")
    p.add_argument("--policy", required=True, help="policy.pt written by `safemeta meta-train`")
    p.add_argument("--out", required=True, help="output trace.nc")
    threads_option(p)
    p.set_defaults(func=cmd_meta_test)

    p = sub.add_parser("aggregate", help="merge meta-train and meta-test traces into summary.nc",
                       description="Merge trace.nc files into one dataset with dims (scenario, method, seed, "
                                   "task, iteration / step, constraint); labels come from each trace's "
                                   "provenance attributes. Scenarios of different sizes are padded with NaN.")
    p.add_argument("traces", nargs="+", help="trace.nc files written by `safemeta meta-train` / `meta-test`")
    p.add_argument("--out", required=True, help="output netCDF file, e.g. results/summary.nc")
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("plot", help="draw the figures (PNG) from summary.nc",
                       description="Draw metatrain.png (reward and max cost of the one-step adapted policy per "
                                   "meta-iteration), metatest.png (the same per adaptation step, limit d dashed) "
                                   "and compute_time.png (normalised computation time per method).")
    p.add_argument("--summary", required=True, help="summary.nc written by `safemeta aggregate`")
    p.add_argument("--out-dir", required=True, help="directory for the PNG files, e.g. results/figures")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, InputError, TaskParamError) as exc:
        print(f"safemeta {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
