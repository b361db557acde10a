"""The comparison outputs (table, comparison.png, compute times) on traces with known values."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from safemeta import cli, plots
from safemeta.adaptation.dual_pgd import ExactDualPGD
from safemeta.comparison import comparison_table
from safemeta.evaluate import sequence_vars
from safemeta.meta.safe_meta_exact import ExactSafeMeta
from safemeta.results import aggregate_traces, metatest_dataset, metatrain_dataset, write_dataset

TRAIN_VARS, TEST_VARS = ExactSafeMeta.trace_vars(ExactDualPGD), sequence_vars(ExactDualPGD)
N_TASK, N_STEP, LIMIT = 2, 4, 1.0
# method -> (algorithm, final meta-test reward per seed, meta-test cost excess over d per step, times)
METHODS = {
    "ours": ("safemeta", [3.0, 5.0], [-0.5, -0.1, -0.2, -0.3], 0.3, 0.05),
    "maml": ("maml_penalty", [1.0, 2.0], [0.5, 0.05, -0.1, 0.2], 0.2, 0.01),
    "cpo": ("meta_cpo", [2.0, 2.5], [0.3, -0.2, -0.2, -0.2], 1.0, 0.10),
    "crpo": ("meta_crpo", [-1.0, 0.0], [0.0, 1.0, 1.0, 1.0], 0.7, 0.02),
}


def _traces(tmp_path, method, seed):
    algorithm, finals, excess, t_iter, t_step = METHODS[method]
    attrs = {"scenario": "a", "method": method, "seed": seed, "code_hash": "0" * 16,
             "config": json.dumps({"methods": {method: {"algorithm": algorithm}}})}
    limits, params = np.full((N_TASK, 1), LIMIT), [{"task": k} for k in range(N_TASK)]
    records = []
    for i in range(3):
        rec = {"iteration": i, "time_compute": t_iter * (1 + 0.1 * (i == 1))}      # median = t_iter
        if algorithm != "meta_crpo":                                              # no meta-training curve
            rec.update(reward=np.full(N_TASK, finals[seed] + i - 2.0), cost=np.full((N_TASK, 1), 0.5))
        records.append(rec)
    train = metatrain_dataset(records, limits, params, {**attrs, "stage": "meta_train"}, "exact", TRAIN_VARS)
    arrays = {name: np.zeros([N_TASK, *({"step": N_STEP, "constraint": 1}[d] for d in var.dims)])
              for name, var in TEST_VARS.items()}
    reward = np.tile(np.linspace(finals[seed] - 1, finals[seed], N_STEP), (N_TASK, 1))
    reward[1] += 1.0                                    # task 1 one better, task 0 one worse: same mean
    reward[0] -= 1.0
    cost = np.zeros((N_TASK, N_STEP, 1))
    cost[0, :, 0] = LIMIT + np.asarray(excess)          # task 0 holds the maximal cost
    cost[1, :, 0] = LIMIT - 2.0
    cost_se = np.full((N_TASK, N_STEP, 1), 0.1)         # d + 2 SE = d + 0.2
    arrays.update(reward=reward, cost=cost, cost_se=cost_se, time=np.tile(np.r_[0.0, np.full(N_STEP - 1, t_step)],
                                                                          (N_TASK, 1)))
    test = metatest_dataset(arrays, limits, params, {**attrs, "stage": "meta_test"}, "exact", TEST_VARS)
    paths = [tmp_path / f"{method}-{seed}-{s}.nc" for s in ("train", "test")]
    write_dataset(train, paths[0])
    write_dataset(test, paths[1])
    return paths


@pytest.fixture
def summary_path(tmp_path):
    paths = [p for method in METHODS for seed in (0, 1) for p in _traces(tmp_path, method, seed)]
    summary = aggregate_traces(paths)
    path = tmp_path / "summary.nc"
    write_dataset(summary, path)
    return path


def test_table_computes_rewards_ratios_violations_and_time_ratios(summary_path):
    from safemeta.results import read_dataset

    table = comparison_table(read_dataset(summary_path)).set_index("method")
    assert list(table["algorithm"]) == ["meta_cpo", "meta_crpo", "maml_penalty", "safemeta"]   # summary order
    assert (table["seeds"] == 2).all() and (table["metatest_steps"] == N_STEP).all()
    ours = table.loc["ours"]
    assert ours["final_reward_mean"] == pytest.approx(4.0) and ours["final_reward_se"] == pytest.approx(1.0)
    assert (table["best_baseline"] == "cpo").all()                # best baseline: 2.25, above maml's 1.5
    assert ours["reward_ratio_to_best_baseline"] == pytest.approx(4.0 / 2.25)
    assert ours["reward_gain_over_best_baseline"] == pytest.approx((4.0 - 2.25) / 2.25)
    assert table.loc["crpo", "reward_gain_over_best_baseline"] == pytest.approx((-0.5 - 2.25) / 2.25)
    assert ours["final_metatrain_reward_mean"] == pytest.approx(4.0)     # last evaluated iteration
    assert ours["metatrain_gain_over_best_baseline"] == pytest.approx((4.0 - 2.25) / 2.25)
    assert np.isnan(table.loc["crpo", "final_metatrain_reward_mean"])
    # steps over d: excess > 0; over d + 2 SE: excess > 0.2 (the same in both seeds)
    assert list(table.loc[["ours", "maml", "cpo", "crpo"], "steps_over_d"]) == [0, 3, 1, 3]
    assert list(table.loc[["ours", "maml", "cpo", "crpo"], "steps_over_d_2se"]) == [0, 1, 1, 3]
    assert ours["metatrain_iteration_s"] == pytest.approx(0.3) and ours["metatest_step_s"] == pytest.approx(0.05)
    assert ours["metatrain_time_ratio_to_meta_cpo"] == pytest.approx(0.3)
    assert ours["metatest_time_ratio_to_meta_cpo"] == pytest.approx(0.5)
    assert np.isnan(table.loc["crpo", "metatrain_iteration_s"])          # no meta-training stage, no bar
    assert table.loc["crpo", "metatest_step_s"] == pytest.approx(0.02)


def test_compare_command_writes_table_page_and_figure(summary_path, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["compare", "--summary", str(summary_path), "--csv", str(out / "c.csv"), "--html",
                     str(out / "c.html"), "--figure", str(out / "comparison.png")]) == 0
    table = pd.read_csv(out / "c.csv")
    assert len(table) == 4 and "reward_ratio_to_best_baseline" in table
    assert "<table" in (out / "c.html").read_text()
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparison_figure_has_the_papers_four_columns_and_no_metatraining_curve_for_meta_crpo(summary_path):
    from safemeta.results import read_dataset

    fig = plots.comparison_figure(read_dataset(summary_path))
    axes = fig.axes
    assert len(axes) == 4
    labels = [[line.get_label() for line in ax.get_lines()] for ax in axes]
    assert "crpo" not in labels[0] and "crpo" not in labels[1] and "crpo" in labels[2] and "crpo" in labels[3]
    assert "ours" in labels[0] and "limit d" in labels[1] and "limit d" in labels[3]
    plots.plt.close(fig)
