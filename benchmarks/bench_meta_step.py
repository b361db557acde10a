"""Computation of one paper-size meta-iteration of Alg. 4, against a plain TRPO step on the same batch.

Per scenario, at App. D.2's sizes (10 tasks per iteration, 40 x 200 or 10 x 500 rollouts per
policy, config/paper.yaml's cg_iters 20, max_kl 1e-3, cg_damping 0.1): one meta-iteration runs
once with real sampling while every rollout is recorded; then the same iteration, from the same
state, is timed with the recorded rollouts replayed (identical samples, no simulation), so only
its computation is measured (median of --repeats; CPU seconds of this process, so a shared
machine's load matters little; one torch thread, as the jobs):
- iteration: everything Alg. 4 computes in an iteration: the 10 adaptations A^s (lines 5: CG
  solves, the dual, the KL bisection), the meta-gradient surrogates (line 7) and the TRPO
  meta-step (lines 8/12);
- adapt: the adaptations' part of it; meta-step: the TRPO meta-step's part (lines 8/12);
- plain: one TRPO step on the policy-gradient surrogate of the same meta-policy samples (every
  task's batch, weights 1/10 each), with the same Fisher-vector product, cg_iters, damping and
  radius: the reference of the paper's claim that the meta-gradient costs about what a policy
  gradient does (goal: meta-step/plain <= 1.3);
- maml: MAML + penalty's outer TRPO step (baseline (a)) on the same batches (inner = each task's
  meta batch, outer = its adapted batch): second-order meta-gradient, re-adapting at each
  line-search candidate; maml/meta is what the Hessian-free meta-gradient saves.
Every task is made feasible (cost_limit 1e6), so every task adapts and contributes the
meta-gradient, the costliest branch. humanoid_dir runs without its fall termination, so every
episode has the full horizon (the initial policy falls after about 20 steps; the computation
depends on the number of states). `states` is the number of meta-policy states (the Fisher's).

With --reference SRC (a source tree of the package, e.g. main's src/), each scenario is measured
on that code and on this one, one subprocess each, interleaved, and ref/this prints the ratio of
the iteration's computation (issue 15's goal: >= 3 against main).

    .venv/bin/python benchmarks/bench_meta_step.py [--scenarios a b ...] [--reference /path/to/main/src]
    .venv/bin/python benchmarks/bench_meta_step.py --quick            # quarter horizons, 4 tasks
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

SCENARIOS = {  # name -> (rollouts, horizon): App. D.2 sizes
    "half_cheetah_vel": (40, 200), "hopper_vel": (40, 200), "swimmer_vel": (40, 200), "humanoid_dir": (40, 200),
    "point_circle": (10, 500), "car_circle_hazard": (10, 500), "point_button": (10, 500),
}


class Recorder:
    """Wraps a Scenario's rollouts: records every Batch by seed, or replays the recorded ones."""

    FIELDS = ("obs", "actions", "log_prob", "reward", "cost", "alive")

    def __init__(self, scenario) -> None:
        self.scenario, self.store, self.replay = scenario, {}, False
        self._rollout, self._rollout_tasks = scenario.rollout, getattr(scenario, "rollout_tasks", None)
        scenario.rollout = self.rollout
        if self._rollout_tasks is not None:
            scenario.rollout_tasks = self.rollout_tasks

    def _fresh(self, seed):
        from safemeta.rollout import Batch

        stored = self.store[seed]
        return Batch(**{k: stored[k] for k in self.FIELDS}, gamma=stored["gamma"],
                     constraint_gamma=stored["constraint_gamma"])

    def _keep(self, seed, batch):
        self.store[seed] = {**{k: getattr(batch, k) for k in self.FIELDS}, "gamma": batch.gamma,
                            "constraint_gamma": batch.constraint_gamma}

    def rollout(self, task, policy, seed):
        if self.replay:
            return self._fresh(seed)
        batch = self._rollout(task, policy, seed)
        self._keep(seed, batch)
        return batch

    def rollout_tasks(self, tasks, policies, seeds):
        if self.replay:
            return [self._fresh(s) for s in seeds]
        batches = self._rollout_tasks(tasks, policies, seeds)
        for s, b in zip(seeds, batches):
            self._keep(s, b)
        return batches


class Clock:
    """CPU seconds spent inside a wrapped function (summed over calls)."""

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.process_time() - start
        return timed


