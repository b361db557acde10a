"""The workflow's DAG-time values kept per config and code (safemeta/job_params.py): stored values
equal freshly computed ones, any change of config or code is a new key, errors are not stored,
and a stored config is loaded without importing torch or MuJoCo (the point of the cache)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from safemeta import job_params
from safemeta.config import ConfigError
from safemeta.job_params import JobParams, cache_key
from safemeta.provenance import PACKAGE_DIR

REPO = Path(__file__).resolve().parents[1]
PAPER = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())


def test_stored_params_equal_computed_ones(tmp_path):
    fresh = JobParams.compute(PAPER, PACKAGE_DIR)
    JobParams.load(PAPER, PACKAGE_DIR, tmp_path)
    stored = JobParams.load(PAPER, PACKAGE_DIR, tmp_path)
    assert len(list(tmp_path.glob("params-*.json"))) == 1
    assert stored.config == fresh.config and list(stored.config["scenarios"]) == list(PAPER["scenarios"])
    methods = sum(len(m.get("scenarios") or PAPER["scenarios"]) for m in PAPER["methods"].values())
    learners = sum(len(m.get("scenarios") or PAPER["scenarios"]) for m in PAPER.get("learners", {}).values())
    assert stored._jobs == fresh._jobs
    assert len(fresh._jobs) == len(PAPER["scenarios"]) + 2 * methods + learners + 3  # + aggregate, plot, compare
    assert stored.stage_json("meta_test", "half_cheetah_vel", "safemeta_delta1") == \
        fresh.stage_json("meta_test", "half_cheetah_vel", "safemeta_delta1")


def test_any_change_of_config_or_code_is_another_key(tmp_path):
    root = tmp_path / "safemeta"
    shutil.copytree(PACKAGE_DIR, root, ignore=shutil.ignore_patterns("__pycache__"))
    key = cache_key(PAPER, root)
    assert key == cache_key(json.loads(json.dumps(PAPER)), root)
    edited = {**PAPER, "metatest": {**PAPER["metatest"], "adapt_steps": 21}}
    assert cache_key(edited, root) != key
    (root / "meta" / "safe_meta.py").write_text((root / "meta" / "safe_meta.py").read_text() + "\n# edit\n")
    assert cache_key(PAPER, root) != key
    assert cache_key({**PAPER, "seeds": (0, 1)}, root) is None  # not JSON exactly: never stored


def test_a_bad_config_raises_and_stores_nothing(tmp_path):
    bad = {**PAPER, "metatrain": {**PAPER["metatrain"], "iterations": 0}}
    with pytest.raises(ConfigError, match="metatrain.iterations"):
        JobParams.load(bad, PACKAGE_DIR, tmp_path)
    assert not list(tmp_path.glob("*"))


def test_old_files_are_pruned(tmp_path, monkeypatch):
    monkeypatch.setattr(job_params, "KEEP", 2)
    tiny = yaml.safe_load((REPO / ".test" / "config" / "config.yaml").read_text())
    for steps in (1, 2, 3):
        JobParams.load({**tiny, "metatest": {"adapt_steps": steps}}, PACKAGE_DIR, tmp_path)
    assert len(list(tmp_path.glob("params-*.json"))) == 2


def test_a_stored_config_loads_without_torch_or_mujoco(tmp_path):
    script = (f"import sys, yaml; from safemeta.job_params import JobParams; "
              f"JobParams.load(yaml.safe_load(open({str(REPO / 'config' / 'paper.yaml')!r})), "
              f"{str(PACKAGE_DIR)!r}, {str(tmp_path)!r}); "
              f"print(sorted(m for m in ('torch', 'mujoco') if m in sys.modules))")
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert first.strip() == "['mujoco', 'torch']" and second.strip() == "[]"
