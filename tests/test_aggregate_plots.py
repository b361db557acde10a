"""summary.nc from traces (labels, NaN padding, provenance, consistency checks) and its figures."""
from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from safemeta import cli, plots
from safemeta.adaptation.dual_pgd import ExactDualPGD
from safemeta.evaluate import sequence_vars
from safemeta.meta.safe_meta_exact import ExactSafeMeta
from safemeta.results import aggregate_traces, metatest_dataset, metatrain_dataset, read_dataset, write_dataset

METATRAIN_VARS, METATEST_VARS = ExactSafeMeta.trace_vars(ExactDualPGD), sequence_vars(ExactDualPGD)


def traces(tmp_path, scenario, method, seed, n_task, n_iter, n_step, p, limits=None, scale=1.0):
    """A meta-train and a meta-test trace with known values (reward = scale * (iteration + task))."""
    limits = np.arange(1, n_task * p + 1, dtype=float).reshape(n_task, p) if limits is None else limits
    attrs = {"scenario": scenario, "method": method, "seed": seed, "code_hash": "0" * 16, "config": "{}"}
    records = [{"iteration": i, "reward": scale * (i + np.arange(n_task)), "cost": np.full((n_task, p), 0.5 * i),
                "time_compute": 0.1 * scale} for i in range(n_iter)]
    params = [{"task": k} for k in range(n_task)]
    train = metatrain_dataset(records, limits, params, {**attrs, "stage": "meta_train"}, "exact", METATRAIN_VARS)
    sizes = {"step": n_step, "constraint": p}
    arrays = {name: np.zeros([n_task, *(sizes[d] for d in var.dims)]) for name, var in METATEST_VARS.items()}
    arrays.update(reward=np.tile(np.arange(n_step, dtype=float), (n_task, 1)),
                  time=np.tile(0.01 * scale * np.arange(n_step), (n_task, 1)))  # k = 0 adapts nothing
    test = metatest_dataset(arrays, limits, params, {**attrs, "stage": "meta_test"}, "exact", METATEST_VARS)
    paths = [tmp_path / f"{scenario}-{method}-{seed}-{stage}.nc" for stage in ("train", "test")]
    write_dataset(train, paths[0])
    write_dataset(test, paths[1])
    return paths


@pytest.fixture
def grid(tmp_path):
    """Scenario 'a': 3 tasks, 4 iterations, 5 steps, 1 constraint; 'b': 2 tasks, 6, 3, 2; seeds 0 and 1."""
    paths = []
    for seed in (0, 1):
        paths += traces(tmp_path, "a", "m1", seed, n_task=3, n_iter=4, n_step=5, p=1)
        paths += traces(tmp_path, "a", "m2", seed, n_task=3, n_iter=4, n_step=5, p=1, scale=2.0)
        paths += traces(tmp_path, "b", "m1", seed, n_task=2, n_iter=6, n_step=3, p=2)
    return paths


def test_summary_has_labelled_dims_and_pads_smaller_scenarios_with_nan(grid):
    summary = aggregate_traces(grid)
    assert dict(summary.sizes) == {"scenario": 2, "method_name": 2, "seed": 2, "iteration": 6, "task": 3, "constraint": 2,
                                   "step": 5}
    assert list(summary.scenario.values) == ["a", "b"] and list(summary.method_name.values) == ["m1", "m2"]
    assert list(summary.seed.values) == [0, 1] and list(summary.step.values) == list(range(5))
    assert summary.metatrain_reward.dims == ("scenario", "method_name", "seed", "iteration", "task")
    assert summary.metatest_cost.dims == ("scenario", "method_name", "seed", "task", "step", "constraint")
    assert summary.limit.dims == ("scenario", "seed", "task", "constraint")
    a = summary.metatrain_reward.sel({"scenario": "a", "method_name": "m2", "seed": 1})
    np.testing.assert_array_equal(a.isel(iteration=slice(0, 4)).values, 2.0 * (np.arange(4)[:, None] + np.arange(3)))
    assert np.isnan(a.isel(iteration=slice(4, None))).all()                      # a has 4 iterations, b 6
    b = summary.sel({"scenario": "b", "method_name": "m1"})
    assert np.isnan(b.metatest_reward.isel(task=2)).all() and np.isfinite(b.metatest_reward.isel(task=1, step=2)).all()
    assert np.isnan(b.metatest_reward.isel(step=slice(3, None))).all()
    assert np.isnan(summary.sel({"scenario": "b", "method_name": "m2"}).metatrain_reward).all()  # b has no m2 run
    assert np.isnan(summary.limit.sel(scenario="a", constraint=1)).all()
    assert summary.task_params.sel(scenario="b", seed=0).values.tolist() == ['{"task": 0}', '{"task": 1}', ""]
    assert summary.attrs["padded"] == 1 and '"b": {"constraint": 2' in summary.attrs["padding"]
    sources = json.loads(summary.attrs["sources"])
    assert len(sources) == len(grid) and {s["stage"] for s in sources} == {"meta_train", "meta_test"}
    assert summary.metatest_reward.attrs["units"] == "return"


def test_summary_rejects_duplicates_and_mismatched_task_files(tmp_path):
    first = traces(tmp_path / "x", "a", "m1", 0, 3, 2, 2, 1)
    again = traces(tmp_path / "y", "a", "m1", 0, 3, 2, 2, 1)
    with pytest.raises(ValueError, match="two meta_train traces for scenario a, method m1, seed 0"):
        aggregate_traces([*first, again[0]])
    other = traces(tmp_path / "z", "a", "m2", 0, 3, 2, 2, 1, limits=np.full((3, 1), 9.0))
    with pytest.raises(ValueError, match="different limits d"):
        aggregate_traces([*first, *other])


