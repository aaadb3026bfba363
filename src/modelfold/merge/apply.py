"""Apply a FoldPlan: producers -> cluster mean, consumers -> cluster sum, then shrink modules.

Merged values are written into each cluster's representative channel; Torch-Pruning then removes
the other channels physically (updating in/out_channels, num_features, ... so the result is a
real, smaller model).
"""

from __future__ import annotations

from functools import partial

import torch

from modelfold.graph.groups import ChannelGroup, GroupDiscovery
from modelfold.merge.handlers import find_attention_handler, find_layer_handler
from modelfold.merge.layout import SlotLayout
from modelfold.merge.plan import FoldPlan, GroupPlan


@torch.no_grad()
def apply_plan(discovery: GroupDiscovery, plan: FoldPlan) -> None:
    """Fold the discovery's model in place according to `plan`."""
    for group in discovery.groups:
        gp = plan.groups.get(group.name)
        if gp is None or gp.k == gp.n:
            continue
        if group.kind == "heads":
            _fold_heads(group, gp)
        else:
            _fold_channels(discovery.refresh(group), gp)
        remove_channels(discovery, group, gp.representatives)


def _fold_channels(group: ChannelGroup, gp: GroupPlan) -> None:
    labels, reps = gp.labels_tensor(), torch.tensor(gp.representatives)
    for slot in group.slots:
        handler = find_layer_handler(slot.module, slot.name)
        layout = SlotLayout.build(slot.idxs, slot.root_idxs, group.n, slot.name)
        reduce = "mean" if slot.role == "producer" else "sum"
        for tensor, axis in handler.tensors(slot.module, slot.role):
            tensor.data.copy_(layout.fold(tensor, axis, labels, reps, reduce))
        if handler.merge_extra is not None and slot.role == "producer":
            handler.merge_extra(slot.module, partial(_fold_with, layout, labels, reps))


@torch.no_grad()
def remove_channels(discovery: GroupDiscovery, group: ChannelGroup, keep: list[int]) -> None:
    """Physically remove every channel (or head) of `group` not in `keep`.

    Channel groups go through Torch-Pruning (its group is re-derived on current shapes);
    head groups through their attention handler.
    """
    kept = set(keep)
    drop = [i for i in range(group.n) if i not in kept]
    if group.kind == "heads":
        module = group.slots[0].module
        find_attention_handler(module).remove_heads(module, drop)
        return
    root = discovery.refresh(group).slots[0].module
    graph = discovery.graph
    graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels,
                            drop).prune(record_history=False)


def _fold_with(layout: SlotLayout, labels: torch.Tensor, reps: torch.Tensor,
               tensor: torch.Tensor, axis: int, reduce: str) -> torch.Tensor:
    return layout.fold(tensor, axis, labels, reps, reduce)


def _fold_heads(group: ChannelGroup, gp: GroupPlan) -> None:
    module = group.slots[0].module
    handler = find_attention_handler(module)
    d, n = handler.head_dim(module), group.n
    layout = SlotLayout.build(list(range(n * d)), [i // d for i in range(n * d)], n, group.name)
    labels, reps = gp.labels_tensor(), torch.tensor(gp.representatives)
    for tensor, axis, reduce in handler.head_blocks(module):
        tensor.data.copy_(layout.fold(tensor, axis, labels, reps, reduce))


def predicted_parameter_count(
    model: torch.nn.Module, discovery: GroupDiscovery, kept: dict[str, int]
) -> int:
    """Parameters of the folded model, from shapes alone (no copy, no merge).

    `kept` maps group name -> k. Used to solve for a target sparsity and to cross-check the
    physically folded model.
    """
    shrink: dict[int, dict[int, int]] = {}
    for group in discovery.groups:
        k = kept.get(group.name, group.n)
        if k >= group.n:
            continue
        seen: set[tuple[int, int]] = set()
        if group.kind == "heads":
            module = group.slots[0].module
            handler = find_attention_handler(module)
            per = handler.head_dim(module)
            pairs = [(t, a) for t, a, _ in handler.head_blocks(module)]
            pairs = [(t, a, per) for t, a in pairs]
        else:
            pairs = []
            for slot in group.slots:
                handler = find_layer_handler(slot.module, slot.name)
                per = len(slot.idxs) // group.n
                pairs.extend((t, a, per) for t, a in handler.tensors(slot.module, slot.role))
        for tensor, axis, per in pairs:
            key = (id(tensor), axis % tensor.ndim)
            if key in seen or not isinstance(tensor, torch.nn.Parameter):
                continue
            seen.add(key)
            axes = shrink.setdefault(id(tensor), {})
            axes[key[1]] = axes.get(key[1], 0) + (group.n - k) * per
    total = 0
    seen_params: set[int] = set()
    for p in model.parameters():
        if id(p) in seen_params:
            continue
        seen_params.add(id(p))
        size = 1
        for axis, dim in enumerate(p.shape):
            size *= dim - shrink.get(id(p), {}).get(axis, 0)
        total += size
    return total
