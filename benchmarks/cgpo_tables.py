"""CGPO's Tables 2-3 (App. B): relative error of the constraint estimate for the next policy on
FunctionEnv, ZoBG (eq. 69) against FoBG (GBE through the dynamics), over trajectory lengths and
trust-region radii.

Protocol (ours where App. B/C is silent):
- FunctionEnv with shift 0 (CGPO's environment), a "trajectory of length L" = L actions whose
  reached states are costed: horizon L + 1 (the cost of x_0 does not depend on the policy), d
  scaled with the horizon (0.08 per step, as d = 8 at T = 100);
- per (seed, estimator, L, radius): a fresh Gaussian MLP policy (the config's default network,
  2 x 64 tanh, log-std -0.5) trained for `epochs` CGPO steps with that FIXED radius, each step
  from the estimator's own g, q on N = `rollouts` fresh episodes (ZoBG: score function times the
  whole episode's return or cost, eq. 69, no baseline; FoBG: the pathwise gradient of the same
  batch by back-propagation through the whole trajectory, i.e. GBE with h >= T), so each
  estimator drives its own run (as CGPO-ZoBG of Fig. 10);
- each update has the fixed squared norm delta.delta = radius (App. C.2 fixes the magnitude) along
  the CGPO step of the estimator's g, q (with reward = cost, g = q and the step is +-q: towards
  the boundary);
- at every step the predicted change q.delta (eq. 73 minus J_C(theta)) is compared, by eq. (74)
  |realised - predicted| / |realised|, with the realised change J_C(theta + delta) - J_C(theta)
  measured two ways, both with common random numbers (the same initial states and action noise
  for both policies): "same" on the N episodes the estimate used (the change of the estimated
  constraint: what the Taylor remainder of Lemma 4.1 bounds), "fresh" on `eval` new episodes (the
  change of the expected constraint, so the estimator's sampling error counts too);
- cells report mean +- std over all steps and seeds (the paper: 100 epochs x 5 seeds).
Radius grid: the printed row labels all read 0.0001 (an extraction error); we use the squared
radii 1e-4, 1e-3, 1e-2, 1e-1, 1 (rows 1-2 match the text's "update magnitudes <= 0.001").

    python benchmarks/cgpo_tables.py                 # minutes: 10 epochs x 2 seeds
    python benchmarks/cgpo_tables.py --full          # the paper's 100 epochs x 5 seeds
Writes OUT/cgpo_table2_zobg.csv, OUT/cgpo_table3_fobg.csv (mean, std per radius and length,
with the paper's values beside them) and OUT/cgpo_tables.png.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

from safemeta.adaptation.cgpo import solve_subproblem
from safemeta.adaptation.gbe import estimate
from safemeta.optim import flat_grad
from safemeta.policies import GaussianMLPPolicy
from safemeta.rollout import derived_seed
from safemeta.tasks import Task, get_distribution

LENGTHS = (1, 5, 10, 50, 100, 200)
MEASURES = ("same", "fresh")   # where the realised change is measured
RADII = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# The paper's Tables 2 (ZoBG) and 3 (FoBG): rows = RADII (our reading), columns = LENGTHS, (mean, std).
PAPER = {
    "zobg": [[(0.3387, 0.2420), (0.8862, 0.3499), (3.093, 1.394), (15.40, 15.93), (35.90, 29.11), (65.19, 138.6)],
             [(0.6291, 1.4107), (0.4401, 1.722), (15.575, 6.813), (32.09, 132.9), (150.6, 68.59), (39.17, 134.4)],
             [(0.3171, 2.039), (8.709, 33.90), (31.38, 139.1), (68.71, 292.6), (197.6, 488.8), (66.40, 348.7)],
             [(1.630, 11.76), (4.393, 17.18), (22.56, 132.8), (276.8, 372.7), (202.4, 291.1), (35.99, 181.0)],
             [(12.00, 26.20), (11.51, 66.89), (65.47, 118.9), (94.81, 93.27), (174.9, 515.3), (71.00, 288.0)]],
    "fobg": [[(0.0081, 0.0070), (0.0033, 0.0029), (0.0018, 0.0015), (0.0007, 0.0006), (0.0011, 0.0014), (0.0015, 0.0024)],
             [(0.0029, 0.0022), (0.0027, 0.0021), (0.0027, 0.0022), (0.0030, 0.0028), (0.0059, 0.0163), (0.0129, 0.0606)],
             [(0.0050, 0.0038), (0.0046, 0.0038), (0.0045, 0.0039), (0.0056, 0.0064), (0.0084, 0.0154), (0.0165, 0.0661)],
             [(0.0283, 0.0295), (0.0221, 0.0226), (0.0194, 0.0170), (0.0189, 0.0227), (0.0224, 0.0327), (0.0494, 0.2030)],
             [(0.1433, 1.1200), (0.0371, 0.0502), (0.0308, 0.0330), (0.0290, 0.0406), (0.0399, 0.0577), (0.1045, 0.5258)]],
}


def function_env(length: int):
    dist = get_distribution("function_env", horizon=length + 1)
    return dist, Task("function_env", {"shift": 0.0, "d": [dist.cost_limit]})


def episodes(dist, task, policy, n: int, seed: int):
    """n reparameterised episodes (a = mu + std eps): initial states from derived_seed(seed, 0), eps
    from derived_seed(seed, 1), drawn as `gbe.estimate` draws them, so the same seed gives the
    same episodes as the FoBG estimate. Returns (obs [T, n, 1], actions [T, n, 1], episode cost [n])."""
    env = dist.make_env(task, n, derived_seed(seed, 0))
    gen = torch.Generator().manual_seed(derived_seed(seed, 1))
    obs, rows, actions, total = env.reset(), [], [], torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(env.horizon):
            a = policy.rsample(obs, torch.randn((n, 1), generator=gen, dtype=torch.float64))
            rows.append(obs)
            actions.append(a)
            step = env.step(a)
            total += step.cost[:, 0].double()
            obs = step.obs
    return torch.stack(rows), torch.stack(actions), total


def zobg(dist, task, policy, rollouts: int, seed: int) -> tuple[float, torch.Tensor]:
    """(J_C, g_ZoBG) of eq. (69): 1/N sum_i sum_t grad log pi(a_t|s_t) C(tau_i), no baseline."""
    obs, actions, cost = episodes(dist, task, policy, rollouts, seed)
    surrogate = (policy.log_prob(obs, actions) * cost[None].to(obs.dtype)).sum() / rollouts
    return float(cost.mean()), flat_grad(surrogate, list(policy.parameters()))


def fobg(dist, task, policy, rollouts: int, seed: int) -> tuple[float, torch.Tensor]:
    """(J_C, q) by back-propagation through the whole trajectory (GBE with h >= T)."""
    env = dist.make_env(task, rollouts, derived_seed(seed, 0))
    est = estimate(env, policy, None, env.horizon, torch.Generator().manual_seed(derived_seed(seed, 1)))
    return est.cost, est.q


class OpenLoopPolicy(GaussianMLPPolicy):
    """Diagnostic (`--open-loop`): the network sees a constant input, so its mean does not depend on x
    and the closed loop x' = x + 0.2 a has Jacobian 1 (no amplification along the trajectory)."""

    def distribution(self, obs, params=None):
        return super().distribution(torch.zeros_like(obs), params)