def test_aggregate_and_plot_commands_write_summary_and_figures(grid, tmp_path, capsys):
    out = tmp_path / "results" / "summary.nc"
    assert cli.main(["aggregate", *map(str, grid), "--out", str(out)]) == 0
    summary = read_dataset(out)
    assert summary.attrs["stage"] == "aggregate" and len(summary.attrs["code_hash"]) == 16
    xr.testing.assert_identical(summary.drop_attrs(), aggregate_traces(grid).drop_attrs())
    assert cli.main(["plot", "--summary", str(out), "--out-dir", str(tmp_path / "figures")]) == 0
    for name in plots.FIGURES:
        assert (tmp_path / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["aggregate", str(tmp_path / "missing.nc"), "--out", str(out)]) == 2
    assert "missing.nc does not exist" in capsys.readouterr().err


def test_cost_axis_uses_d_when_shared_and_cost_minus_d_when_per_task():
    cost = xr.DataArray(np.array([[[1.0], [3.0]]]), dims=("seed", "task", "constraint"))
    shared = xr.DataArray(np.full((1, 2, 1), 2.0), dims=("seed", "task", "constraint"))
    worst, line, label = plots.worst_cost(cost, shared)
    assert worst.values.tolist() == [3.0] and line == 2.0 and label == "max cost over tasks"
    per_task = xr.DataArray(np.array([[[4.0], [2.5]]]), dims=("seed", "task", "constraint"))
    worst, line, label = plots.worst_cost(cost, per_task)
    assert worst.values.tolist() == [0.5] and line == 0.0 and "cost - d" in label


def test_compute_times_are_medians_per_run(grid):
    times = plots.compute_times(aggregate_traces(grid))
    train = times["meta-training (per iteration)"]
    assert train.dims == ("scenario", "method_name", "seed")
    np.testing.assert_allclose(train.sel(scenario="a").values, [[0.1, 0.1], [0.2, 0.2]])
    # steps k = 1..4 take 0.01 k (scale 1) and 0.02 k (scale 2); k = 0 is left out
    np.testing.assert_allclose(times["meta-test (per adaptation step)"].sel(scenario="a", seed=0).values,
                               [0.025, 0.05])


def test_single_task_curves_are_over_the_learners_tasks_against_cumulative_env_steps(grid, tmp_path):
    """Learners ran on the first 2 of scenario a's 3 test tasks; the meta-test curves of
    single_task.png are restricted to those tasks and placed at their cumulative sample counts."""
    from safemeta.adaptation.cvpo import CVPO

    paths = list(grid)
    limits = np.arange(1, 4, dtype=float).reshape(3, 1)            # the grid's limits of scenario a
    for seed in (0, 1):
        for stage, label, n_task, n_step, variables in (("single_task", "cvpo", 2, 4, sequence_vars(CVPO)),
                                                         ("meta_test", "m3", 3, 3, METATEST_VARS)):
            sizes = {"step": n_step, "constraint": 1}
            arrays = {name: np.zeros([n_task, *(sizes[d] for d in var.dims)]) for name, var in variables.items()}
            if stage == "single_task":
                arrays.update(reward=np.tile(10.0 * np.arange(n_step), (n_task, 1)), cost=np.full((n_task, n_step, 1), 3.0 + seed),
                              env_steps=np.full((n_task, n_step), 100.0))
            else:   # reward k + 100 task: the mean over tasks 0, 1 is k + 50 (over all three, k + 100)
                arrays.update(reward=np.arange(n_step)[None] + 100.0 * np.arange(n_task)[:, None],
                              env_steps=np.full((n_task, n_step), 1000.0))
            attrs = {"scenario": "a", "seed": seed, "code_hash": "0" * 16, "config": "{}", "stage": stage,
                     ("learner" if stage == "single_task" else "method"): label}
            ds = metatest_dataset(arrays, limits[:n_task], [{"task": k} for k in range(n_task)], attrs, "sampled",
                                  variables)
            paths.append(tmp_path / f"{stage}-{seed}.nc")
            write_dataset(ds, paths[-1])
    summary = aggregate_traces(paths)
    curves = plots.sample_curves(summary, "a")
    assert set(curves) == {"cvpo", "m1 (meta-test)", "m2 (meta-test)", "m3 (meta-test)"}
    np.testing.assert_array_equal(curves["cvpo"]["env_steps"].sel(seed=0).values, [100, 200, 300, 400])
    np.testing.assert_array_equal(curves["cvpo"]["reward"].sel(seed=1).values, [0, 10, 20, 30])
    # per-task limits d = 1, 2 on the learners' tasks: the cost row is the mean over them of cost - d
    np.testing.assert_allclose(curves["cvpo"]["cost"].sel(seed=1).values, np.full(4, 4.0 - 1.5))
    meta = curves["m3 (meta-test)"]
    np.testing.assert_allclose(meta["reward"].sel(seed=0).values[:3], [50, 51, 52])
    np.testing.assert_allclose(meta["env_steps"].sel(seed=1).values[:3], [1000, 2000, 3000])
    assert plots.sample_curves(summary, "b") == {}                 # no learner ran on b
    assert len(plots.single_task_figure(summary).axes) == 2        # one column: scenario a
    empty = plots.single_task_figure(aggregate_traces(grid))
    assert "no single-task learner ran" in empty.axes[0].texts[0].get_text()
