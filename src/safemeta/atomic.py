"""Atomic file writes: write to a temporary file beside the target, then rename over it.

A reader (or Snakemake after a kill) never sees a half-written output: either the old file (or
none) or the complete new one. A kill during the write (SIGKILL, a lost node) leaves the
temporary file `.<name>.<random>.tmp` behind; `remove_leftovers` deletes those of a target, and
every command calls it for the files it is about to write (one writer per file: Snakemake never
runs two jobs for one output).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success rename it to `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=SUFFIX, dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give outputs the usual mode
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def leftovers(path: str | Path) -> list[Path]:
    """Temporary files that torn writes of `path` left beside it."""
    target = Path(path)
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.glob(f".{target.name}.*{SUFFIX}") if p.is_file())


def remove_leftovers(path: str | Path) -> list[Path]:
    """Delete the temporary files of torn writes of `path`; returns those removed."""
    removed = []
    for stale in leftovers(path):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed.append(stale)
    return removed


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
