"""Which package files each stage's code hash covers (the workflow's `code` params)."""
from __future__ import annotations

import shutil

from safemeta.config import load_config
from safemeta import stages
from safemeta.provenance import PACKAGE_DIR, code_hash
from safemeta.stages import stage_code_hash, stage_files

CONFIG = load_config({
    "scenarios": {"t": {"distribution": "tabular_random", "methods": {"safemeta": {"meta_gradient": "eq6"}}},
                  "c": {"distribution": "half_cheetah_vel"}},
    "methods": {"safemeta": {}},
    "learners": {"scratch": {"algorithm": "dual_pgd"}},
})


def test_each_stage_covers_the_modules_of_its_task_and_its_registered_algorithms():
    train = set(stage_files(CONFIG, "meta_train", "t", "safemeta"))
    assert {"meta/safe_meta_exact.py", "meta/safe_meta.py", "adaptation/dual_pgd.py", "tasks/tabular.py",
            "evaluate.py", "cli.py"} <= train
    assert not {"plots.py", "tasks/locomotion.py", "learners/base.py"} & train
    test = set(stage_files(CONFIG, "meta_test", "c", "safemeta"))
    assert {"evaluate.py", "adaptation/dual_pgd.py", "tasks/locomotion.py", "tasks/mujoco_batch.py"} <= test
    assert "tasks/tabular.py" not in test or "adaptation/dual_pgd.py" in test   # dual_pgd imports tabular evaluation
    single = set(stage_files(CONFIG, "single_task", "t", "scratch"))
    assert {"learners/dual_pgd.py", "learners/base.py", "adaptation/dual_pgd.py"} <= single
    tasks = set(stage_files(CONFIG, "tasks", "c"))
    assert "tasks/locomotion.py" in tasks and not any(f.startswith(("meta/", "adaptation/")) for f in tasks)
    assert set(stage_files(CONFIG, "plot")) >= {"plots.py", "results.py"}


def test_the_hash_follows_content_not_timestamps(tmp_path):
    root = tmp_path / "safemeta"
    shutil.copytree(PACKAGE_DIR, root, ignore=shutil.ignore_patterns("__pycache__"))
    before = stage_code_hash(CONFIG, "meta_test", "t", "safemeta", root=root)
    (root / "plots.py").write_text((root / "plots.py").read_text() + "\n# not run by meta_test\n")
    code_hash.cache_clear(), stages._imports.cache_clear()   # hashes are cached per process (one DAG build)
    assert stage_code_hash(CONFIG, "meta_test", "t", "safemeta", root=root) == before
    (root / "adaptation" / "dual_pgd.py").write_text((root / "adaptation" / "dual_pgd.py").read_text() + "\n# edit\n")
    code_hash.cache_clear(), stages._imports.cache_clear()   # hashes are cached per process (one DAG build)
    assert stage_code_hash(CONFIG, "meta_test", "t", "safemeta", root=root) != before
