"""Which package files each pipeline stage runs, and their content hash (the rules' `code` param).

Snakemake does not track code imported from a package. With these hashes, editing a module
reruns exactly the rules that run it, and `touch` reruns nothing. A stage runs the CLI entry
files (hashed alone: cli.py imports every stage), its own roots, the module of the scenario's
task distribution, the modules of the registered algorithms it runs (found from the registries'
"module:Class" names, so a new algorithm folder needs no list here) and every package module
those import, at any depth.
"""
from __future__ import annotations

import ast
import re
import tomllib
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .provenance import PACKAGE_DIR, code_hash

ENTRY = ("cli.py", "config.py", "config.schema.yaml", "plugins.py", "registry.py", "provenance.py", "atomic.py",
         "__init__.py")
ROOTS = {
    "tasks": ("tasks/__init__.py",),
    "meta_train": ("tasks/__init__.py", "devices.py", "scenario.py", "policies.py", "results.py", "meta/base.py"),
    "meta_test": ("tasks/__init__.py", "devices.py", "scenario.py", "policies.py", "results.py", "evaluate.py"),
    "single_task": ("tasks/__init__.py", "devices.py", "scenario.py", "policies.py", "results.py", "learners/base.py"),
    "aggregate": ("results.py",),
    "plot": ("results.py", "plots.py"),
    "compare": ("results.py", "plots.py", "comparison.py"),
}


def _module_file(base: Path, dotted: str) -> Path | None:
    """The package file of a dotted module name under safemeta, or None."""
    path = base.joinpath(*dotted.split(".")[1:])
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@lru_cache(maxsize=None)
def _imports(path: Path, base: Path) -> frozenset[Path]:
    """Package modules that a file imports (anywhere in the file, relative or absolute)."""
    package = ("safemeta", *path.relative_to(base).parts[:-1])  # the file's own package
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (prefix, node.module or "") if p)
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        found.update(f for f in (_module_file(base, n) for n in names if n.split(".")[0] == "safemeta") if f)
    return frozenset(found)


def _registered_files(config: dict[str, Any], stage: str, scenario: str | None, label: str | None) -> list[str]:
    """Package-relative files of the task module and the algorithms a job of `stage` runs."""
    from .adaptation import OPERATORS
    from .plugins import SECTIONS, STAGE_SECTION, stage_operator
    from .tasks import module_file

    if scenario is None:
        return []
    files = [module_file(config["scenarios"][scenario]["distribution"])]
    if stage in STAGE_SECTION and label is not None:
        registry, _ = SECTIONS[STAGE_SECTION[stage]]
        files += registry.module_files(config[STAGE_SECTION[stage]][label]["algorithm"])
        files += OPERATORS.module_files(stage_operator(config, stage, scenario, label))
    return [str(f.relative_to(PACKAGE_DIR)) for f in files]


@lru_cache(maxsize=None)
def _closure(stage: str, extra: tuple[str, ...], base: Path) -> tuple[str, ...]:
    todo = [base / f for root in (*ROOTS[stage], *extra) for f in _expand(base / root)]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_imports(path, base) - seen)
    seen.update(base / f for f in ENTRY)
    return tuple(sorted(str(f.relative_to(base)) for f in seen))


def _expand(path: Path) -> list[Path]:
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def stage_files(config: dict[str, Any], stage: str, scenario: str | None = None, label: str | None = None,
                root: str | Path | None = None) -> tuple[str, ...]:
    """Files (relative to the package) whose code a job of `stage` runs for `scenario` and the
    method or learner `label`, read from the package directory `root` (default: this one)."""
    base = PACKAGE_DIR if root is None else Path(root).resolve()
    return _closure(stage, tuple(_registered_files(config, stage, scenario, label)), base)


def stage_code_hash(config: dict[str, Any], stage: str, scenario: str | None = None, label: str | None = None,
                    root: str | Path | None = None) -> str:
    """sha256 (16 hex) of the paths and contents of the files of `stage_files`."""
    return code_hash(*stage_files(config, stage, scenario, label, root), root=root)


def dependency_versions(pyproject: str | Path) -> str:
    """The installed versions of the runtime dependencies a pyproject.toml declares, as
    "name==version" sorted by name (e.g. "numpy==2.4.6 ... torch==2.13.0+cpu"). A local version
    suffix stays: CPU and CUDA builds of torch can give different numbers."""
    try:
        declared = tomllib.loads(Path(pyproject).read_text())["project"]["dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read the dependencies of {pyproject}: {exc}") from None
    found = []
    for requirement in declared:
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)[0]
        try:
            found.append(f"{name.lower()}=={version(name)}")
        except PackageNotFoundError:
            found.append(f"{name.lower()} (not installed)")
    return " ".join(sorted(found))
