"""Apply a FoldPlan: producers -> cluster mean, consumers -> cluster sum, then shrink modules.

Every merge is a `ChannelMap`: the k surviving channels get linear combinations of the group's n
channels, producer rows with one matrix (a cluster mean for folding) and consumer columns with
another (a cluster sum), written into the survivors' slots; Torch-Pruning then removes the other
channels physically (updating in/out_channels, num_features, ... so the result is a real,
smaller model). Baselines that are not clusterings (IFM, INN, Neuron Merging, Intra-Fusion)
are other matrices through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelfold.graph.groups import ChannelGroup, GroupDiscovery
from modelfold.graph.handlers import find_layer_handler
from modelfold.graph.layout import SlotLayout
from modelfold.macs import MacProfile
from modelfold.merge.plan import FoldPlan, GroupPlan


@dataclass(frozen=True)
class ChannelMap:
    """How a group of n channels becomes k: survivor keep[j] gets producer rows
    sum_i producer[j, i] * row_i and consumer columns sum_i consumer[j, i] * column_i."""

    keep: torch.Tensor  # (k,) distinct channel indices whose slots receive the results
    producer: torch.Tensor  # (k, n)
    consumer: torch.Tensor  # (k, n)

    @classmethod
    def from_labels(cls, gp: GroupPlan) -> ChannelMap:
        """Folding: producers take their cluster's mean, consumers its sum."""
        labels = gp.labels_tensor()
        member = torch.zeros(gp.k, gp.n, dtype=torch.float64)
        member[labels, torch.arange(gp.n)] = 1.0
        return cls(torch.tensor(gp.representatives), member / member.sum(1, keepdim=True), member)

    @classmethod
    def selection(cls, keep: list[int], n: int) -> ChannelMap:
        """Pruning: the kept channels stay as they are."""
        pick = torch.zeros(len(keep), n, dtype=torch.float64)
        pick[torch.arange(len(keep)), torch.tensor(keep)] = 1.0
        return cls(torch.tensor(keep), pick, pick)

    def matrix(self, reduce: str) -> torch.Tensor:
        if reduce == "mean":
            return self.producer
        if reduce == "sum":
            return self.consumer
        raise ValueError(reduce)


@torch.no_grad()
def apply_plan(discovery: GroupDiscovery, plan: FoldPlan) -> None:
    """Fold the discovery's model in place according to `plan`."""
    maps = {name: ChannelMap.from_labels(gp) for name, gp in plan.groups.items() if gp.k < gp.n}
    apply_channel_maps(discovery, maps)


@torch.no_grad()
def apply_channel_maps(discovery: GroupDiscovery, maps: dict[str, ChannelMap]) -> None:
    """Merge every group named in `maps` in place, then remove its non-surviving channels."""
    for group in discovery.groups:
        cmap = maps.get(group.name)
        if cmap is None:
            continue
        if group.kind == "heads":
            _mix_heads(group, cmap)
        else:
            _mix_channels(discovery.refresh(group), cmap)
        remove_channels(discovery, group, cmap.keep.tolist())


def _mix_channels(group: ChannelGroup, cmap: ChannelMap) -> None:
    for slot in group.slots:
        handler = find_layer_handler(slot.module, slot.name)
        layout = SlotLayout.build(slot.idxs, slot.root_idxs, group.n, slot.name)
        matrix = cmap.producer if slot.role == "producer" else cmap.consumer
        for tensor, axis in handler.tensors(slot.module, slot.role):
            tensor.data.copy_(layout.mix(tensor, axis, matrix, cmap.keep))
        if handler.merge_extra is not None and slot.role == "producer":
            handler.merge_extra(slot.module, lambda t, axis, reduce, layout=layout:
                                layout.mix(t, axis, cmap.matrix(reduce), cmap.keep))


