"""SP-L1 / SP-L2: structured magnitude pruning that removes channels physically.

Each coupled channel group keeps the k = max(1, round(n (1 - ratio))) channels whose producer
filters (conv/linear weight rows, summed over all producers of the group, e.g. every block
writing a residual stream) have the largest L1 or L2 norm; attention head groups keep the heads
with the largest q/k/v block norms. The other channels are removed with Torch-Pruning, exactly
as folding removes its non-representative channels, so both produce real smaller models with
the same group structure. The reference code instead *masked* filters per layer (including the
classifier's class rows), which makes its numbers incomparable with ours.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelfold.baselines.driver import compress
from modelfold.cluster.features import head_block
from modelfold.errors import FoldError
from modelfold.graph import ChannelGroup
from modelfold.graph.handlers import find_layer_handler
from modelfold.graph.layout import SlotLayout
from modelfold.merge.apply import ChannelMap

_FILTERS = (nn.Linear, nn.modules.conv._ConvNd)


def channel_norms(group: ChannelGroup, p: int) -> torch.Tensor:
    """Per-channel Lp norm of the group's producer filters (summed over producers)."""
    if group.kind == "heads":
        blocks = [head_block(t, axis, group.n)
                  for t, axis, reduce in group.head_blocks() if reduce == "mean"]
        return sum(torch.linalg.vector_norm(b.double(), ord=p, dim=1) for b in blocks)
    total = torch.zeros(group.n, dtype=torch.float64)
    producers = [s for s in group.slots if s.role == "producer"]
    filters = [s for s in producers if isinstance(s.module, _FILTERS)] or producers
    for slot in filters:
        handler = find_layer_handler(slot.module, slot.name)
        layout = SlotLayout.build(slot.idxs, slot.root_idxs, group.n, slot.name)
        weight, axis = handler.tensors(slot.module, "producer")[0]
        rows = layout.gather(weight, axis).double().cpu()
        total += torch.linalg.vector_norm(rows, ord=p, dim=1)
    return total


def magnitude_prune(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float,
    p: int = 1,
    module_ratios: dict[str, float] | None = None,
    ignored: tuple[nn.Module, ...] | list[nn.Module] = (),
    reset_bn: Any = None,
    calibration_samples: int = 1024,
) -> nn.Module:
    """SP-L1 (`p=1`) / SP-L2 (`p=2`) on a copy of `model`; `reset_bn=` calibration data
    re-estimates BN statistics afterwards (the optional repair of the reference baseline)."""
    if p not in (1, 2):
        raise FoldError(f"magnitude_prune: p must be 1 or 2, got {p!r}.")
    return compress(model, example_inputs, method=f"sp-l{p}", ratio=ratio,
                    make_map=lambda group, k, norms: ChannelMap.selection(top_k(norms, k),
                                                                          group.n),
                    score=lambda group: channel_norms(group, p), module_ratios=module_ratios,
                    ignored=ignored, reset_bn=reset_bn, calibration_samples=calibration_samples)


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in increasing index order (ties: lower index first)."""
    return sorted(torch.argsort(scores, descending=True, stable=True)[:k].tolist())