def run_cell(estimator: str, length: int, radius: float, seed: int, epochs: int, rollouts: int, n_eval: int,
             hidden: tuple[int, ...], open_loop: bool = False) -> dict[str, list[float]]:
    """Relative errors (eq. 74) of every step of one run with updates of fixed squared norm `radius`
    along the CGPO step: realised on the estimate's own episodes ("same") and on fresh ones ("fresh")."""
    dist, task = function_env(length)
    limit = float(task.params["d"][0])
    torch.manual_seed(derived_seed(seed, 7))
    policy = (OpenLoopPolicy if open_loop else GaussianMLPPolicy)(1, 1, hidden, -0.5)
    grad_of = zobg if estimator == "zobg" else fobg
    errors: dict[str, list[float]] = {"same": [], "fresh": []}
    for epoch in range(epochs):
        train_seed, eval_seed = derived_seed(seed, 1, epoch), derived_seed(seed, 2, epoch)
        cost, q = grad_of(dist, task, policy, rollouts, train_seed)
        q = q.double().numpy()                      # reward = cost in FunctionEnv: g = q
        direction, _ = solve_subproblem(q, q, cost - limit, radius)
        norm = float(np.linalg.norm(direction))
        if norm == 0.0:
            continue
        delta = direction * (np.sqrt(radius) / norm)   # ||delta||^2 = radius exactly (App. C.2: fixed magnitude)
        theta = policy.flat()
        fresh_before = episodes(dist, task, policy, n_eval, eval_seed)[2].mean()
        policy.load_flat(theta + torch.as_tensor(delta, dtype=theta.dtype))
        same_after = episodes(dist, task, policy, rollouts, train_seed)[2].mean()
        fresh_after = episodes(dist, task, policy, n_eval, eval_seed)[2].mean()
        predicted = float(q @ delta)
        for key, realised in (("same", float(same_after) - cost), ("fresh", float(fresh_after - fresh_before))):
            if realised != 0.0:
                errors[key].append(abs(realised - predicted) / abs(realised))
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the paper's size: 100 epochs x 5 seeds")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--rollouts", type=int, default=64, help="episodes per estimate (N)")
    parser.add_argument("--eval", type=int, default=512, help="episodes of the common-random-number evaluation")
    parser.add_argument("--hidden", type=int, nargs="*", default=[64, 64])
    parser.add_argument("--lengths", type=int, nargs="*", default=list(LENGTHS))
    parser.add_argument("--estimators", nargs="*", default=["zobg", "fobg"], choices=["zobg", "fobg"])
    parser.add_argument("--open-loop", action="store_true",
                        help="diagnostic: a policy whose mean ignores x (files get the suffix _open_loop)")
    parser.add_argument("--out", default="results/benchmarks/cgpo")
    args = parser.parse_args(argv)
    epochs = args.epochs or (100 if args.full else 10)
    seeds = args.seeds or (5 if args.full else 2)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = tuple(args.lengths)
    stats: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    suffix = "_open_loop" if args.open_loop else ""
    for estimator in args.estimators:
        table = np.full((2, len(RADII), len(lengths), 2), np.nan)   # [same/fresh, radius, length, mean/std]
        for i, radius in enumerate(RADII):
            for j, length in enumerate(lengths):
                cells = [run_cell(estimator, length, radius, seed, epochs, args.rollouts, args.eval, tuple(args.hidden),
                                  args.open_loop) for seed in range(seeds)]
                for m, measure in enumerate(MEASURES):
                    errors = [e for cell in cells for e in cell[measure]]
                    table[m, i, j] = (np.mean(errors), np.std(errors)) if errors else (np.nan, np.nan)
                print(f"{estimator} radius {radius:g} length {length}: same {table[0, i, j, 0]:.4g} +- "
                      f"{table[0, i, j, 1]:.4g}, fresh {table[1, i, j, 0]:.4g} +- {table[1, i, j, 1]:.4g} "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        stats[estimator] = table
        write_csv(out / f"cgpo_table{2 if estimator == 'zobg' else 3}_{estimator}{suffix}.csv", table, lengths, estimator)
    plot(out / f"cgpo_tables{suffix}.png", stats, lengths, epochs, seeds)
    print(f"wrote {out}/cgpo_table*{suffix}.csv, cgpo_tables{suffix}.png ({epochs} epochs x {seeds} seeds, "
          f"N = {args.rollouts}, {time.perf_counter() - start:.0f} s)")
    return 0


def write_csv(path: Path, table: np.ndarray, lengths: tuple[int, ...], estimator: str) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["radius", "length", "same_mean", "same_std", "fresh_mean", "fresh_std", "paper_mean",
                         "paper_std"])
        for i, radius in enumerate(RADII):
            for j, length in enumerate(lengths):
                paper = PAPER[estimator][i][LENGTHS.index(length)] if length in LENGTHS else (np.nan, np.nan)
                writer.writerow([radius, length, *(f"{table[m, i, j, k]:.6g}" for m in range(2) for k in range(2)),
                                 *paper])


