"""Channel feature vectors: producer rows (weights, biases, norm affine) + consumer columns.

A feature builder picks the blocks of a group a clusterer sees: "full" = producer rows and
consumer columns (reference R1 semantics), "producer" = producer rows only. Add one with
`register_features("name")(fn)`, `fn(group) -> list of (n, e) blocks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from modelfold.errors import FoldError
from modelfold.graph.groups import ChannelGroup
from modelfold.graph.handlers import find_layer_handler
from modelfold.graph.layout import SlotLayout
from modelfold.registry import Registry

FeatureBuilder = Callable[[ChannelGroup], list[torch.Tensor]]
FEATURES: Registry[FeatureBuilder] = Registry("feature set")


def register_features(name: str) -> Callable[[FeatureBuilder], FeatureBuilder]:
    """Decorator registering `fn(group) -> [(n, e) blocks]` as the feature set `name`."""
    return FEATURES.register(name)


def feature_names() -> list[str]:
    return FEATURES.names()


def channel_blocks(group: ChannelGroup) -> Iterator[tuple[str, Any, torch.Tensor, torch.Tensor]]:
    """(role, module, tensor, block) for every tensor indexed by the group, in slot order.

    `block` is the (n, e) matrix of the tensor's slices per channel (per head for a head group);
    `role` is "producer" (rows averaged by folding) or "consumer" (columns summed)."""
    if group.kind == "heads":
        module = group.slots[0].module
        for tensor, axis, reduce in group.head_blocks():
            role = "producer" if reduce == "mean" else "consumer"
            yield role, module, tensor, head_block(tensor, axis, group.n)
        return
    for slot in group.slots:
        handler = find_layer_handler(slot.module, slot.name)
        layout = SlotLayout.build(slot.idxs, slot.root_idxs, group.n, slot.name)
        for tensor, axis in handler.tensors(slot.module, slot.role):
            yield slot.role, slot.module, tensor, layout.gather(tensor, axis)


def group_features(
    group: ChannelGroup, *, features: str = "full", normalize_blocks: bool = False
) -> torch.Tensor:
    """(n, d) float32 feature matrix of a group's channels (heads for a head group)."""
    blocks = FEATURES.get(features)(group)
    if not blocks:
        raise FoldError(f"group {group.name!r} has no weights to cluster on.")
    if normalize_blocks:
        blocks = [b / b.norm().clamp_min(1e-12) for b in blocks]
    x = torch.cat(blocks, dim=1)
    if not bool(torch.isfinite(x).all()):
        raise FoldError(
            f"group {group.name!r}: weights of {sorted({s.name for s in group.slots})} contain "
            "NaN or Inf; folding them would produce a silently wrong model."
        )
    return x


@register_features("full")
def _full(group: ChannelGroup) -> list[torch.Tensor]:
    """Producer rows and consumer columns."""
    return [block.float() for _, _, _, block in channel_blocks(group)]


@register_features("producer")
def _producer(group: ChannelGroup) -> list[torch.Tensor]:
    """Producer rows only."""
    return [block.float() for role, _, _, block in channel_blocks(group) if role == "producer"]


def head_block(tensor: torch.Tensor, axis: int, heads: int) -> torch.Tensor:
    moved = tensor.detach().movedim(axis, 0)
    return moved.reshape(heads, -1).float()