def measure(name: str, rollouts: int, horizon: int, tasks: int, repeats: int, subsample: float | None) -> dict:
    """The measurements of one scenario on the importable safemeta (module docstring)."""
    import torch

    import safemeta.meta.safe_meta as safe_meta
    from safemeta.adaptation.dual_pgd_sampled import SampledAdaptationSettings, SampledDualPGD
    from safemeta.adaptation.pg_penalty import SampledPGPenaltySettings, pg_data
    from safemeta.config import check_block, settings
    from safemeta.meta.maml_penalty import maml_objective
    from safemeta.rollout import SamplingSettings, derived_seed, time_baseline
    from safemeta.scenario import Scenario
    from safemeta.tasks import get_distribution

    torch.set_num_threads(1)
    dist = get_distribution(name, horizon=horizon, cost_limit=1e6, sim_threads=1)
    if name == "humanoid_dir":   # full-length episodes (module docstring)
        dist.env_class._failed = lambda env: __import__("numpy").zeros(env.num_envs, bool)
    train, test = dist.sample(tasks, (0, 0)), dist.sample(1, (0, 1))
    scenario = Scenario(name, dist, SamplingSettings(rollouts, 0.99, 1.0), check_block({}, "scenario", "")["policy"])
    recorder = Recorder(scenario)
    extra = {} if subsample is None else {"fisher_subsample": subsample}
    operator = SampledDualPGD(scenario, settings(SampledAdaptationSettings, lam_c=1.0, kl_target=0.03, **extra))
    meta_settings = settings(safe_meta.SampledMetaTrainSettings, iterations=2, tasks_per_iteration=tasks,
                             max_kl=1e-3, cg_iters=20, cg_damping=0.1, eval_every=1000, constrain_adapted=True, **extra)
    learner = safe_meta.SampledSafeMeta(scenario, operator, meta_settings, train, test, 0)
    state = learner.initial_state()
    state.iteration = 1                                   # an iteration without evaluation
    start_state = copy.deepcopy(state)

    meta_clock, adapt_clock = Clock(), Clock()
    trpo_meta_step, adapt_step = safe_meta.trpo_meta_step, SampledDualPGD.step
    safe_meta.trpo_meta_step = meta_clock.wrap(trpo_meta_step)
    operator.step = adapt_clock.wrap(lambda *a: adapt_step(operator, *a))
    learner.iteration(copy.deepcopy(start_state))          # real sampling, recorded
    recorder.replay = True
    runs = []
    for _ in range(repeats):
        meta_clock.total = adapt_clock.total = 0.0
        st = copy.deepcopy(start_state)
        wall, cpu = time.perf_counter(), time.process_time()
        learner.iteration(st)
        runs.append((time.process_time() - cpu, time.perf_counter() - wall, adapt_clock.total, meta_clock.total))
    record = st.records[-1]
    safe_meta.trpo_meta_step = trpo_meta_step
    agreement = {} if subsample is None or subsample >= 1 else _full_fisher_agreement(
        learner, start_state, st, record, scenario, train, test)

    # the plain step: the same meta-policy batches, policy-gradient surrogates, the same TRPO step
    meta = learner.policy(start_state)
    seeds = sorted(recorder.store)
    meta_batches = [recorder._fresh(s) for s in _meta_seeds(start_state, tasks)]

    def pg_surrogate(batch):
        alive = batch.alive
        obs, actions, old = batch.obs[alive], batch.actions[alive], batch.log_prob[alive]
        weight = batch.discount[alive] / batch.num_rollouts
        adv = (batch.q_reward - time_baseline(batch.q_reward, alive))[alive]
        return lambda params: (weight * torch.exp(meta.log_prob(obs, actions, params) - old) * adv).sum()

    def timed_step(make_entries) -> float:
        entries = make_entries()
        meta.load_flat(phi)
        cpu = time.process_time()
        trpo_meta_step(meta, entries, meta_settings, 1, **fisher)
        return time.process_time() - cpu

    # MAML + penalty's outer step (baseline (a)) on the same batches: inner = the meta batch,
    # outer = the adapted batch, second-order meta-gradient, re-adapting at each line-search candidate
    pg = settings(SampledPGPenaltySettings)
    adapted_seeds = [derived_seed(s, 1) for s in _task_seeds(start_state, tasks)]   # a violating task has none:
    adapted_batches = [recorder._fresh(s) if s in recorder.store else b      # its meta batch is the outer one
                       for s, b in zip(adapted_seeds, meta_batches)]

    def maml_entries():
        out = []
        for b, a in zip(meta_batches, adapted_batches):
            limits = b.constraint_value.double().numpy() + 1.0
            inner, outer = (pg_data(x, limits, pg.penalty, pg.penalty_form, n) for x, n in ((b, True), (a, False)))
            out.append(("maml", maml_objective(meta, inner, outer, pg.inner_lr), b))
        return out

    phi = meta.flat()
    fisher = {} if subsample is None else {"fisher_subsample": subsample, "seed": 0}
    plain, maml = [], []
    for _ in range(repeats):
        plain.append(timed_step(lambda: [("plain", pg_surrogate(b), b) for b in meta_batches]))
        maml.append(timed_step(maml_entries))
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return {"scenario": name, "states": int(sum(int(b.alive.sum()) for b in meta_batches)),
            "rollouts_recorded": len(seeds), "iteration": med([r[0] for r in runs]),
            "iteration_wall": med([r[1] for r in runs]), "adapt": med([r[2] for r in runs]),
            "meta_step": med([r[3] for r in runs]), "plain": med(plain), "maml": med(maml),
            "n_violating": int(record["n_violating"]),
            "step_accepted": bool(record["step_accepted"]), **agreement}


