"""Lazy registries of algorithm implementations: name -> "module:Class" targets.

One registry per plugin kind (adaptation operators, meta-learners, single-task learners), in the
style of `tasks/__init__.py`: targets are strings, so listing names, checking a config and
finding the source file of an algorithm (the workflow's code hashes) import nothing; the class
is imported on first use. A name may have several implementations for different scenario kinds
(for example the exact tabular and the sampled version of one algorithm); `implementation`
picks the first one that runs on the scenario, in the order of the scenario's preference.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent


class OptionError(ValueError):
    """An option value an implementation cannot use (raised by `check_options`): `option` is its
    key, the message says why; the config check reports it with the key's full path."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


class Registry:
    """Names of one plugin kind and the classes implementing them (imported on demand)."""

    def __init__(self, package: str, what: str, entries: dict[str, tuple[str, ...]]) -> None:
        self.package, self.what = package, what
        self._entries: dict[str, tuple[str, ...]] = {}
        for name, targets in entries.items():
            self.register(name, *targets)

    def register(self, name: str, *targets: str) -> None:
        """Add `name` with one or more "module:Class" targets (modules relative to the package)."""
        if not targets or any(t.count(":") != 1 for t in targets):
            raise ValueError(f"{self.what} {name!r}: targets must be 'module:Class' strings, got {targets!r}")
        if name in self._entries and self._entries[name] != tuple(targets):
            raise ValueError(f"{self.what} name {name!r} is already registered to {', '.join(self._entries[name])}")
        self._entries[name] = tuple(targets)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def targets(self, name: str) -> tuple[str, ...]:
        if name not in self._entries:
            raise KeyError(f"unknown {self.what} {name!r}; known: {', '.join(self.names()) or 'none'}")
        return self._entries[name]

    def module_files(self, name: str) -> list[Path]:
        """Source files of the modules implementing `name` (no import)."""
        files = []
        for target in self.targets(name):
            parts = target.split(":")[0].split(".")
            base = PACKAGE_DIR.joinpath(*self.package.split(".")[1:], *parts)
            files.append(base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py")
        return files

    def classes(self, name: str) -> list[type]:
        """Every implementation class of `name` (imports their modules)."""
        out = []
        for target in self.targets(name):
            module, cls = target.split(":")
            out.append(getattr(importlib.import_module(f"{self.package}.{module}"), cls))
        return out

    def implementation(self, name: str, kinds: tuple[str, ...]) -> type:
        """The implementation of `name` for a scenario offering `kinds` (in order of preference).

        Raises LookupError naming what the scenario offers and what the implementations need.
        """
        classes = self.classes(name)
        for kind in kinds:
            for cls in classes:
                if kind in cls.kinds:
                    return cls
        needs = sorted({k for cls in classes for k in cls.kinds})
        raise LookupError(f"{self.what} {name!r} runs on {' or '.join(needs)} scenarios; this scenario is "
                          f"{' / '.join(kinds)}")


def kind_of(cls: Any, kinds: tuple[str, ...]) -> str:
    """The scenario kind under which `cls` runs on a scenario offering `kinds`."""
    return next(k for k in kinds if k in cls.kinds)
