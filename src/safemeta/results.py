"""Result datasets (xarray) and their netCDF files.

Meta-training trace (`metatrain/.../trace.nc`): dims iteration, task (evaluation tasks),
constraint. Meta-test trace (`metatest/.../trace.nc`): dims task, step (k = 0 is the
meta-policy), constraint. Variables carry `long_name` and `units`; datasets carry provenance
attributes (config, seed, version, code hash). Files are written atomically.
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

# name -> (dims after the leading one, long_name, units)
METATRAIN_VARS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "reward": (("task",), "reward of the one-step adapted policy A^s(pi_phi)", "return"),
    "cost": (("task", "constraint"), "cost of the one-step adapted policy A^s(pi_phi)", "cost"),
    "meta_reward": (("task",), "reward of the meta-policy pi_phi", "return"),
    "meta_cost": (("task", "constraint"), "cost of the meta-policy pi_phi", "cost"),
    "u": (("task", "constraint"), "multipliers of the one-step adaptation", "1"),
    "adapt_kl": (("task",), "E_nu KL(A^s(pi_phi) || pi_phi) of the one-step adaptation", "nats"),
    "feasible": (("task",), "problem (1) of the one-step adaptation was feasible", "1"),
    "batch_reward": ((), "mean reward of the adapted policies on the iteration's training tasks", "return"),
    "batch_cost": (("constraint",), "max cost of the adapted policies on the iteration's training tasks", "cost"),
    "batch_meta_reward": ((), "mean reward of the meta-policy on the iteration's training tasks", "return"),
    "batch_meta_cost": (("constraint",), "max cost of the meta-policy on the iteration's training tasks", "cost"),
    "batch_u": (("constraint",), "mean multipliers of the iteration's adaptations", "1"),
    "batch_adapt_kl": ((), "mean E_nu KL(adapted || meta) of the iteration's adaptations", "nats"),
    "n_violating": ((), "training tasks of the batch that took the cost-reduction step", "1"),
    "step_accepted": ((), "the TRPO line search accepted a step", "1"),
    "step_kl": ((), "mean KL of the accepted meta-step", "nats"),
    "step_improvement": ((), "improvement of the batch objective by the meta-step", "return"),
    "grad_norm": ((), "norm of the batch meta-gradient", "1"),
    "time_sampling": ((), "wall time spent collecting samples", "s"),
    "time_compute": ((), "wall time spent computing (adaptation, gradients, step)", "s"),
}

METATEST_VARS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "reward": (("step",), "reward of the exploration policy pi_[k]", "return"),
    "cost": (("step", "constraint"), "cost of the exploration policy pi_[k]", "cost"),
    "cost_se": (("step", "constraint"), "standard error of cost over the rollouts (0: exact)", "cost"),
    "u": (("step", "constraint"), "multipliers of the adaptation that produced pi_[k] (NaN at k=0)", "1"),
    "kl": (("step",), "E_nu KL(pi_[k] || pi_[k-1]) (NaN at k=0)", "nats"),
    "feasible": (("step",), "problem (1) of the step was feasible", "1"),
    "time": (("step",), "computation time of the adaptation that produced pi_[k] (0 at k=0)", "s"),
    "time_sampling": (("step",), "time spent evaluating pi_[k] (rollouts, or exact solves on tabular)", "s"),
}

TIMING_VARS = ("time", "time_sampling", "time_compute")


def _fill(dims: tuple[str, ...], sizes: dict[str, int], value: Any) -> np.ndarray:
    if value is None:
        return np.full([sizes[d] for d in dims], np.nan)
    return np.asarray(value, dtype=np.float64)


def metatrain_dataset(records: list[dict[str, Any]], limits: np.ndarray, task_params: list[dict[str, Any]],
                      attrs: dict[str, Any], return_kind: str) -> xr.Dataset:
    """Stack per-iteration records into a dataset; a value a record lacks becomes NaN."""
    unknown = {k for r in records for k in r} - set(METATRAIN_VARS) - {"iteration"}
    if unknown:
        raise KeyError(f"meta-training records have unknown fields {sorted(unknown)}")
    n_task, p = np.asarray(limits).shape
    sizes = {"task": n_task, "constraint": p}
    data = {}
    for name, (dims, long_name, units) in METATRAIN_VARS.items():
        if not any(name in r for r in records):
            continue
        rows = [_fill(dims, sizes, r.get(name)) for r in records]
        data[name] = (("iteration", *dims), np.stack(rows), {"long_name": long_name, "units": units})
    ds = xr.Dataset(data, coords=_coords(records, n_task, p, task_params))
    ds["limit"] = (("task", "constraint"), np.asarray(limits, float), {"long_name": "cost limit d", "units": "cost"})
    ds.attrs.update(attrs, return_kind=return_kind)
    return ds


def metatest_dataset(arrays: dict[str, np.ndarray], limits: np.ndarray, task_params: list[dict[str, Any]],
                     attrs: dict[str, Any], return_kind: str) -> xr.Dataset:
    n_task, p = np.asarray(limits).shape
    steps = arrays["reward"].shape[1]
    data = {name: (("task", *dims), np.asarray(arrays[name], dtype=np.float64), {"long_name": ln, "units": un})
            for name, (dims, ln, un) in METATEST_VARS.items()}
    ds = xr.Dataset(data, coords={"task": np.arange(n_task), "step": np.arange(steps), "constraint": np.arange(p),
                                  "task_params": ("task", [json.dumps(t, sort_keys=True) for t in task_params])})
    ds["limit"] = (("task", "constraint"), np.asarray(limits, float), {"long_name": "cost limit d", "units": "cost"})
    ds.attrs.update(attrs, return_kind=return_kind)
    return ds


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
STAGE_PREFIX = {"meta_train": "metatrain_", "meta_test": "metatest_"}
LABEL_DIMS = ("scenario", "method", "seed")


def _labels(ds: xr.Dataset, path: str) -> tuple[str, str, str, int]:
    """(stage, scenario, method, seed) from a trace's provenance attributes."""
    try:
        labels = str(ds.attrs["stage"]), str(ds.attrs["scenario"]), str(ds.attrs["method"]), int(ds.attrs["seed"])
    except KeyError as exc:
        raise ValueError(f"trace {path} lacks the provenance attribute {exc.args[0]!r}") from None
    if labels[0] not in STAGE_PREFIX:
        raise ValueError(f"trace {path} has stage {labels[0]!r}; aggregate takes {', '.join(STAGE_PREFIX)}")
    return labels