def plot(path: Path, stats: dict[str, np.ndarray], lengths: tuple[int, ...], epochs: int, seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(stats), figsize=(5.5 * len(stats), 8), sharex=True, sharey=True, squeeze=False)
    names = {"zobg": "ZoBG (eq. 69), Table 2", "fobg": "FoBG (GBE), Table 3"}
    where = {"same": "realised on the estimate's own episodes", "fresh": "realised on fresh episodes"}
    paper_lengths = [n for n in lengths if n in LENGTHS]
    for row, measure in enumerate(MEASURES):
        for col, estimator in enumerate(stats):
            ax = axes[row, col]
            for i, radius in enumerate(RADII):
                line, = ax.plot(lengths, stats[estimator][row, i, :, 0], "o-", label=f"radius {radius:g}")
                paper = [PAPER[estimator][i][LENGTHS.index(n)][0] for n in paper_lengths]
                ax.plot(paper_lengths, paper, "x--", color=line.get_color(), alpha=0.5)
            ax.axhline(1.0, color="k", lw=0.8, ls=":")
            ax.set(xscale="log", yscale="log", title=f"{names[estimator]}\n{where[measure]}")
            if row == 1:
                ax.set_xlabel("trajectory length")
            if col == 0:
                ax.set_ylabel("relative error of the J_C change (eq. 74)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"FunctionEnv: ours (solid, mean over {epochs} steps x {seeds} seeds) and the paper (dashed, x)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