@torch.no_grad()
def remove_channels(discovery: GroupDiscovery, group: ChannelGroup, keep: list[int]) -> None:
    """Physically remove every channel (or head) of `group` not in `keep`.

    Channel groups go through Torch-Pruning (its group is re-derived on current shapes);
    head groups through their attention handler.
    """
    kept = set(keep)
    drop = [i for i in range(group.n) if i not in kept]
    if group.kind == "heads":
        handler, module, out = group.attention()
        handler.remove_heads(module, drop, out)
        return
    root = discovery.refresh(group).slots[0].module
    graph = discovery.graph
    graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels,
                            drop).prune(record_history=False)


def _mix_heads(group: ChannelGroup, cmap: ChannelMap) -> None:
    d, n = group.head_dim(), group.n
    layout = SlotLayout.build(list(range(n * d)), [i // d for i in range(n * d)], n, group.name)
    for tensor, axis, reduce in group.head_blocks():
        tensor.data.copy_(layout.mix(tensor, axis, cmap.matrix(reduce), cmap.keep))


def predicted_parameter_count(
    model: torch.nn.Module, discovery: GroupDiscovery, kept: dict[str, int]
) -> int:
    """Parameters of the folded model, from shapes alone (no copy, no merge).

    `kept` maps group name -> k. Used to solve for a target sparsity and to cross-check the
    physically folded model.
    """
    return sum(after for _, after in folded_sizes(model, discovery, kept).values())


def predicted_mac_count(model: torch.nn.Module, discovery: GroupDiscovery,
                        kept: dict[str, int], profile: MacProfile) -> int:
    """MACs of the folded model on the input `profile` was measured on (`profile_macs` of the
    unfolded `model`), from shapes alone.

    The MACs of an op taking a weight follow the weight's size (numel x positions: positions do
    not change when channels are removed); the attention products of a head group's module
    follow its number of heads; other activation-only products stay as they are.
    """
    sizes = folded_sizes(model, discovery, kept)
    total = 0
    for pid, macs in profile.by_parameter.items():
        before, after = sizes.get(pid, (1, 1))
        total += macs * after // before if before else macs
    heads = []
    for group in discovery.groups:
        k = kept.get(group.name, group.n)
        if group.kind == "heads" and k < group.n:
            heads.append((group.slots[0].name, k, group.n))
    for name, macs in profile.free.items():
        for prefix, k, n in heads:
            if prefix == "" or name == prefix or name.startswith(prefix + "."):
                macs = macs * k // n
                break
        total += macs
    return total


def predicted_memory(model: torch.nn.Module, discovery: GroupDiscovery,
                     kept: dict[str, int]) -> int:
    """Bytes of the folded model's parameters and buffers, from shapes alone. A buffer of the
    shape of one of its module's parameters (BatchNorm's running statistics) shrinks with it;
    other buffers keep their size."""
    sizes = folded_sizes(model, discovery, kept)
    params = {id(p): p for p in model.parameters()}
    total = sum(after * params[pid].element_size() for pid, (_, after) in sizes.items())
    seen: set[int] = set()
    for module in model.modules():
        shapes = {tuple(p.shape): sizes[id(p)][1] for p in module.parameters(recurse=False)}
        for b in module.buffers(recurse=False):
            if id(b) in seen:
                continue
            seen.add(id(b))
            total += shapes.get(tuple(b.shape), b.numel()) * b.element_size()
    return total


def memory_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each shared tensor counted once."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def folded_sizes(model: torch.nn.Module, discovery: GroupDiscovery, kept: dict[str, int]
                 ) -> dict[int, tuple[int, int]]:
    """id of every parameter -> (its size, its size once the groups keep `kept` channels)."""
    shrink: dict[int, dict[int, int]] = {}
    for group in discovery.groups:
        k = kept.get(group.name, group.n)
        if k >= group.n:
            continue
        seen: set[tuple[int, int]] = set()
        if group.kind == "heads":
            per = group.head_dim()
            pairs = [(t, a, per) for t, a, _ in group.head_blocks()]
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
    sizes: dict[int, tuple[int, int]] = {}
    for p in model.parameters():
        if id(p) in sizes:
            continue
        size = 1
        for axis, dim in enumerate(p.shape):
            size *= dim - shrink.get(id(p), {}).get(axis, 0)
        sizes[id(p)] = (p.numel(), size)
    return sizes