def _source(path: str, ds: xr.Dataset, stage: str, scenario: str, method: str, seed: int) -> dict[str, Any]:
    """Provenance of one merged trace (its config as a hash: the trace file holds it in full)."""
    return {"file": path, "stage": stage, "scenario": scenario, "method": method, "seed": seed,
            "code_hash": ds.attrs.get("code_hash"), "safemeta_version": ds.attrs.get("safemeta_version"),
            "return_kind": ds.attrs.get("return_kind"),
            "config_sha256": hashlib.sha256(str(ds.attrs.get("config")).encode()).hexdigest()[:16]}


def _labelled(ds: xr.Dataset, stage: str, scenario: str, method: str, seed: int) -> xr.Dataset:
    """A trace's variables, prefixed by stage, with scenario/method/seed dims of length one."""
    data = ds.drop_vars(["limit", "task_params"])
    data = data.rename({name: STAGE_PREFIX[stage] + name for name in data.data_vars})
    for var in data.data_vars.values():
        var.attrs["long_name"] = f"{stage.replace('_', '-')}: {var.attrs.get('long_name', var.name)}"
    data.attrs = {}
    return data.expand_dims(scenario=[scenario], method=[method], seed=[seed])


def _task_params_table(entries: dict[tuple[str, int], np.ndarray], scenarios: list[str], seeds: list[int],
                       n_task: int) -> np.ndarray:
    table = np.full((len(scenarios), len(seeds), n_task), "", dtype=object)
    for (scenario, seed), params in entries.items():
        table[scenarios.index(scenario), seeds.index(seed), :len(params)] = params
    return table.astype(str)


def aggregate_traces(paths: list[str | Path]) -> xr.Dataset:
    """Merge meta-train and meta-test traces into one dataset (the pipeline's summary.nc).

    Dims: scenario, method, seed (labels read from each trace's provenance attributes), then
    iteration (meta-train variables, prefixed `metatrain_`), step (meta-test, `metatest_`), task
    and constraint. `limit` (d) has dims (scenario, seed, task, constraint); the coordinate
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
            per_scenario[dim] = max(n, per_scenario.get(dim, 0))
        parts.append(_labelled(ds, *labels))
    for (scenario, seed), (_, limit) in limits.items():
        parts.append(limit.drop_vars("task_params").expand_dims(scenario=[scenario], seed=[seed]).to_dataset())
    summary = xr.merge(parts, join="outer", compat="no_conflicts", combine_attrs="override")
    summary = summary.transpose(*LABEL_DIMS, ...)
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
