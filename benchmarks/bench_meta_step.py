"""Cost of the safe meta-step against a plain policy-gradient step, on the same samples.

For each scenario: roll out the meta-policy and its one-step adaptation once, then time
(median of repeats, policy reset in between)
- plain: one TRPO step on the policy-gradient surrogate of the meta-policy's own batch;
- meta:  one TRPO step on Alg. 4's meta-gradient surrogate (line 7, centred score, Hessian-free)
         with the same Fisher samples (the meta-policy's batch), i.e. what an iteration pays;
- adapt: one sampled A^s solve (natural step, PGD on the multipliers) on the meta batch;
- maml:  one TRPO step of MAML + penalty (baseline (a)) on the same two batches: the second-order
         meta-gradient through its inner step (inner batch = the meta batch, outer = the adapted
         batch) and a line search that re-adapts at each candidate.
Prints meta/plain (the paper's claim: comparable to a policy-gradient step; goal <= 1.3) and
maml/meta (what the Hessian-free meta-gradient saves against the second-order one).

    .venv/bin/python benchmarks/bench_meta_step.py [--quick] [--scenarios a b ...]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from safemeta.adaptation.dual_pgd_sampled import SampledAdaptationSettings, adapt_sampled
from safemeta.adaptation.pg_penalty import SampledPGPenaltySettings, pg_data
from safemeta.config import check_block, settings
from safemeta.meta.base import trpo_meta_step
from safemeta.meta.maml_penalty import maml_objective
from safemeta.meta.safe_meta import SampledMetaTrainSettings, meta_gradient_surrogate
from safemeta.rollout import SamplingSettings, time_baseline
from safemeta.scenario import Scenario
from safemeta.tasks import get_distribution

SCENARIOS = {  # name -> (rollouts, horizon): App. D.2 sizes
    "half_cheetah_vel": (40, 200), "hopper_vel": (40, 200), "swimmer_vel": (40, 200), "humanoid_dir": (40, 200),
    "point_circle": (10, 500), "car_circle_hazard": (10, 500), "point_button": (10, 500),
    "point_circle_diff": (10, 200),
}


def plain_surrogate(policy, batch):
    """The TRPO surrogate sum_t nu_t rho_t A_t of the policy's own samples (plain policy gradient)."""
    alive = batch.alive
    obs, actions, old = batch.obs[alive], batch.actions[alive], batch.log_prob[alive]
    weight = batch.discount[alive] / batch.num_rollouts
    adv = (batch.q_reward - time_baseline(batch.q_reward, alive))[alive]
    return lambda params: (weight * torch.exp(policy.log_prob(obs, actions, params) - old) * adv).sum()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, rollouts: int, horizon: int, repeats: int) -> tuple[float, float, float, float, int]:
    dist = get_distribution(name, horizon=horizon)
    task = dist.sample(1, 0)[0]
    scenario = Scenario(name, dist, SamplingSettings(rollouts, 0.99, 1.0), check_block({}, "scenario", "")["policy"])
    meta = scenario.fresh_policy(task, 0, "sampled")
    batch = scenario.rollout(task, meta, seed=1)
    d = batch.constraint_value.double().numpy() + 1.0  # a binding limit, so PGD does real work
    adaptation = settings(SampledAdaptationSettings, lam=1.0, lam_c=1.0)
    result = adapt_sampled(meta, batch, d, adaptation)
    adapted_batch = scenario.rollout(task, result.policy, seed=2)
    step_settings = settings(SampledMetaTrainSettings, max_kl=1e-3, cg_iters=10, cg_damping=0.1)
    start = meta.flat()

    def step(surrogate):
        meta.load_flat(start)
        trpo_meta_step(meta, [("step", surrogate, batch)], step_settings, 0)

    pg = settings(SampledPGPenaltySettings)
    inner, outer = (pg_data(b, d, pg.penalty, pg.penalty_form, n) for b, n in ((batch, True), (adapted_batch, False)))
    plain = median_time(lambda: step(plain_surrogate(meta, batch)), repeats)
    meta_t = median_time(lambda: step(meta_gradient_surrogate(meta, result.policy, adapted_batch)), repeats)
    adapt = median_time(lambda: adapt_sampled(meta, batch, d, adaptation), repeats)
    maml = median_time(lambda: step(maml_objective(meta, inner, outer, pg.inner_lr)), repeats)
    return plain, meta_t, adapt, maml, int(batch.alive.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="a quarter of the horizon, 3 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'scenario':20s} {'samples':>8s} {'plain s':>9s} {'meta s':>9s} {'meta/plain':>10s} {'adapt s':>9s} "
          f"{'maml s':>9s} {'maml/meta':>9s}")
    for name in args.scenarios:
        rollouts, horizon = SCENARIOS[name]
        horizon = horizon // 4 if args.quick else horizon
        plain, meta, adapt, maml, samples = bench(name, rollouts, horizon, 3 if args.quick else args.repeats)
        print(f"{name:20s} {samples:8d} {plain:9.3f} {meta:9.3f} {meta / plain:10.2f} {adapt:9.3f} {maml:9.3f} "
              f"{maml / meta:9.2f}", flush=True)


if __name__ == "__main__":
    main()
