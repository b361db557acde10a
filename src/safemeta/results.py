"""Result datasets (xarray) and their netCDF files.

Meta-training trace (`metatrain/.../trace.nc`): dims iteration, task (evaluation tasks),
constraint. Meta-test trace (`metatest/.../trace.nc`): dims task, step (k = 0 is the
meta-policy), constraint. Variables carry `long_name` and `units`; datasets carry provenance
attributes (config, seed, version, code hash). Files are written atomically.
"""
from __future__ import annotations

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
    "u": (("step", "constraint"), "multipliers of the adaptation that produced pi_[k] (NaN at k=0)", "1"),
    "kl": (("step",), "E_nu KL(pi_[k] || pi_[k-1]) (NaN at k=0)", "nats"),
    "feasible": (("step",), "problem (1) of the step was feasible", "1"),
    "time": (("step",), "wall time of the step", "s"),
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
