"""Declarations of recorded variables: each algorithm says what it records, results.py stores it.

A `Var` names the dimensions a value has beyond the record's own axis (a meta-iteration, an
adaptation step), a long name and units. Algorithms declare their variables next to their code
(`step_vars` of an operator, `record_vars` of a meta-learner); the trace schemas of
`results.py` are the common variables plus these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Var:
    dims: tuple[str, ...]       # dims after the record axis, from ("task", "constraint")
    long_name: str
    units: str
    initial: float = np.nan     # value of a per-step variable at k = 0, where no step was taken


def fill(var: Var, sizes: dict[str, int], value: Any) -> np.ndarray:
    """`value` as a float array of the variable's shape; None becomes the variable's NaN/initial fill."""
    if value is None:
        return np.full([sizes[d] for d in var.dims], np.nan)
    return np.asarray(value, dtype=np.float64)
