"""Result datasets (xarray) and their netCDF files.

Meta-training trace (`metatrain/.../trace.nc`): dims iteration, task (evaluation tasks),
constraint. Meta-test trace (`metatest/.../trace.nc`) and single-task trace
(`single/.../trace.nc`): dims task, step (k = 0 is the starting policy), constraint. Which
variables a trace holds is declared by the algorithms that made it (`records.Var`); variables
carry `long_name` and `units`; datasets carry provenance attributes (config, seed, version, code
hash). Files are written atomically.
Summary (`summary.nc`): every trace of a pipeline merged by `aggregate_traces`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .atomic import atomic_path
from .records import Var, fill

TIMING_VARS = ("time", "time_sampling", "time_compute")
# A cost above d by more than this (relative to max(1, |d|)) is a violation; below it is rounding
# of an exact solution that sits on the boundary.
VIOLATION_TOL = 1e-9


def violations(cost: xr.DataArray, cost_se: xr.DataArray, limit: xr.DataArray, z: float = 0.0) -> xr.DataArray:
    """Number of tasks whose cost exceeds d + z SE in some constraint (NaN where cost is NaN)."""
    excess = cost - limit - z * cost_se - VIOLATION_TOL * np.maximum(1.0, np.abs(limit))
    over = (excess > 0).any("constraint")
    return over.sum("task").where(cost.notnull().any(("task", "constraint")))


def _safety(ds: xr.Dataset, cost: str, prefix: str) -> None:
    """Add the violation counts of `cost` (per iteration or step) to a trace."""
    names = {0.0: f"{prefix}violations", 2.0: f"{prefix}violations_2se"}
    what = {"": "policies", "meta_": "meta-policies"}[prefix]
    for z, name in names.items():
        ds[name] = violations(ds[cost], ds[f"{cost}_se"], ds["limit"], z)
        ds[name].attrs = {"long_name": f"tasks whose {what} cost exceeds d" + (f" + {z:g} SE" if z else ""),
                          "units": "1"}


def metatrain_dataset(records: list[dict[str, Any]], limits: np.ndarray, task_params: list[dict[str, Any]],
                      attrs: dict[str, Any], return_kind: str, variables: dict[str, Var]) -> xr.Dataset:
    """Stack per-iteration records into a dataset (dims iteration, task, constraint).

    `variables` declares every field a record may hold (the meta-learner's `trace_vars`); a
    value a record lacks becomes NaN, a field nobody declared is an error.
    """
    unknown = {k for r in records for k in r} - set(variables) - {"iteration"}
    if unknown:
        raise KeyError(f"meta-training records have undeclared fields {sorted(unknown)}")
    n_task, p = np.asarray(limits).shape
    sizes = {"task": n_task, "constraint": p}
    data = {}
    for name, var in variables.items():
        if not any(name in r for r in records):
            continue
        rows = [fill(var, sizes, r.get(name)) for r in records]
        data[name] = (("iteration", *var.dims), np.stack(rows), {"long_name": var.long_name, "units": var.units})
    ds = xr.Dataset(data, coords=_coords(records, n_task, p, task_params))
    ds["limit"] = (("task", "constraint"), np.asarray(limits, float), {"long_name": "cost limit d", "units": "cost"})
    for cost, prefix in (("cost", ""), ("meta_cost", "meta_")):
        if cost in ds and f"{cost}_se" in ds:
            _safety(ds, cost, prefix)
    ds.attrs.update(attrs, return_kind=return_kind)
    return ds


def sequence_dataset(arrays: dict[str, np.ndarray], limits: np.ndarray, task_params: list[dict[str, Any]],
                     attrs: dict[str, Any], return_kind: str, variables: dict[str, Var]) -> xr.Dataset:
    """Adaptation sequences of every task (dims task, step, constraint): a meta-test or a
    single-task trace. `variables` are the loop's and the operator's (`evaluate.sequence_vars`)."""
    n_task, p = np.asarray(limits).shape
    steps = arrays["reward"].shape[1]
    data = {name: (("task", *var.dims), np.asarray(arrays[name], dtype=np.float64),
                   {"long_name": var.long_name, "units": var.units})
            for name, var in variables.items() if name in arrays}
    ds = xr.Dataset(data, coords={"task": np.arange(n_task), "step": np.arange(steps), "constraint": np.arange(p),
                                  "task_params": ("task", [json.dumps(t, sort_keys=True) for t in task_params])})
    ds["limit"] = (("task", "constraint"), np.asarray(limits, float), {"long_name": "cost limit d", "units": "cost"})
    _safety(ds, "cost", "")
    ds["violation_rate"] = ((), float(ds["violations"].sum() / (n_task * steps)),
                            {"long_name": "share of all policies (tasks x steps) whose cost exceeds d", "units": "1"})
    ds.attrs.update(attrs, return_kind=return_kind)
    return ds


metatest_dataset = sequence_dataset


def _coords(records: list[dict[str, Any]], n_task: int, p: int, task_params: list[dict[str, Any]]) -> dict[str, Any]:
    return {"iteration": [int(r["iteration"]) for r in records], "task": np.arange(n_task),
            "constraint": np.arange(p),
            "task_params": ("task", [json.dumps(t, sort_keys=True) for t in task_params])}


def write_dataset(ds: xr.Dataset, path: str | Path) -> None:
    """Write netCDF atomically (temp file in the same directory, then rename)."""
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="netcdf4")


def read_dataset(path: str | Path) -> xr.Dataset:
    """Load a trace fully into memory and close the file."""
    with xr.open_dataset(path, engine="netcdf4") as ds:
        return ds.load()


def without_timing(ds: xr.Dataset) -> xr.Dataset:
    """The dataset minus wall-time variables and the creation stamp (what determinism compares)."""
    out = ds.drop_vars([v for v in TIMING_VARS if v in ds])
    out.attrs = {k: v for k, v in ds.attrs.items() if k != "created"}
    return out


# --------------------------------------------------------------------------- aggregation (summary.nc)
STAGE_PREFIX = {"meta_train": "metatrain_", "meta_test": "metatest_", "single_task": "single_"}
# The dimension naming what made a trace: `method_name` (not `method`, a keyword of Dataset.sel),
# `learner` for single-task traces; the provenance attribute that holds it.
STAGE_LABEL = {"meta_train": ("method_name", "method"), "meta_test": ("method_name", "method"),
               "single_task": ("learner", "learner")}
STAGE_DIMS = {"single_task": {"step": "single_step"}}   # single-task steps are not meta-test steps
LABEL_DIMS = ("scenario", "method_name", "learner", "seed")


def _labels(ds: xr.Dataset, path: str) -> tuple[str, str, str, int]:
    """(stage, scenario, method or learner, seed) from a trace's provenance attributes."""
    try:
        stage = str(ds.attrs["stage"])
        if stage not in STAGE_PREFIX:
            raise ValueError(f"trace {path} has stage {stage!r}; aggregate takes {', '.join(STAGE_PREFIX)}")
        labels = stage, str(ds.attrs["scenario"]), str(ds.attrs[STAGE_LABEL[stage][1]]), int(ds.attrs["seed"])
    except KeyError as exc:
        raise ValueError(f"trace {path} lacks the provenance attribute {exc.args[0]!r}") from None
    return labels


def _source(path: str, ds: xr.Dataset, stage: str, scenario: str, label: str, seed: int) -> dict[str, Any]:
    """Provenance of one merged trace (its config as a hash: the trace file holds it in full) and
    the algorithm that made it (None when its config does not say)."""
    return {"file": path, "stage": stage, "scenario": scenario, STAGE_LABEL[stage][1]: label, "seed": seed,
            "algorithm": _algorithm(ds, stage, label),
            "code_hash": ds.attrs.get("code_hash"), "safemeta_version": ds.attrs.get("safemeta_version"),
            "return_kind": ds.attrs.get("return_kind"),
            "config_sha256": hashlib.sha256(str(ds.attrs.get("config")).encode()).hexdigest()[:16]}


def _algorithm(ds: xr.Dataset, stage: str, label: str) -> str | None:
    """`algorithm` of the method (or learner) block in a trace's config attribute."""
    section = "learners" if stage == "single_task" else "methods"
    try:
        return str(json.loads(ds.attrs["config"])[section][label]["algorithm"])
    except (KeyError, TypeError, ValueError):
        return None


def algorithms(summary: xr.Dataset) -> dict[str, str]:
    """Method label -> the algorithm that made its traces (the label itself when unrecorded)."""
    found = {s["method"]: s.get("algorithm") for s in json.loads(summary.attrs.get("sources", "[]")) if "method" in s}
    return {str(m): found.get(str(m)) or str(m) for m in summary.method_name.values}


def _labelled(ds: xr.Dataset, stage: str, scenario: str, label: str, seed: int) -> xr.Dataset:
    """A trace's variables, prefixed by stage, with scenario / method_name (or learner) / seed
    dims of length one."""
    data = ds.drop_vars(["limit", "task_params"])
    data = data.rename({name: STAGE_PREFIX[stage] + name for name in data.data_vars})
    data = data.rename(STAGE_DIMS.get(stage, {}))
    for var in data.data_vars.values():
        var.attrs["long_name"] = f"{stage.replace('_', '-')}: {var.attrs.get('long_name', var.name)}"
    data.attrs = {}
    return data.expand_dims({"scenario": [scenario], STAGE_LABEL[stage][0]: [label], "seed": [seed]})


def _task_params_table(entries: dict[tuple[str, int], np.ndarray], scenarios: list[str], seeds: list[int],
                       n_task: int) -> np.ndarray:
    table = np.full((len(scenarios), len(seeds), n_task), "", dtype=object)
    for (scenario, seed), params in entries.items():
        table[scenarios.index(scenario), seeds.index(seed), :len(params)] = params
    return table.astype(str)


def aggregate_traces(paths: list[str | Path]) -> xr.Dataset:
    """Merge meta-train and meta-test traces into one dataset (the pipeline's summary.nc).

    Every trace's safety counts (`violations`, `violations_2se`, `violation_rate`) come along.
    Dims: scenario, method_name, seed (labels read from each trace's provenance attributes), then
    iteration (meta-train variables, prefixed `metatrain_`), step (meta-test, `metatest_`), task
    and constraint; single-task traces (`single_`) have learner in place of method_name and
    single_step in place of step. `limit` (d) has dims (scenario, seed, task, constraint); the coordinate
    `task_params` holds each task's parameters as JSON. Scenarios may differ in their numbers of
    tasks, iterations, steps and constraints: the merge is an outer join and pads with NaN (and
    "" in `task_params`); the `padding` attribute says which sizes each scenario really has.
    Raises ValueError for two traces with the same labels, or traces of one scenario and seed
    whose limits differ on the tasks they share (made from different task files; a meta-train
    trace may evaluate only the first test tasks).
    """
    if not paths:
        raise ValueError("no traces to aggregate")
    parts, sources = [], {}
    limits: dict[tuple[str, int], tuple[str, xr.DataArray]] = {}
    task_params: dict[tuple[str, int], np.ndarray] = {}
    sizes: dict[str, dict[str, int]] = {}
    for path in map(str, paths):
        ds = read_dataset(path)
        labels = stage, scenario, method, seed = _labels(ds, path)
        if labels in sources:
            raise ValueError(f"two {stage} traces for scenario {scenario}, method {method}, seed {seed}")
        sources[labels] = _source(path, ds, *labels)
        key, limit = (scenario, seed), ds["limit"]
        if key in limits:  # a meta-train trace may evaluate a prefix of the test tasks: compare the shared ones
            first_path, first = limits[key]
            shared_first, shared = xr.align(first.drop_vars("task_params"), limit.drop_vars("task_params"), join="inner")
            if shared.sizes["task"] == 0 or not np.allclose(shared_first.values, shared.values):
                raise ValueError(f"traces {first_path} and {path} have different limits d for scenario {scenario}, "
                                 f"seed {seed}: they were made from different task files")
        if key not in limits or limit.sizes["task"] > limits[key][1].sizes["task"]:
            limits[key] = (path, limit)
            task_params[key] = ds["task_params"].values
        per_scenario = sizes.setdefault(scenario, {})
        for dim, n in ds.sizes.items():
            dim = STAGE_DIMS.get(stage, {}).get(dim, dim)
            per_scenario[dim] = max(n, per_scenario.get(dim, 0))
        parts.append(_labelled(ds, *labels))
    for (scenario, seed), (_, limit) in limits.items():
        parts.append(limit.drop_vars("task_params").expand_dims(scenario=[scenario], seed=[seed]).to_dataset())
    summary = xr.merge(parts, join="outer", compat="no_conflicts", combine_attrs="override")
    summary = summary.transpose(*LABEL_DIMS, ..., missing_dims="ignore")
    scenarios, seeds = [str(s) for s in summary.scenario.values], [int(s) for s in summary.seed.values]
    table = _task_params_table(task_params, scenarios, seeds, summary.sizes["task"])
    summary = summary.assign_coords(task_params=(("scenario", "seed", "task"), table,
                                                 {"long_name": "task parameters (JSON)"}))
    padded = any(n < summary.sizes[dim] for per in sizes.values() for dim, n in per.items())
    summary.attrs = {
        "padding": ("outer join over scenarios; NaN (\"\" in task_params) where a scenario has fewer entries "
                    "than the dimension's size. Sizes per scenario: " + json.dumps(sizes, sort_keys=True)),
        "padded": int(padded),
        "sources": json.dumps([sources[k] for k in sorted(sources)], sort_keys=True),
    }
    return summary
