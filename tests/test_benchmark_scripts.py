"""The arithmetic of the benchmark scripts that turn measurements into reported numbers:
the grid's CPU hours from unit costs (paper_cpu_hours.py) and the paired comparison of two runs
(compare_runs.py). The measurements themselves are the benchmarks' job, not the tests'."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from safemeta.config import validate_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_runs  # noqa: E402
import paper_cpu_hours  # noqa: E402


def _config() -> dict:
    return validate_config({
        "seeds": [0, 1, 2],
        "scenarios": {
            "tabular_random": {"distribution": "tabular_random", "n_train_tasks": 4, "n_test_tasks": 6},
            "tabular_grid": {"distribution": "tabular_grid", "n_train_tasks": 4, "n_test_tasks": 7},
        },
        "methods": {"safemeta": {"algorithm": "safemeta"},
                    "safemeta_delta1": {"algorithm": "safemeta", "adaptation": {"delta": 1.0},
                                        "scenarios": ["tabular_grid"]},
                    "maml_penalty": {"algorithm": "maml_penalty", "scenarios": ["tabular_random"]}},
        "learners": {"dual_pgd": {"algorithm": "dual_pgd", "iterations": 10, "scenarios": ["tabular_grid"]},
                     "few": {"algorithm": "dual_pgd", "iterations": 4, "n_tasks": 2}},
    })


def test_job_hours_counts_every_job_of_the_grid_once_per_seed():
    full = _config()
    units = {
        ("meta", "tabular_random", "safemeta"): {"train_full_h": 1.0, "test_full_h": 0.25, "lived": 1.0},
        ("meta", "tabular_random", "maml_penalty"): {"train_full_h": 2.0, "test_full_h": 0.5, "lived": 1.0},
        ("meta", "tabular_grid", "safemeta"): {"train_full_h": 4.0, "test_full_h": 1.0, "lived": 0.25},
        ("learner", "tabular_grid", "dual_pgd"): {"startup": 36.0, "initial": 3.6, "iteration": 36.0},
        ("learner", "tabular_random", "few"): {"startup": 0.0, "initial": 0.0, "iteration": 360.0},
        ("learner", "tabular_grid", "few"): {"startup": 0.0, "initial": 0.0, "iteration": 720.0},
    }
    hours = paper_cpu_hours.job_hours(full, ["tabular_random", "tabular_grid"], units)
    assert hours[("meta_train", "tabular_random", "safemeta")] == pytest.approx(3 * 1.0)
    assert hours[("meta_test", "tabular_random", "maml_penalty")] == pytest.approx(3 * 0.5)
    # the delta sweep shares safemeta's unit costs on its scenario, and runs only there
    assert hours[("meta_train", "tabular_grid", "safemeta_delta1")] == pytest.approx(3 * 4.0)
    assert ("meta_train", "tabular_random", "safemeta_delta1") not in hours
    # n_tasks null: every test task (7 on tabular_grid); startup once per job
    assert hours[("single_task", "tabular_grid", "dual_pgd")] == pytest.approx(3 * (36 + 7 * (3.6 + 10 * 36)) / 3600)
    assert hours[("single_task", "tabular_random", "few")] == pytest.approx(3 * 2 * 4 * 360 / 3600)
    assert hours[("single_task", "tabular_grid", "few")] == pytest.approx(3 * 2 * 4 * 720 / 3600)
    assert len(hours) == 2 * 4 + 3          # (train, test) x 4 method pairs + 3 learner pairs
    # full length: the meta jobs of a scenario whose early episodes end at a quarter of the horizon x 4
    long = paper_cpu_hours.job_hours(full, ["tabular_random", "tabular_grid"], units, full_length=True)
    assert long[("meta_test", "tabular_grid", "safemeta_delta1")] == pytest.approx(3 * 1.0 * 4)
    assert long[("meta_train", "tabular_random", "maml_penalty")] == pytest.approx(hours[("meta_train", "tabular_random", "maml_penalty")])
    assert long[("single_task", "tabular_grid", "dual_pgd")] == pytest.approx(hours[("single_task", "tabular_grid", "dual_pgd")])
    only = paper_cpu_hours.job_hours(full, ["tabular_random"], units)
    assert {k[1] for k in only} == {"tabular_random"}


def test_paired_difference_and_its_standard_error():
    before = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    after = before + np.array([0.1, 0.2, 0.1, 0.2, 5.0])
    mean_b, mean_a, diff, se = compare_runs.paired(before, after)
    assert mean_b == pytest.approx(2.5) and mean_a == pytest.approx(2.65)
    assert diff == pytest.approx(0.15)
    assert se == pytest.approx(np.std([0.1, 0.2, 0.1, 0.2], ddof=1) / 2)
