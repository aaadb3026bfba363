"""SP-L1 / SP-L2: structured magnitude pruning that removes channels physically.

Each coupled channel group keeps the k = max(1, round(n (1 - ratio))) channels whose producer
filters (conv/linear weight rows, summed over all producers of the group, e.g. every block
writing a residual stream) have the largest L1 or L2 norm; attention head groups keep the heads
with the largest q/k/v block norms. The other channels are removed with Torch-Pruning, exactly
as folding removes its non-representative channels, so both produce real smaller models with
the same group structure. The reference code instead *masked* filters per layer (including the
classifier's class rows), which makes its numbers incomparable (see anchor_fmnist.md).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from modelfold.api import _call, _check_output, _group_infos, _to_device, _unique_params
from modelfold.cluster.features import head_block
from modelfold.config import check_ratio, kept_channels
from modelfold.errors import FoldError
from modelfold.graph import ChannelGroup, discover_groups
from modelfold.merge.apply import remove_channels
from modelfold.merge.handlers import find_attention_handler, find_layer_handler
from modelfold.merge.layout import SlotLayout
from modelfold.merge.plan import FoldPlan, GroupPlan
from modelfold.record import (
    FACTORY_ATTR,
    RECORD_ATTR,
    FoldRecord,
    changed_attrs,
    input_spec,
    simple_attrs,
)

_FILTERS = (nn.Linear, nn.modules.conv._ConvNd)


def channel_norms(group: ChannelGroup, p: int) -> torch.Tensor:
    """Per-channel Lp norm of the group's producer filters (summed over producers)."""
    if group.kind == "heads":
        module = group.slots[0].module
        handler = find_attention_handler(module)
        blocks = [head_block(t, axis, group.n)
                  for t, axis, reduce in handler.head_blocks(module) if reduce == "mean"]
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
    check_ratio(ratio, "ratio")
    if p not in (1, 2):
        raise FoldError(f"magnitude_prune: p must be 1 or 2, got {p!r}.")
    names = {id(m): n for n, m in model.named_modules()}
    work = copy.deepcopy(model)
    modules = dict(work.named_modules())
    dev = next(work.parameters()).device
    inputs = _to_device(example_inputs, dev)
    attrs_before = {n: simple_attrs(m) for n, m in model.named_modules()}
    was_training = work.training
    with torch.no_grad():
        reference = _call(work.eval(), inputs)
    discovery = discover_groups(work, inputs, ignored=[modules[names[id(m)]] for m in ignored])
    params_before = sum(t.numel() for t in _unique_params(work))
    ratios = dict(module_ratios or {})
    plan = FoldPlan(ratio=ratio)
    keeps: dict[str, list[int]] = {}
    for group in discovery.groups:
        if not group.foldable:
            continue
        r = next((ratios[s.name] for s in group.slots
                  if s.role == "producer" and s.name in ratios), ratio)
        k = kept_channels(group.n, r)
        if k == group.n:
            continue
        keep = sorted(torch.argsort(channel_norms(group, p), descending=True,
                                    stable=True)[:k].tolist())
        keeps[group.name] = keep
        labels = [keep.index(i) if i in keep else 0 for i in range(group.n)]
        plan.groups[group.name] = GroupPlan(group.name, group.kind, group.n, k, labels)
    for group in discovery.groups:
        if group.name in keeps:
            remove_channels(discovery, group, keeps[group.name])
    if reset_bn is not None:
        from modelfold.repair import calibration as calib
        from modelfold.repair.statistics import reset_batchnorm

        reset_batchnorm(work, calib.to_device(calib.collect(reset_bn, calibration_samples), dev))
    work.train(was_training)
    _check_output(work, inputs, reference)
    setattr(work, RECORD_ATTR, FoldRecord(
        config={"method": f"sp-l{p}", "ratio": ratio, "module_ratios": ratios},
        ratio=ratio, plan=plan.to_dict(), groups=_group_infos(discovery, plan),
        module_attrs=changed_attrs(attrs_before, work), input_spec=input_spec(example_inputs),
        params_before=params_before,
        params_after=sum(t.numel() for t in _unique_params(work)),
        factory=getattr(model, FACTORY_ATTR, None), extra={"kept": keeps},
    ))
    return work
