"""Channel feature vectors: producer rows (weights, biases, norm affine) + consumer columns."""

from __future__ import annotations

import torch

from modelfold.errors import FoldError
from modelfold.graph.groups import ChannelGroup
from modelfold.merge.handlers import find_attention_handler, find_layer_handler
from modelfold.merge.layout import SlotLayout


def group_features(
    group: ChannelGroup, *, features: str = "full", normalize_blocks: bool = False
) -> torch.Tensor:
    """(n, d) float32 feature matrix of a group's channels (heads for a head group)."""
    blocks: list[torch.Tensor] = []
    for slot in group.slots:
        if group.kind == "heads":
            handler = find_attention_handler(slot.module)
            blocks.extend(head_block(t, axis, group.n)
                          for t, axis, reduce in handler.head_blocks(slot.module)
                          if features == "full" or reduce == "mean")
            continue
        if features == "producer" and slot.role != "producer":
            continue
        handler = find_layer_handler(slot.module, slot.name)
        layout = SlotLayout.build(slot.idxs, slot.root_idxs, group.n, slot.name)
        for tensor, axis in handler.tensors(slot.module, slot.role):
            blocks.append(layout.gather(tensor, axis).float())
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


def head_block(tensor: torch.Tensor, axis: int, heads: int) -> torch.Tensor:
    moved = tensor.detach().movedim(axis, 0)
    return moved.reshape(heads, -1).float()
