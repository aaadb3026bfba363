"""Fold-AR: data-free variance repair from weight correlations.

Averaging N unit-variance channels with mean pairwise correlation rho gives a channel of
variance (1 + (N - 1) rho) / N: the variance collapses. Fold-AR undoes it without data:

1. Before clustering, every BatchNorm fed directly by a conv/linear is made to see standardised
   inputs: the producer rows are divided by sigma_i = sqrt(var_i + eps), the BN's running mean
   becomes mu_i / sigma_i and its running variance 1 - eps (the function is unchanged; no conv
   bias is added, unlike the reference code).
2. After merging, the BN's gamma of cluster c is multiplied by
   s_c = sqrt(N_c / max(floor, 1 + (N_c - 1) rho_c)), with rho_c the mean pairwise correlation
   of the members' pre-BN activations, estimated from weights (`ar_correlation`): cosines of
   the producer rows (exact for white inputs), of the full feature vectors (the reference
   code's last version), of spatially summed kernels, or - the default - of rows mapped
   through an input covariance fitted to the BN statistics (`calibrated_rows`).
3. Groups without any norm layer, whose producers are all conv/linear, get the analogous,
   correlation-free correction of the merged rows: W_c <- W_c * sqrt(mean_i |w_i|^2 / |w_c|^2),
   which restores the members' average pre-activation variance when the input is white and
   zero-mean (biases are kept). Groups with LayerNorm (it renormalises anyway), residual streams
   without BN and attention heads are not corrected: no weight-only formula is valid there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from modelfold.cluster.features import group_features
from modelfold.graph.groups import ChannelGroup, GroupDiscovery
from modelfold.graph.handlers import find_layer_handler
from modelfold.graph.layout import SlotLayout
from modelfold.merge.plan import FoldPlan
from modelfold.registry import Registry

_BN = nn.modules.batchnorm._BatchNorm
_LINEAR = (nn.Linear, nn.modules.conv._ConvNd)


def feeding_producer(discovery: GroupDiscovery, bn: nn.Module) -> nn.Module | None:
    """The conv/linear whose output is this BN's input, if it is fed directly by one."""
    node = discovery.graph.module2node.get(bn)
    if node is None or len(node.inputs) != 1:
        return None
    src = node.inputs[0].module
    if isinstance(src, _LINEAR) and len(node.inputs[0].outputs) == 1:
        return src
    return None


@torch.no_grad()
def standardize_bn_inputs(discovery: GroupDiscovery) -> dict[nn.Module, nn.Module]:
    """Step 1; returns BN -> producer for every BN that was standardised."""
    pairs: dict[nn.Module, nn.Module] = {}
    for bn in discovery.graph.model.modules():
        if not isinstance(bn, _BN) or bn.running_var is None:
            continue
        producer = feeding_producer(discovery, bn)
        if producer is None:
            continue
        std = (bn.running_var.double() + bn.eps).sqrt()
        out_axis = 1 if getattr(producer, "transposed", False) else 0
        shape = [1] * producer.weight.ndim
        shape[out_axis] = -1
        producer.weight.data.div_(std.view(shape).to(producer.weight.dtype))
        if producer.bias is not None:
            producer.bias.data.div_(std.to(producer.bias.dtype))
        bn.running_mean.copy_((bn.running_mean.double() / std).to(bn.running_mean.dtype))
        bn.running_var.fill_(1.0 - bn.eps)
        pairs[bn] = producer
    return pairs


