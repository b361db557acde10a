"""What the workflow computes from its config at DAG time, computed once per config and code.

Every Snakemake invocation (a dry run, each SLURM job's own Snakemake) validates the config and
gives each job its params: the config part its stage reads (`config.stage_config`, canonical
JSON) and the code hash of the modules it runs (`stages.stage_code_hash`). Validation imports the
task modules (for `TaskDistribution.kinds`) and the algorithm classes (for their option checks),
and with them torch and MuJoCo, which is most of a dry run's time. `JobParams.load` therefore
keeps the result, for the whole grid, in a small JSON file keyed by everything it is computed
from: the config as given, the content of the package that validates it, the content of the
source tree whose files are hashed, and the Python and jsonschema versions. The same config and
code give the same key and the stored values; any change gives another key and a fresh
validation, so no check is skipped for a config or code it has not passed. Errors are not stored.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .atomic import write_text
from .config import canonical_json, config_hash
from .provenance import PACKAGE_DIR, code_hash

FORMAT = 1
KEEP = 8  # stored files per cache directory (the most recently used)
STAGES = {"methods": ("meta_train", "meta_test"), "learners": ("single_task",)}


def _job(stage: str, scenario: str | None, label: str | None) -> str:
    return f"{stage}/{scenario or ''}/{label or ''}"


class JobParams:
    """The validated config and, per (stage, scenario, label), the `config` and `code` params."""

    def __init__(self, config: dict[str, Any], jobs: dict[str, tuple[str | None, str]], root: Path) -> None:
        self.config, self._jobs, self._root = config, jobs, root

    @classmethod
    def compute(cls, raw: dict[str, Any], root: str | Path) -> "JobParams":
        """Validate `raw` (ConfigError naming the key) and compute every job's params."""
        from .config import validate_config
        from .plugins import STAGE_SECTION, grid
        from .stages import ROOTS

        root = Path(root).resolve()
        params = cls(validate_config(raw), {}, root)
        for scenario in params.config["scenarios"]:
            params._jobs[_job("tasks", scenario, None)] = params._compute("tasks", scenario, None)
        for section, stages in STAGES.items():
            for scenario, label in grid(params.config, section):
                for stage in stages:
                    params._jobs[_job(stage, scenario, label)] = params._compute(stage, scenario, label)
        for stage in ROOTS.keys() - {"tasks", *STAGE_SECTION}:  # the stages of the whole grid
            params._jobs[_job(stage, None, None)] = params._compute(stage, None, None)
        return params

    @classmethod
    def load(cls, raw: dict[str, Any], root: str | Path, cache_dir: str | Path) -> "JobParams":
        """The params of `raw`, read from `cache_dir` when computed before, else computed and stored."""
        root = Path(root).resolve()
        key = cache_key(raw, root)
        if key is None:  # a config JSON cannot hold exactly: compute every time
            return cls.compute(raw, root)
        path = Path(cache_dir) / f"params-{key}.json"
        try:
            stored = json.loads(path.read_text())
            found = cls(stored["config"], {k: tuple(v) for k, v in stored["jobs"].items()}, root)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        else:
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: kept by _prune
            return found
        params = cls.compute(raw, root)
        text = json.dumps({"config": params.config, "jobs": params._jobs})
        if json.loads(text) == {"config": params.config, "jobs": {k: list(v) for k, v in params._jobs.items()}}:
            write_text(path, text)  # only what JSON gives back unchanged
            _prune(Path(cache_dir))
        return params

    def _compute(self, stage: str, scenario: str | None, label: str | None) -> tuple[str | None, str]:
        from .config import stage_config
        from .stages import stage_code_hash

        part = None if scenario is None else canonical_json(stage_config(self.config, stage, scenario, label))
        return part, stage_code_hash(self.config, stage, scenario, label, root=self._root)

    def _get(self, stage: str, scenario: str | None, label: str | None) -> tuple[str | None, str]:
        job = _job(stage, scenario, label)
        if job not in self._jobs:  # a target outside the config's grid, named by hand
            self._jobs[job] = self._compute(stage, scenario, label)
        return self._jobs[job]

    def stage_json(self, stage: str, scenario: str, label: str | None = None) -> str:
        """Canonical JSON of the config part the stage reads (`config.stage_config`)."""
        return self._get(stage, scenario, label)[0]

    def code_hash(self, stage: str, scenario: str | None = None, label: str | None = None) -> str:
        """The code hash of the stage's files (`stages.stage_code_hash`)."""
        return self._get(stage, scenario, label)[1]


def cache_key(raw: dict[str, Any], root: Path) -> str | None:
    """Hash of everything `JobParams.compute` reads; None if JSON does not hold `raw` exactly."""
    try:
        if json.loads(canonical_json(raw)) != raw:  # e.g. integer keys, tuples
            return None
    except (TypeError, ValueError):
        return None
    fresh = code_hash.__wrapped__  # read now: code_hash caches per process, the key must see edits
    trees = [fresh()] + ([] if root == PACKAGE_DIR else [fresh(root=root)])
    return config_hash({"format": FORMAT, "config": raw, "code": trees, "python": sys.version,
                        "jsonschema": version("jsonschema")})


def _prune(cache_dir: Path) -> None:
    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # removed meanwhile by another job
            return 0.0

    for old in sorted(cache_dir.glob("params-*.json"), key=used, reverse=True)[KEEP:]:
        old.unlink(missing_ok=True)
