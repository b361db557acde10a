"""`safemeta` command line: one subcommand per pipeline stage.

This is the only module that touches file paths and configuration files; the algorithms
receive arrays, tasks and settings. Every output is written atomically. Errors in the config,
the task files or the task parameters end the command with one line naming the problem and
exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .atomic import atomic_path, write_text
from .config import ConfigError, config_hash, load_config, select, stage_config
from .evaluate import meta_test_exact
from .meta.safe_meta_exact import (AdaptationSettings, MetaTrainSettings, MetaTrainState, initial_state,
                                   meta_train_exact)
from .policies import TabularSoftmaxPolicy, policy_from_checkpoint
from .provenance import provenance_attrs
from .results import metatest_dataset, metatrain_dataset, write_dataset
from .tasks import Task, TaskParamError, get_distribution
from .tasks.tabular import TabularDistribution

TASKS_FORMAT = "safemeta.tasks/1"
EXACT_RETURN = "exact expected discounted return from rho (tabular, no sampling)"


class InputError(ValueError):
    """A file given on the command line is missing or malformed."""


# --------------------------------------------------------------------------- helpers
def _distribution(config: dict[str, Any], scenario: str):
    scen = select(config, "scenarios", scenario)
    try:
        return get_distribution(scen["distribution"], **scen["task_options"])
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


def _tabular(dist, scenario: str) -> TabularDistribution:
    if not isinstance(dist, TabularDistribution):
        raise ConfigError(f"config key 'scenarios.{scenario}.distribution': {dist.name!r} is not a tabular "
                          "scenario; this build runs the exact (tabular) algorithms only")
    return dist


def _adaptation(config: dict[str, Any], scenario: str) -> AdaptationSettings:
    return AdaptationSettings(**select(config, "scenarios", scenario)["adaptation"])


def _progress(prefix: str, total: int, batch: int, limits: np.ndarray, first: int):
    """Per-iteration progress line: evaluation reward, worst cost - d, switch count, time left."""
    start = time.perf_counter()

    def report(state: MetaTrainState) -> None:
        rec = state.records[-1]
        per_it = (time.perf_counter() - start) / max(state.iteration - first, 1)
        left = time.strftime("%H:%M:%S", time.gmtime(per_it * (total - state.iteration)))
        print(f"{prefix} iter {rec['iteration'] + 1:>4}/{total}  reward {np.mean(rec['reward']):9.4f}  "
              f"max(cost-d) {np.max(rec['cost'] - limits):+8.4f}  cost-step {rec['n_violating']}/{batch}  "
              f"{per_it:6.2f} s/it  left {left}", file=sys.stderr, flush=True)

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


def cmd_meta_train(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    scen = select(config, "scenarios", args.scenario)
    method = select(config, "methods", args.method)
    dist = _tabular(_distribution(config, args.scenario), args.scenario)
    tasks = _read_tasks(args.tasks, args.scenario, scen["distribution"])
    train = [dist.cmdp(t) for t in tasks["train"]]
    test = [dist.cmdp(t) for t in tasks["test"]]
    adaptation = _adaptation(config, args.scenario)
    settings = MetaTrainSettings(meta_gradient=method["meta_gradient"], **config["metatrain"])
    part = stage_config(config, "meta_train", args.scenario, args.method)
    out_dir = Path(args.out_dir)
    checkpoint = Path(args.checkpoint) if args.checkpoint else out_dir / "checkpoint.pt"
    identity = {"config": config_hash(part), "seed": args.seed, "tasks": config_hash([t.to_json() for t in tasks["train"]])}

    state = _load_checkpoint(checkpoint, identity)
    if state is None:
        state = initial_state(train[0].num_states, train[0].num_actions, args.seed)
    else:
        print(f"resuming from {checkpoint} at iteration {state.iteration}", file=sys.stderr)

    def save(st: MetaTrainState) -> None:
        with atomic_path(checkpoint) as tmp:
            torch.save({"identity": identity, "state": vars(st)}, tmp)

    limits = np.stack([m.d for m in test])
    report = _progress(f"[meta-train {args.scenario}/{args.method} seed {args.seed}]", settings.iterations,
                       settings.tasks_per_iteration, limits, state.iteration)

    def on_iteration(st: MetaTrainState) -> None:
        save(st)
        if not args.quiet:
            report(st)

    state = meta_train_exact(train, test, settings, adaptation, state, on_iteration)
    attrs = provenance_attrs(part, args.seed, stage="meta_train", scenario=args.scenario, method=args.method)
    policy = TabularSoftmaxPolicy(state.logits)
    with atomic_path(out_dir / "policy.pt") as tmp:
        torch.save({**policy.to_checkpoint(), "provenance": attrs}, tmp)
    ds = metatrain_dataset(state.records, limits, [t.params for t in tasks["test"]], attrs, EXACT_RETURN)
    write_dataset(ds, out_dir / "trace.nc")
    checkpoint.unlink(missing_ok=True)
    print(f"wrote {out_dir / 'policy.pt'} and {out_dir / 'trace.nc'}", file=sys.stderr)


def _load_checkpoint(path: Path, identity: dict[str, Any]) -> MetaTrainState | None:
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
    return MetaTrainState(**obj["state"])


def cmd_meta_test(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    scen = select(config, "scenarios", args.scenario)
    select(config, "methods", args.method)
    dist = _tabular(_distribution(config, args.scenario), args.scenario)
    tasks = _read_tasks(args.tasks, args.scenario, scen["distribution"])
    try:
        policy = policy_from_checkpoint(torch.load(args.policy, weights_only=False))
    except FileNotFoundError:
        raise InputError(f"policy file {args.policy} does not exist (run `safemeta meta-train` first)") from None
    if not isinstance(policy, TabularSoftmaxPolicy):
        raise InputError(f"policy {args.policy} is a {policy.kind} policy, not a tabular one")
    test = [dist.cmdp(t) for t in tasks["test"]]
    if policy.logits.shape != (test[0].num_states, test[0].num_actions):
        raise InputError(f"policy {args.policy} has shape {policy.logits.shape}, the tasks have "
                         f"{(test[0].num_states, test[0].num_actions)}")
    arrays = meta_test_exact(test, policy.logits, config["metatest"]["adapt_steps"],
                             _adaptation(config, args.scenario), delta=config["metatest"]["delta"])
    part = stage_config(config, "meta_test", args.scenario, args.method)
    attrs = provenance_attrs(part, args.seed, stage="meta_test", scenario=args.scenario, method=args.method)
    ds = metatest_dataset(arrays, np.stack([m.d for m in test]), [t.params for t in tasks["test"]], attrs, EXACT_RETURN)
    write_dataset(ds, args.out)
    worst = float((ds.cost - ds.limit).max())
    print(f"wrote {args.out}: {ds.sizes['task']} tasks x {ds.sizes['step']} policies; "
          f"largest cost - d over all policies {worst:+.4g}", file=sys.stderr)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safemeta", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"safemeta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    p.set_defaults(func=cmd_meta_train)

    p = sub.add_parser("meta-test", help="anytime-safety meta-test: K adaptation steps on each test task",
                       description="From the meta-policy, run metatest.adapt_steps adaptation steps (delta = "
                                   "metatest.delta) on every test task and record reward and cost of every "
                                   "policy used, k = 0 included.")
    common(p)
    p.add_argument("--tasks", required=True, help="tasks JSON written by `safemeta tasks`")
    p.add_argument("--policy", required=True, help="policy.pt written by `safemeta meta-train`")
    p.add_argument("--out", required=True, help="output trace.nc")
    p.set_defaults(func=cmd_meta_test)
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