def _cluster_cosine(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Mean pairwise cosine over ordered pairs i != j of every cluster (0 for singletons)."""
    unit = x.double() / x.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    sums = torch.zeros(k, unit.shape[1], dtype=unit.dtype).index_add_(0, labels, unit)
    sizes = torch.bincount(labels, minlength=k).double()
    # |sum u_i|^2 = N + sum_{i != j} cos_ij
    pair_sum = (sums * sums).sum(1) - sizes
    pairs = sizes * (sizes - 1)
    return torch.where(pairs > 0, pair_sum / pairs.clamp_min(1), torch.zeros_like(pair_sum))


def variance_scale(rho: torch.Tensor, sizes: torch.Tensor, floor: float) -> torch.Tensor:
    """s_c = sqrt(N_c / max(floor, 1 + (N_c - 1) rho_c))."""
    return (sizes / (1 + (sizes - 1) * rho).clamp_min(floor)).sqrt()


@dataclass
class ApproxRepairState:
    bn_scales: list[tuple[nn.Module, torch.Tensor]] = field(default_factory=list)
    row_scales: list[tuple[nn.Module, torch.Tensor]] = field(default_factory=list)


@torch.no_grad()
def plan_corrections(discovery: GroupDiscovery, plan: FoldPlan, pairs: dict, *,
                     correlation: str, floor: float) -> ApproxRepairState:
    """Step 2/3 scales, computed on the standardised but still unmerged weights."""
    state = ApproxRepairState()
    for group in discovery.groups:
        gp = plan.groups.get(group.name)
        if gp is None or group.kind != "channels":
            continue
        labels = gp.labels_tensor()
        sizes = torch.bincount(labels, minlength=gp.k).double()
        bns = [s for s in group.slots if isinstance(s.module, _BN)]
        if bns:
            estimate = CORRELATIONS.get(correlation)
            for slot in bns:
                producer = pairs.get(slot.module)
                if producer is None:
                    continue  # not fed by one conv/linear: no weight-based estimate
                rows = estimate(group, producer)
                scale = variance_scale(_cluster_cosine(rows, labels, gp.k), sizes, floor)
                state.bn_scales.append((slot.module, scale))
        elif _plain_linear_group(group):
            for slot in group.slots:
                if slot.role != "producer":
                    continue
                rows = _rows(group, slot.module).double()
                member = torch.zeros(gp.k, dtype=rows.dtype).index_add_(
                    0, labels, (rows * rows).sum(1)) / sizes
                centroid = torch.zeros(gp.k, rows.shape[1], dtype=rows.dtype).index_add_(
                    0, labels, rows) / sizes[:, None]
                scale = (member / (centroid * centroid).sum(1).clamp_min(1e-24)).sqrt()
                state.row_scales.append((slot.module, scale))
    return state


def calibrated_rows(rows: torch.Tensor, producer: nn.Module) -> torch.Tensor:
    """Rows phi_i whose cosines estimate activation correlations under a fitted input covariance.

    The layer input is modelled as Sigma = a I + b (I_C x J) + c J: white noise, plus a component
    shared by all taps of one input channel (spatially smooth maps), plus one shared by all
    inputs. Then Cov(z_i, z_j) = phi_i . phi_j with phi_i = [sqrt(a) w_i, sqrt(b) S_i, sqrt(c) T_i]
    (S_i: per-input-channel kernel sums, T_i: total sum). (a, b, c) >= 0 are fitted so that every
    standardised channel has unit variance, Var z_i = 1: the model's own BN statistics calibrate
    the covariance, so no data is needed.
    """
    from scipy.optimize import nnls

    per_input = rows.view(rows.shape[0], producer.weight.shape[1], -1)
    spatial = per_input.sum(2)  # (n, C)
    total = spatial.sum(1, keepdim=True)  # (n, 1)
    design = torch.stack([(rows**2).sum(1), (spatial**2).sum(1), total.squeeze(1) ** 2], 1)
    coef, _ = nnls(design.cpu().numpy(), torch.ones(rows.shape[0], dtype=torch.float64).numpy())
    if not coef.any():
        return rows
    a, b, c = (float(v) ** 0.5 for v in coef)
    return torch.cat([a * rows, b * spatial, c * total], 1)


# (group, producer feeding the BN) -> rows whose cosines estimate the activation correlations
CorrelationEstimator = Callable[[ChannelGroup, nn.Module], torch.Tensor]
CORRELATIONS: Registry[CorrelationEstimator] = Registry("ar_correlation estimator")


def register_correlation(name: str) -> Callable[[CorrelationEstimator], CorrelationEstimator]:
    """Decorator registering `fn(group, producer) -> rows` as `ar_correlation="name"`."""
    return CORRELATIONS.register(name)


def correlation_names() -> list[str]:
    return CORRELATIONS.names()


@register_correlation("producer")
def _producer_rows(group: ChannelGroup, producer: nn.Module) -> torch.Tensor:
    """The producer's weight rows (the paper's derivation: white inputs)."""
    return _rows(group, producer)


@register_correlation("full")
def _full_rows(group: ChannelGroup, producer: nn.Module) -> torch.Tensor:
    """The group's full feature vectors (the reference code's last version)."""
    return group_features(group, features="full")


@register_correlation("spatial_mean")
def _spatial_rows(group: ChannelGroup, producer: nn.Module) -> torch.Tensor:
    """Spatially summed kernels (the response to a locally constant input)."""
    return _rows(group, producer, spatial_sum=True)


@register_correlation("calibrated")
def _calibrated_rows(group: ChannelGroup, producer: nn.Module) -> torch.Tensor:
    """Rows under an input covariance fitted to the BN statistics (`calibrated_rows`)."""
    return calibrated_rows(_rows(group, producer), producer)


def _plain_linear_group(group: ChannelGroup) -> bool:
    producers = [s for s in group.slots if s.role == "producer"]
    return len(producers) == 1 and all(isinstance(s.module, _LINEAR) for s in group.slots)


def _rows(group: ChannelGroup, module: nn.Module, spatial_sum: bool = False) -> torch.Tensor:
    """Producer weight rows (no bias) of `module` in `group`, one row per channel.

    `spatial_sum` sums each kernel over its spatial taps: the response to a locally constant
    input, which dominates when feature maps are spatially smooth.
    """
    slot = next(s for s in group.slots if s.module is module and s.role == "producer")
    handler = find_layer_handler(slot.module, slot.name)
    layout = SlotLayout.build(slot.idxs, slot.root_idxs, group.n, slot.name)
    weight, axis = handler.tensors(slot.module, "producer")[0]
    if spatial_sum and weight.ndim > 2:
        weight = weight.sum(dim=tuple(range(2, weight.ndim)))
    return layout.gather(weight, axis).double()


@torch.no_grad()
def apply_corrections(state: ApproxRepairState) -> None:
    """Multiply merged BN gammas / merged producer rows by their scales (after merging)."""
    for bn, scale in state.bn_scales:
        if bn.weight is None:
            raise ValueError("Fold-AR needs affine BatchNorm layers")
        bn.weight.data.mul_(scale.to(bn.weight.dtype))
    for module, scale in state.row_scales:
        out_axis = 1 if getattr(module, "transposed", False) else 0
        shape = [1] * module.weight.ndim
        shape[out_axis] = -1
        module.weight.data.mul_(scale.view(shape).to(module.weight.dtype))
