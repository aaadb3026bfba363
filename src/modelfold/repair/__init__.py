"""Repair step: restore the activation statistics that merging disturbed.

| name             | paper      | data                                                           |
|------------------|------------|----------------------------------------------------------------|
| "none"           | Fold-Naive | none                                                           |
| "data"           | Fold-R     | `calibration=`: BN statistics reset; REPAIR for groups w/o BN  |
| "approx"         | Fold-AR    | none: BN gamma / merged rows scaled from weight correlations   |
| "deep_inversion" | Fold-DIR   | synthesised from the original model's BN statistics, then "data" |

A strategy is a class with three optional steps around clustering and merging; register new
ones with `register_repair`. Fold-AR's correlation estimators (`ar_correlation`) have their
own registry, `register_correlation`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from modelfold.errors import FoldError
from modelfold.graph.groups import GroupDiscovery
from modelfold.merge.plan import FoldPlan
from modelfold.registry import Registry
from modelfold.repair import approx, statistics
from modelfold.repair import calibration as calib
from modelfold.repair.approx import correlation_names, register_correlation
from modelfold.repair.deep_inversion import DeepInversionConfig, synthesize


class Repair:
    """Base strategy: Fold-Naive (every step a no-op)."""

    name = "none"
    needs_original = False  # after_merge reads the unfolded model (kept aside when True)

    def before_plan(self, work: nn.Module, discovery: GroupDiscovery, config) -> None:
        """Runs on the working copy before channels are clustered."""

    def before_merge(self, work: nn.Module, discovery: GroupDiscovery, plan: FoldPlan,
                     config) -> None:
        """Runs after clustering, on the still unmerged weights."""

    def after_merge(self, original: nn.Module, folded: nn.Module, discovery: GroupDiscovery,
                    plan: FoldPlan, config, calibration: Any, example_inputs: Any) -> None:
        """Runs on the folded model."""


REPAIRS: Registry[type[Repair]] = Registry("repair")


def register_repair(cls: type[Repair]) -> type[Repair]:
    """Class decorator registering a `Repair` subclass under its `name`."""
    REPAIRS.register(cls.name, cls)
    return cls


def get_repair(name: str) -> Repair:
    return REPAIRS.get(name)()


def repair_names() -> list[str]:
    return REPAIRS.names()


register_repair(Repair)


def _repaired_producers(discovery: GroupDiscovery, plan: FoldPlan) -> dict[str, list[int]]:
    """Conv/linear producers of folded groups without a norm layer (REPAIR targets)."""
    targets: dict[str, list[int]] = {}
    for group in discovery.groups:
        gp = plan.groups.get(group.name)
        if gp is None or group.kind != "channels":
            continue
        if any(isinstance(s.module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm))
               for s in group.slots):
            continue
        for slot in group.slots:
            if slot.role == "producer" and isinstance(slot.module, approx._LINEAR):
                targets[slot.name] = gp.labels
    return targets


def data_repair(original: nn.Module, folded: nn.Module, discovery: GroupDiscovery,
                plan: FoldPlan, data: Any) -> None:
    """Fold-R on `data`: BN reset everywhere, REPAIR on folded groups without norm layers."""
    import torch

    statistics.reset_batchnorm(folded, data)
    producers = _repaired_producers(discovery, plan)
    if not producers:
        return
    originals = dict(original.named_modules())
    measured = statistics.measure(original, {n: originals[n] for n in producers}, data)
    targets = {}
    for name, labels in producers.items():
        mean, std = measured[name]
        lab = torch.tensor(labels, device=mean.device)
        k = int(lab.max()) + 1
        targets[name] = (statistics.cluster_mean(mean, lab, k),
                         statistics.cluster_mean(std, lab, k))
    statistics.repair_channels(folded, targets, data)


@register_repair
class DataRepair(Repair):
    name = "data"
    needs_original = True

    def after_merge(self, original, folded, discovery, plan, config, calibration,
                    example_inputs) -> None:
        device = next(folded.parameters()).device
        data = calib.to_device(calib.collect(calibration, config.calibration_samples), device)
        data_repair(original, folded, discovery, plan, data)


@register_repair
class ApproxRepair(Repair):
    name = "approx"

    def before_plan(self, work, discovery, config) -> None:
        self.pairs = approx.standardize_bn_inputs(discovery)

    def before_merge(self, work, discovery, plan, config) -> None:
        self.state = approx.plan_corrections(discovery, plan, self.pairs,
                                             correlation=config.ar_correlation,
                                             floor=config.ar_floor)

    def after_merge(self, original, folded, discovery, plan, config, calibration,
                    example_inputs) -> None:
        approx.apply_corrections(self.state)


@register_repair
class DeepInversionRepair(Repair):
    name = "deep_inversion"
    needs_original = True
    debias = False

    def after_merge(self, original, folded, discovery, plan, config, calibration,
                    example_inputs) -> None:
        import torch

        if not isinstance(example_inputs, torch.Tensor):
            raise FoldError("repair='deep_inversion' synthesises one input tensor; "
                            "`example_inputs` must be a single tensor.")
        with torch.no_grad():
            num_classes = int(original.eval()(example_inputs[:1]).shape[-1])
        cfg = DeepInversionConfig(**config.deep_inversion)
        images = synthesize(original, tuple(example_inputs.shape[1:]), num_classes, cfg)
        data = images[: config.calibration_samples].to(example_inputs.device)
        data_repair(original, folded, discovery, plan, data)
        if self.debias:
            members = statistics.batchnorm_members(folded, discovery, plan)
            statistics.debias_batchnorm(original, folded, members, data)


@register_repair
class DebiasedDeepInversionRepair(DeepInversionRepair):
    """Fold-DIR whose BN statistics are corrected by the original model's own gap between its
    stored statistics and the synthetic images (see `statistics.debias_batchnorm`)."""

    name = "deep_inversion_debiased"
    debias = True


__all__ = ["REPAIRS", "DeepInversionConfig", "Repair", "correlation_names", "get_repair",
           "register_correlation", "register_repair", "repair_names", "synthesize"]
