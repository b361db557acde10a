"""The Safety-Gymnasium worker environment: where it lives, how `safemeta sg-setup` builds it.

A Python 3.10 virtual environment with exactly the pins of `assets/sg-worker.lock`
(safety-gymnasium 1.0.0, mujoco 2.3.3, gymnasium 0.28.1, numpy 1.23.5, ...), installed with
`--no-deps`. Its default place is `~/.cache/safemeta/sg-worker-<first 12 hex digits of the lock's
sha256>` (`$XDG_CACHE_HOME` is honoured), so every checkout with the same lock shares one build
and a changed lock builds a new one; `$SAFEMETA_SG_ENV` names another directory. A build is
complete once its marker file (`safemeta-sg-worker.json`: the lock's hash and the versions the
worker's self-check reported) exists; an incomplete one is removed and rebuilt.

The interpreter: `--python`, else the first Python 3.10 among `python3.10` on PATH and pyenv's
`$PYENV_ROOT/versions/3.10.*` (each candidate is asked for its version; a pyenv shim that is not
activated does not count).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..atomic import write_text
from . import sg_worker
from .base import BatchEnvError

LOCK = Path(__file__).parent / "assets" / "sg-worker.lock"
MARKER = "safemeta-sg-worker.json"
WORKER_PYTHON = (3, 10)


class SetupError(BatchEnvError):
    """The worker environment cannot be built (no Python 3.10, pip failed, the check failed)."""


def lock_hash() -> str:
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()


def default_prefix() -> Path:
    if os.environ.get("SAFEMETA_SG_ENV"):
        return Path(os.environ["SAFEMETA_SG_ENV"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "safemeta" / f"sg-worker-{lock_hash()[:12]}"


def _python_of(prefix: Path) -> Path:
    return prefix / "bin" / "python"


def worker_python(prefix: Path | None = None) -> Path | None:
    """The worker environment's interpreter if a complete build for this lock is there, else None."""
    prefix = default_prefix() if prefix is None else prefix
    try:
        marker = json.loads((prefix / MARKER).read_text())
    except (OSError, ValueError):
        return None
    python = _python_of(prefix)
    return python if marker.get("lock_sha256") == lock_hash() and python.exists() else None


def missing_message(prefix: Path | None = None) -> str:
    prefix = default_prefix() if prefix is None else prefix
    return (f"the Safety-Gymnasium worker environment (Python 3.10, safety-gymnasium 1.0.0) is not built at "
            f"{prefix}: run `safemeta sg-setup` (or set SAFEMETA_SG_ENV to where it was built)")


def python_version(python: str) -> tuple[int, int] | None:
    """(major, minor) of an interpreter, or None if it does not run."""
    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    parts = out.stdout.split()
    return (int(parts[0]), int(parts[1])) if out.returncode == 0 and len(parts) == 2 else None


def find_python(explicit: str | None = None) -> str:
    """The interpreter to build the worker environment with (see the module docstring)."""
    want = ".".join(map(str, WORKER_PYTHON))
    if explicit:
        version = python_version(explicit)
        if version is None:
            raise SetupError(f"--python {explicit}: cannot run it")
        if version != WORKER_PYTHON:
            raise SetupError(f"--python {explicit} is Python {version[0]}.{version[1]}; the worker needs Python {want} "
                             "(safety-gymnasium 1.0.0 does not import on 3.11+)")
        return explicit
    root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    candidates = [shutil.which(f"python{want}")]
    candidates += sorted(glob.glob(f"{root}/versions/{want}.*/bin/python{want}"), reverse=True)
    for python in filter(None, candidates):
        if python_version(python) == WORKER_PYTHON:
            return python
    raise SetupError(f"no Python {want} found (tried python{want} on PATH and {root}/versions/{want}.*): install one, "
                     f"e.g. `pyenv install {want}`, or pass --python")


def setup(python: str | None = None, prefix: Path | None = None, force: bool = False, log=sys.stderr) -> Path:
    """Build (or find) the worker environment; returns its directory. Output of pip goes to
    `<prefix>/setup.log`."""
    prefix = (default_prefix() if prefix is None else Path(prefix)).resolve()
    if not force and worker_python(prefix) is not None:
        print(f"Safety-Gymnasium worker environment up to date: {prefix}", file=log)
        return prefix
    interpreter = find_python(python)
    start = time.perf_counter()
    if prefix.exists():
        shutil.rmtree(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the Safety-Gymnasium worker environment in {prefix} with {interpreter}", file=log, flush=True)
    logfile = prefix.parent / f"{prefix.name}.setup.log"
    steps = [[interpreter, "-m", "venv", str(prefix)],
             [str(_python_of(prefix)), "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
              "-r", str(LOCK)],
             [str(_python_of(prefix)), "-m", "pip", "check"]]
    with open(logfile, "w") as out:
        for cmd in steps:
            print("+ " + " ".join(cmd), file=out, flush=True)
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise SetupError(f"`{' '.join(cmd[:4])} ...` failed; see {logfile}")
    check = subprocess.run([str(_python_of(prefix)), sg_worker.__file__, "--check"], capture_output=True, text=True,
                           timeout=600)
    if check.returncode != 0:
        tail = check.stderr.strip().splitlines()[-1:] or ["no output"]
        raise SetupError(f"the worker's self-check failed in {prefix}: {tail[0]}")
    report = json.loads(check.stdout.strip().splitlines()[-1])
    marker = {"lock_sha256": lock_hash(), "interpreter": interpreter, **report,
              "build_seconds": round(time.perf_counter() - start, 1)}
    shutil.move(str(logfile), str(prefix / "setup.log"))
    write_text(prefix / MARKER, json.dumps(marker, indent=1))   # last: marks the build complete
    v = report["versions"]
    print(f"Safety-Gymnasium worker environment ready: {prefix} (Python {v['python']}, safety-gymnasium "
          f"{v['safety_gymnasium']}, mujoco {v['mujoco']}; built in {marker['build_seconds']} s)", file=log)
    return prefix
