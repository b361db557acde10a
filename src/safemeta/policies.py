"""Policies and their checkpoint form (what `policy.pt` holds).

Every policy is a softmax policy in the paper's sense (section 2) with f = log pi.
`TabularSoftmaxPolicy`: pi(.|s) = softmax(logits[s]).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

POLICY_FORMAT = "safemeta.policy/1"


class TabularSoftmaxPolicy:
    kind = "tabular_softmax"

    def __init__(self, logits: np.ndarray) -> None:
        logits = np.asarray(logits, dtype=np.float64)
        if logits.ndim != 2:
            raise ValueError(f"tabular logits must be [S, A]; got shape {logits.shape}")
        self.logits = logits

    def probs(self) -> np.ndarray:
        z = self.logits - self.logits.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def to_checkpoint(self) -> dict[str, Any]:
        return {"format": POLICY_FORMAT, "kind": self.kind, "logits": torch.from_numpy(self.logits.copy())}

    @classmethod
    def from_checkpoint(cls, obj: dict[str, Any]) -> "TabularSoftmaxPolicy":
        return cls(obj["logits"].numpy())


_KINDS = {TabularSoftmaxPolicy.kind: TabularSoftmaxPolicy}


def policy_from_checkpoint(obj: dict[str, Any]):
    if not isinstance(obj, dict) or obj.get("format") != POLICY_FORMAT:
        raise ValueError(f"not a safemeta policy checkpoint (expected format {POLICY_FORMAT!r})")
    if obj.get("kind") not in _KINDS:
        raise ValueError(f"unknown policy kind {obj.get('kind')!r}; known: {sorted(_KINDS)}")
    return _KINDS[obj["kind"]].from_checkpoint(obj)
