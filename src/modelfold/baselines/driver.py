"""One driver for every baseline that turns each channel group into a `ChannelMap`.

copy -> trace groups -> (score channels on the raw weights) -> (fold BN scales into producers)
-> per group: k from `ratio` / `module_ratios`, a ChannelMap from the method -> merge + remove
-> (BN reset with data) -> check output shapes and parameter count -> record. Methods differ only
in the map: SP-L1/L2 select, Neuron Merging selects and compensates the consumer, IFM, INN and
Intra-Fusion combine channels. The user's model is never modified.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelfold.budget import check_ratio, group_ratio, kept_channels
from modelfold.cluster.features import channel_blocks
from modelfold.errors import FoldError, check_parameters
from modelfold.graph import ChannelGroup
from modelfold.graph_fold import (
    check_output,
    check_targets,
    copy_and_trace,
    count_parameters,
    device_of,
    group_infos,
    to_device,
)
from modelfold.merge.apply import ChannelMap, apply_channel_maps, predicted_parameter_count
from modelfold.merge.batchnorm import fold_batchnorms, restore_identity
from modelfold.merge.plan import FoldPlan, GroupPlan
from modelfold.record import (
    FACTORY_ATTR,
    RECORD_ATTR,
    FoldRecord,
    changed_attrs,
    input_spec,
    simple_attrs,
)

# (group, k, score of the group's channels on the raw weights or None) -> map
MapFn = Callable[[ChannelGroup, int, "torch.Tensor | None"], ChannelMap]


@dataclass(frozen=True)
class Blocks:
    """A group's tensors as (n, d) float64 matrices: one row per channel (or head)."""

    producer_weights: list[torch.Tensor]  # conv/linear rows, q/k/v head blocks
    producer_biases: list[torch.Tensor]  # biases and norm shifts (one value per channel)
    producer_scales: list[torch.Tensor]  # norm scales (gamma)
    consumer_weights: list[torch.Tensor]  # conv/linear input columns, o-projection blocks

    def all(self) -> list[torch.Tensor]:
        return (self.producer_weights + self.producer_biases + self.producer_scales
                + self.consumer_weights)


def group_blocks(group: ChannelGroup) -> Blocks:
    prod_w: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    scales: list[torch.Tensor] = []
    cons: list[torch.Tensor] = []
    for role, module, tensor, block in channel_blocks(group):
        block = block.double().cpu()
        if role == "consumer":
            cons.append(block)
        elif group.kind == "heads" or tensor.ndim >= 2:
            prod_w.append(block)
        elif tensor is getattr(module, "bias", None):
            biases.append(block)
        else:
            scales.append(block)
    blocks = Blocks(prod_w, biases, scales, cons)
    if not all(bool(torch.isfinite(b).all()) for b in blocks.all()):
        raise FoldError(f"group {group.name!r}: weights contain NaN or Inf.")
    return blocks


def compress(
    model: nn.Module,
    example_inputs: Any,
    *,
    method: str,
    ratio: float,
    make_map: MapFn,
    module_ratios: dict[str, float] | None = None,
    ignored: tuple[nn.Module, ...] | list[nn.Module] = (),
    fold_bn: bool = False,
    sequential: bool = False,
    score: Callable[[ChannelGroup], torch.Tensor] | None = None,
    reset_bn: Any = None,
    calibration_samples: int = 1024,
    config: dict[str, Any] | None = None,
) -> nn.Module:
    """Compress a copy of `model` with `make_map` on every foldable group.

    fold_bn: fold BN scales into producers first (`modelfold.merge.batchnorm`).
    sequential: compute each group's map on the weights as the groups before it left them
        (IFM); otherwise every map is computed on the unmodified (BN-folded) weights.
    score: per-channel scores computed on the raw weights before BN folding (selection
        criteria of the pruning-based methods), passed to `make_map`.
    """
    check_ratio(ratio, "ratio")
    if not isinstance(model, nn.Module):
        raise FoldError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    check_parameters(model)
    module_ratios = dict(module_ratios or {})
    for name, r in module_ratios.items():
        check_ratio(r, f"module_ratios[{name!r}]")
    ignored_names = check_targets(model, ignored, module_ratios)
    dev = device_of(model)
    inputs = to_device(example_inputs, dev)
    attrs_before = {n: simple_attrs(m) for n, m in model.named_modules()}
    was_training = model.training
    work, reference, discovery = copy_and_trace(model, inputs, ignored_names, dev)
    params_before = count_parameters(work)
    targets = {}
    for group in discovery.groups:
        if group.foldable:
            k = kept_channels(group.n, group_ratio(group, module_ratios, ratio))
            if k < group.n:
                targets[group.name] = k
    scores = {g.name: score(g) for g in discovery.groups if g.name in targets} if score else {}
    predicted = predicted_parameter_count(work, discovery, targets)
    folded_bns = fold_batchnorms(work, discovery.graph) if fold_bn else []
    plan = FoldPlan(ratio=ratio)
    maps: dict[str, ChannelMap] = {}
    kept: dict[str, list[int]] = {}
    with torch.no_grad():
        for group in discovery.groups:
            if group.name not in targets:
                continue
            current = discovery.refresh(group) if sequential else group
            cmap = make_map(current, targets[group.name], scores.get(group.name))
            _check_map(cmap, group, targets[group.name], method)
            kept[group.name] = sorted(cmap.keep.tolist())
            if sequential:
                apply_channel_maps(discovery, {group.name: cmap})
            else:
                maps[group.name] = cmap
            plan.groups[group.name] = GroupPlan(group.name, group.kind, group.n,
                                                targets[group.name], _labels(cmap))
        apply_channel_maps(discovery, maps)
    restore_identity(folded_bns)
    if reset_bn is not None:
        from modelfold.repair import calibration as calib
        from modelfold.repair.statistics import reset_batchnorm

        reset_batchnorm(work, calib.to_device(calib.collect(reset_bn, calibration_samples), dev))
    work.train(was_training)
    params_after = count_parameters(work)
    if params_after != predicted:
        raise FoldError(f"{method}: {params_after} parameters left, {predicted} expected from the "
                        "channel groups: an op the dependency graph cannot see couples channels. "
                        "Pass the modules around it in `ignored=`.")
    check_output(work, inputs, reference)
    setattr(work, RECORD_ATTR, FoldRecord(
        config={"method": method, "ratio": ratio, "module_ratios": module_ratios,
                **(config or {})},
        ratio=ratio, plan=plan.to_dict(), groups=group_infos(discovery, plan),
        module_attrs=changed_attrs(attrs_before, work), input_spec=input_spec(example_inputs),
        params_before=params_before, params_after=params_after,
        factory=getattr(model, FACTORY_ATTR, None),
        extra={"kept": kept},
    ))
    return work


def _check_map(cmap: ChannelMap, group: ChannelGroup, k: int, method: str) -> None:
    shape = (k, group.n)
    if tuple(cmap.producer.shape) != shape or tuple(cmap.consumer.shape) != shape \
            or cmap.keep.numel() != k or len(set(cmap.keep.tolist())) != k:
        raise FoldError(f"{method}: invalid channel map for group {group.name!r} "
                        f"(expected {k} distinct survivors of {group.n}).")
    if not (torch.isfinite(cmap.producer).all() and torch.isfinite(cmap.consumer).all()):
        raise FoldError(f"{method}: the channel map of group {group.name!r} is not finite.")


def _labels(cmap: ChannelMap) -> list[int]:
    """The survivor each channel contributes most to (for the record and summaries)."""
    return cmap.consumer.abs().argmax(0).tolist()
