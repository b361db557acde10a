"""The side-by-side comparison table of the methods (the paper's section 6 claims), from summary.nc.

One row per scenario and method; every number is computed per seed first, then summarised over
the seeds that ran it:
- `final_reward_mean`, `final_reward_se`: the mean reward over the test tasks of the last
  meta-test policy pi_[K]; mean and standard error over seeds (NaN SE with one seed).
- `best_baseline`, `reward_ratio_to_best_baseline`, `reward_gain_over_best_baseline`: the
  baseline (any method whose algorithm is not the paper's `safemeta`) with the highest final
  reward in the scenario; the row's final reward divided by it, and (R - R_best) / |R_best|. The
  paper's "about 50% improvement over the best baselines" is a gain of 0.5; with negative
  rewards (the velocity tasks) the ratio falls below 1 as R improves, the gain does not.
- `final_metatrain_reward_mean`, `metatrain_gain_over_best_baseline`: the same for the last
  evaluated meta-training iteration (reward of the one-step adapted policy; the paper claims
  the gain there too); NaN for methods without a meta-training curve (Meta-CRPO).
- `metatest_steps` (K + 1 policies, k = 0 the meta-policy), `steps_over_d`, `steps_over_d_2se`:
  how many of them have a maximal cost over test tasks (and constraints) above d, resp. above
  d + 2 SE (SE: the task's standard error over rollouts, 0 on exact scenarios); mean over seeds.
  Anytime safety is 0.
- `metatrain_iteration_s`, `metatest_step_s`: median computation time of a meta-iteration and
  of a meta-test adaptation step (sampling excluded; `plots.compute_times`), mean over seeds;
  `*_ratio_to_meta_cpo`: divided by the `meta_cpo` method's in the same scenario (NaN without
  one). The paper claims about 0.3 and 0.5 for its method.
"""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from .atomic import write_text
from .results import algorithms

PAPER_METHOD = "safemeta"     # the algorithm of the paper's method (the others are baselines)
REFERENCE_TIME = "meta_cpo"   # the algorithm the paper's timing claims compare with

COLUMNS = ("scenario", "method", "algorithm", "seeds", "final_reward_mean", "final_reward_se", "best_baseline",
           "reward_ratio_to_best_baseline", "reward_gain_over_best_baseline", "final_metatrain_reward_mean",
           "metatrain_gain_over_best_baseline", "metatest_steps", "steps_over_d", "steps_over_d_2se",
           "metatrain_iteration_s", "metatest_step_s", "metatrain_time_ratio_to_meta_cpo",
           "metatest_time_ratio_to_meta_cpo")


def _last_finite(values: xr.DataArray, dim: str) -> xr.DataArray:
    """Per remaining coordinate, the value at the last index along `dim` that is finite."""
    mask = values.notnull()
    if not bool(mask.any()):
        return values.isel({dim: 0})
    last = int(np.flatnonzero(mask.any([d for d in values.dims if d != dim]).values)[-1])
    return values.isel({dim: last})


def _mean_se(per_seed: np.ndarray) -> tuple[float, float, int]:
    x = per_seed[np.isfinite(per_seed)]
    if x.size == 0:
        return np.nan, np.nan, 0
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else np.nan, int(x.size)


def _gain(value: float, best: float) -> float:
    return (value - best) / abs(best) if np.isfinite(best) and best != 0 else np.nan


