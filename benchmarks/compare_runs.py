"""Compare two runs of one config that differ by a non-exact change (e.g. the Fisher subsample):
the meta-test of each method, per scenario and adaptation step, within sampling noise or not.

    python benchmarks/compare_runs.py BEFORE.nc AFTER.nc [--method safemeta]

Both summary.nc files hold the same scenarios, tasks and seeds. Per (scenario, method, step k):
the mean reward and the mean cost (first constraint) over tasks x seeds of each run, their
difference AFTER - BEFORE, the standard error of that difference from the paired (task, seed)
differences, and z = difference / SE; then the count of (task, seed) over d and over d + 2 SE in
each run (the anytime-safety counts). A change is called within noise at a step when |z| <= 2
for both reward and cost. Exit status 0 when every step of every scenario is, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from safemeta.results import read_dataset


def paired(before: np.ndarray, after: np.ndarray) -> tuple[float, float, float, float]:
    """Means of each, the mean paired difference and its standard error (NaN units dropped)."""
    keep = np.isfinite(before) & np.isfinite(after)
    diff = after[keep] - before[keep]
    se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
    return float(before[keep].mean()), float(after[keep].mean()), float(diff.mean()), se


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--method", help="one method (default: every method both files hold)")
    args = parser.parse_args()
    before, after = read_dataset(args.before), read_dataset(args.after)
    methods = [args.method] if args.method else sorted(set(before.method_name.values) & set(after.method_name.values))
    within = True
    print(f"{'scenario':18s} {'method':14s} {'k':>2s} {'reward before':>13s} {'after':>9s} {'z':>6s} "
          f"{'cost before':>11s} {'after':>9s} {'z':>6s} {'>d':>7s} {'>d+2SE':>7s}")
    for scenario in sorted(set(before.scenario.values) & set(after.scenario.values)):
        for method in methods:
            b = before.sel(scenario=scenario, method_name=method)
            a = after.sel(scenario=scenario, method_name=method)
            if not np.isfinite(b.metatest_reward.values).any():
                continue
            for k in b.step.values:
                rb, ra = (x.metatest_reward.sel(step=k).values.ravel() for x in (b, a))
                cb, ca = (x.metatest_cost.sel(step=k).isel(constraint=0).values.ravel() for x in (b, a))
                r, c = paired(rb, ra), paired(cb, ca)
                zr, zc = r[2] / r[3], c[2] / c[3]
                counts = []
                for x in (b, a):
                    over = x.metatest_cost.sel(step=k) - x.limit
                    counts.append((int((over > 0).any("constraint").sum()),
                                   int((over - 2 * x.metatest_cost_se.sel(step=k) > 0).any("constraint").sum())))
                ok = abs(zr) <= 2 and abs(zc) <= 2
                within &= ok
                print(f"{scenario:18s} {method:14s} {int(k):2d} {r[0]:13.3f} {r[1]:9.3f} {zr:6.2f} {c[0]:11.3f} "
                      f"{c[1]:9.3f} {zc:6.2f} {counts[0][0]:3d}>{counts[1][0]:<3d} {counts[0][1]:3d}>{counts[1][1]:<3d}"
                      + ("" if ok else "  outside noise"))
    print("every step within noise (|z| <= 2)" if within else "some step outside noise (|z| > 2)")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