def _full_fisher_agreement(learner, start_state, sub_state, sub_record, scenario, train, test) -> dict:
    """The subsampled iteration against the same iteration with the full Fisher, on the same
    replayed samples: cosine and norm ratio of the meta-steps (phi' - phi), both steps' full-batch
    KL, and the mean adaptation KL of each (the adaptations' radius, kl_target)."""
    import dataclasses

    import safemeta.meta.safe_meta as safe_meta

    full_settings = dataclasses.replace(learner.settings, fisher_subsample=1.0)
    full_operator = learner.adapt.with_settings(fisher_subsample=1.0)
    full = safe_meta.SampledSafeMeta(scenario, full_operator, full_settings, train, test, 0)
    full_state = copy.deepcopy(start_state)
    full.iteration(full_state)
    phi = learner.policy(start_state).flat()
    d_sub, d_full = learner.policy(sub_state).flat() - phi, full.policy(full_state).flat() - phi
    norms = float(d_sub.norm()), float(d_full.norm())
    cos = float(d_sub @ d_full) / (norms[0] * norms[1]) if min(norms) > 0 else float("nan")
    rec = full_state.records[-1]
    return {"cos": cos, "norm_ratio": norms[0] / norms[1] if norms[1] > 0 else float("nan"),
            "step_kl_sub": float(sub_record["step_kl"]), "step_kl_full": float(rec["step_kl"]),
            "adapt_kl_sub": float(sub_record["batch_adapt_kl"]), "adapt_kl_full": float(rec["batch_adapt_kl"]),
            "accepted_full": bool(rec["step_accepted"])}


def _task_seeds(state, tasks: int) -> list[int]:
    """The task seeds of iteration state.iteration (learner seed 0)."""
    from safemeta.rollout import derived_seed

    return [derived_seed(0, state.iteration, 5, j) for j in range(tasks)]


def _meta_seeds(state, tasks: int) -> list[int]:
    """The seeds of the meta-policy rollouts of iteration state.iteration (Alg. 4 line 3)."""
    from safemeta.rollout import derived_seed

    return [derived_seed(s, 0) for s in _task_seeds(state, tasks)]


def child(args) -> None:
    rollouts, horizon = SCENARIOS[args.scenarios[0]]
    if args.quick:
        horizon //= 4
    result = measure(args.scenarios[0], rollouts, horizon, args.tasks, args.repeats, args.fisher_subsample)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(args, name: str, src: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--scenarios", name, "--repeats", str(args.repeats),
           "--tasks", str(args.tasks)] + (["--quick"] if args.quick else [])
    if args.fisher_subsample is not None and src is None:
        cmd += ["--fisher-subsample", str(args.fisher_subsample)]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"measurement of {name} ({src or 'this tree'}) failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--tasks", type=int, default=10, help="tasks per iteration (App. D.2: 10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a quarter of the horizon")
    parser.add_argument("--reference", help="source tree of the reference package (e.g. main's src/)")
    parser.add_argument("--fisher-subsample", type=float, help="this tree's fisher_subsample (the meta-step's and the adaptations')")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    load = os.getloadavg()[0]
    print(f"CPU seconds of one process, one torch thread, median of {args.repeats}; load average {load:.1f} "
          f"on {os.cpu_count()} CPUs; {args.tasks} tasks per iteration; cg_iters 20")
    head = (f"{'scenario':18s} {'states':>7s} {'iter s':>8s} {'adapt s':>8s} {'meta s':>8s} {'plain s':>8s} "
            f"{'meta/plain':>10s} {'iter/plain':>10s} {'maml s':>8s} {'maml/meta':>9s}")
    print(head + (f" {'ref iter s':>10s} {'ref/this':>8s}" if args.reference else ""), flush=True)
    for name in args.scenarios:
        ref = run_child(args, name, args.reference) if args.reference else None
        r = run_child(args, name, None)
        line = (f"{name:18s} {r['states']:7d} {r['iteration']:8.2f} {r['adapt']:8.2f} {r['meta_step']:8.2f} "
                f"{r['plain']:8.2f} {r['meta_step'] / r['plain']:10.2f} {r['iteration'] / r['plain']:10.2f} "
                f"{r['maml']:8.2f} {r['maml'] / r['meta_step']:9.2f}")
        if ref is not None:
            line += f" {ref['iteration']:10.2f} {ref['iteration'] / r['iteration']:8.2f}"
        print(line, flush=True)
        if "cos" in r:
            print(f"{'':18s} vs the full Fisher on the same samples: meta-step cosine {r['cos']:.4f}, norm ratio "
                  f"{r['norm_ratio']:.3f}, step KL {r['step_kl_sub']:.2e} (full {r['step_kl_full']:.2e}), "
                  f"adaptation KL {r['adapt_kl_sub']:.4f} (full {r['adapt_kl_full']:.4f})", flush=True)


if __name__ == "__main__":
    main()