def comparison_table(summary: xr.Dataset) -> pd.DataFrame:
    """The comparison table (module doc) of a summary.nc dataset."""
    from .plots import compute_times

    algo = algorithms(summary)
    times = compute_times(summary)
    train_time = times.get("meta-training (per iteration)")
    test_time = times.get("meta-test (per adaptation step)")
    rows = []
    for scenario in map(str, summary.scenario.values):
        one = summary.sel(scenario=scenario)
        limit = one["limit"]
        excess = (one["metatest_cost"] - limit).max(("task", "constraint"))              # (method, seed, step)
        se = one["metatest_cost_se"] if "metatest_cost_se" in one else xr.zeros_like(one["metatest_cost"])
        excess_2se = (one["metatest_cost"] - 2 * se.fillna(0) - limit).max(("task", "constraint"))
        for method in map(str, summary.method_name.values):
            reward = one["metatest_reward"].sel(method_name=method).mean("task")         # (seed, step)
            ran = reward.notnull().any("step").values
            if not ran.any():
                continue
            steps = int(reward.notnull().any("seed").sum())
            final = _mean_se(_last_finite(reward, "step").values)
            train_final = np.nan
            if "metatrain_reward" in one:
                train_reward = one["metatrain_reward"].sel(method_name=method).mean("task")
                train_final = _mean_se(_last_finite(train_reward, "iteration").values)[0]
            over = excess.sel(method_name=method).values[ran]
            over_2se = excess_2se.sel(method_name=method).values[ran]
            rows.append({
                "scenario": scenario, "method": method, "algorithm": algo[method], "seeds": final[2],
                "final_reward_mean": final[0], "final_reward_se": final[1],
                "final_metatrain_reward_mean": train_final, "metatest_steps": steps,
                "steps_over_d": float(np.mean((over > 0).sum(-1))),
                "steps_over_d_2se": float(np.mean((over_2se > 0).sum(-1))),
                "metatrain_iteration_s": _seed_mean(train_time, scenario, method),
                "metatest_step_s": _seed_mean(test_time, scenario, method),
            })
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    out = []
    for _, group in table.groupby("scenario", sort=False):
        group = group.copy()
        baselines = group[group["algorithm"] != PAPER_METHOD]
        best = baselines.loc[baselines["final_reward_mean"].idxmax()] if baselines["final_reward_mean"].notna().any() else None
        best_train = baselines["final_metatrain_reward_mean"].max() if len(baselines) else np.nan
        group["best_baseline"] = best["method"] if best is not None else ""
        best_reward = best["final_reward_mean"] if best is not None else np.nan
        group["reward_ratio_to_best_baseline"] = group["final_reward_mean"] / best_reward
        group["reward_gain_over_best_baseline"] = [_gain(v, best_reward) for v in group["final_reward_mean"]]
        group["metatrain_gain_over_best_baseline"] = [_gain(v, best_train) for v in group["final_metatrain_reward_mean"]]
        reference = group[group["algorithm"] == REFERENCE_TIME]
        for column, ratio in (("metatrain_iteration_s", "metatrain_time_ratio_to_meta_cpo"),
                              ("metatest_step_s", "metatest_time_ratio_to_meta_cpo")):
            group[ratio] = group[column] / reference[column].iloc[0] if len(reference) else np.nan
        out.append(group)
    return pd.concat(out, ignore_index=True)[list(COLUMNS)]


def _seed_mean(seconds: xr.DataArray | None, scenario: str, method: str) -> float:
    if seconds is None:
        return np.nan
    values = seconds.sel(scenario=scenario, method_name=method).values
    return float(np.nanmean(values)) if np.isfinite(values).any() else np.nan


def write_table(table: pd.DataFrame, csv: str | Path, html_path: str | Path | None = None) -> None:
    """The table as CSV (full precision) and, if asked, as a small HTML page (for the report)."""
    write_text(csv, table.to_csv(index=False, float_format="%.6g"))
    if html_path is not None:
        body = table.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0)
        doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape('Comparison')}</title>"
               "<style>table{border-collapse:collapse;font:13px sans-serif}td,th{padding:3px 8px;"
               "border-bottom:1px solid #ddd;text-align:right}</style></head><body>"
               f"<p>{html.escape(__doc__.splitlines()[0])} Column definitions: safemeta/comparison.py.</p>"
               f"{body}</body></html>")
        write_text(html_path, doc)
