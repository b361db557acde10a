# Content hashes of the package code each stage runs: a rule's `code` param. Snakemake does not
# track code imported from a package; with these, editing a module reruns exactly the rules that
# run it, and `touch` reruns nothing. Files are read from the source tree next to the Snakefile
# (workflow.basedir). A stage runs the CLI entry files (hashed alone: cli.py imports every
# stage), the roots below and every package module they import, and the scenario's task module.
import ast
from functools import lru_cache

from safemeta.provenance import code_hash

PACKAGE = Path(workflow.basedir) / "src" / "safemeta"
ENTRY = ["cli.py", "config.py", "config.schema.yaml", "provenance.py", "atomic.py", "__init__.py"]
STAGE_ROOTS = {
    "tasks": ["tasks/__init__.py"],
    "meta_train": ["tasks/__init__.py", "devices.py", "policies.py", "results.py", "meta", "adaptation"],
    "meta_test": ["tasks/__init__.py", "policies.py", "results.py", "evaluate.py"],
    "single_task": ["tasks/__init__.py", "devices.py", "results.py", "learners", "adaptation"],
    "aggregate": ["results.py"],
    "plot": ["results.py", "plots.py"],
}


def _module_file(dotted):
    """The package file of a dotted module name under safemeta, or None."""
    base = PACKAGE.joinpath(*dotted.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path):
    """Package modules that a file imports (at any depth of the file, relative or absolute)."""
    package = path.relative_to(PACKAGE.parent).parts[:-1]  # the file's own package
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
        found.update(f for f in map(_module_file, (n for n in names if n.split(".")[0] == "safemeta")) if f)
    return found


def _expand(relpath):
    path = PACKAGE / relpath
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


@lru_cache(maxsize=None)
def stage_files(stage, scenario=None):
    """Package files (relative to src/safemeta) whose code `stage` runs for `scenario`."""
    todo = [f for root in STAGE_ROOTS[stage] for f in _expand(root)]
    if scenario is not None:
        todo.append(task_module(config["scenarios"][scenario]["distribution"]))
    seen = set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_imports(path) - seen)
    seen.update(PACKAGE / f for f in ENTRY)
    return tuple(sorted(str(f.relative_to(PACKAGE)) for f in seen))


def task_module(distribution):
    """The file of a registered task distribution's module."""
    from safemeta.tasks import distribution_class

    return _module_file(distribution_class(distribution).__module__)


def stage_code_hash(stage, scenario=None):
    """sha256 (16 hex) of the paths and contents of the files `stage` runs (see stage_files)."""
    return code_hash(*stage_files(stage, scenario), root=PACKAGE)
