"""`FoldPlan`: the clustering of every group. Merge and repair are pure functions of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class GroupPlan:
    name: str
    kind: str
    n: int
    k: int
    labels: list[int]  # channel -> cluster, clusters numbered by their first member

    @property
    def representatives(self) -> list[int]:
        """First (smallest) member of every cluster: the channel that survives."""
        reps = [-1] * self.k
        for i, c in enumerate(self.labels):
            if reps[c] < 0:
                reps[c] = i
        return reps

    def labels_tensor(self) -> torch.Tensor:
        return torch.tensor(self.labels, dtype=torch.long)


@dataclass
class FoldPlan:
    """Labels for every folded group, JSON-serialisable so a plan can be saved and replayed."""

    ratio: float
    groups: dict[str, GroupPlan] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio,
                "groups": {k: vars(g).copy() for k, g in self.groups.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FoldPlan:
        return cls(float(data["ratio"]),
                   {k: GroupPlan(**g) for k, g in data.get("groups", {}).items()})
