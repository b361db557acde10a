"""Provenance attributes carried by every output: resolved config, seed, version, code hash."""
from __future__ import annotations

import datetime as _dt
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import __version__
from .config import canonical_json

PACKAGE_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def code_hash(*relpaths: str, root: str | Path | None = None) -> str:
    """sha256 (16 hex) of package source files: the given ones (relative to the package) or all.

    Hashes paths and contents of *.py, *.yaml and *.xml files, so it changes exactly when the
    code changes, not when files are touched. `root` is the package directory to read (default:
    this installed package; the workflow passes the source tree next to its Snakefile).
    """
    base = PACKAGE_DIR if root is None else Path(root)
    if relpaths:
        files = [base / p for p in relpaths]
    else:
        files = sorted(f for ext in ("*.py", "*.yaml", "*.xml") for f in base.rglob(ext)
                       if "__pycache__" not in f.parts)
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(base)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def provenance_attrs(config: dict[str, Any], seed: int, inputs: dict[str, Any] | None = None,
                     **labels: Any) -> dict[str, Any]:
    """netCDF-safe attributes (str/int) describing how an output was made: the config part, seed,
    package version and code hash, the labels (stage, scenario, ...) and, as JSON, what the
    input files held (`inputs.input_identity`), read from the files themselves."""
    attrs = {"safemeta_version": __version__, "code_hash": code_hash(), "seed": int(seed),
             "config": canonical_json(config),
             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if inputs:
        attrs["inputs"] = canonical_json(inputs)
    attrs.update({k: str(v) for k, v in labels.items()})
    return attrs
