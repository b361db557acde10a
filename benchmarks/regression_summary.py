"""Compare two summary.nc files bit for bit: the regression check of a refactor.

    python benchmarks/regression_summary.py BEFORE.nc AFTER.nc [--method safemeta] [--rename method=method_name]

Every data variable and coordinate the two files share is compared exactly (NaN equals NaN;
wall-time variables are skipped: they are measurements), after renaming dimensions of BEFORE
(`--rename old=new`, default method=method_name, the rename of the plugin refactor) and
selecting the method. Variables only one file has are listed. Exit status 0 when every shared
variable is identical and AFTER lacks none of BEFORE's, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from safemeta.results import TIMING_VARS, read_dataset

TIMING = tuple(f"{prefix}_{name}" for prefix in ("metatrain", "metatest", "single") for name in TIMING_VARS)


def compare(before_path: str, after_path: str, method: str | None, renames: dict[str, str]) -> int:
    before = read_dataset(before_path).rename({k: v for k, v in renames.items() if k in read_dataset(before_path).dims})
    after = read_dataset(after_path)
    label = "method_name"
    if method is not None:
        before, after = before.sel({label: [method]}), after.sel({label: [method]})
    failures = 0
    names = sorted(set(before.variables) & set(after.variables))
    for name in names:
        if name in TIMING:
            continue
        a, b = before[name], after[name]
        if a.dims != b.dims or a.shape != b.shape:
            print(f"DIFFERENT {name}: dims {a.dims} {a.shape} vs {b.dims} {b.shape}")
            failures += 1
            continue
        if a.dtype.kind in "fc":
            same = np.array_equal(a.values, b.values, equal_nan=True)
            worst = float(np.nanmax(np.abs(a.values - b.values))) if not same and a.size else 0.0
        else:
            same, worst = bool((a.values == b.values).all()), float("nan")
        print(f"{'identical' if same else 'DIFFERENT'} {name} {dict(zip(a.dims, a.shape))}"
              + ("" if same else f" max |diff| {worst:.3g}"))
        failures += not same
    missing = sorted(set(before.variables) - set(after.variables))
    added = sorted(set(after.variables) - set(before.variables))
    if missing:
        print("MISSING in after:", ", ".join(missing))
        failures += len(missing)
    if added:
        print("added in after:", ", ".join(added))
    print(f"{len(names)} shared variables ({len([n for n in names if n in TIMING])} timing ones skipped); "
          f"{failures} failures")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--method", default="safemeta", help="method to compare (default safemeta; '' for all)")
    parser.add_argument("--rename", action="append", default=["method=method_name"],
                        help="rename a dimension of BEFORE, old=new")
    args = parser.parse_args()
    renames = dict(r.split("=", 1) for r in args.rename)
    return compare(args.before, args.after, args.method or None, renames)


if __name__ == "__main__":
    sys.exit(main())
