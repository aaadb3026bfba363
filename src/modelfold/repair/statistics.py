"""Fold-R: reset BatchNorm statistics; REPAIR (Jordan et al.) for channels without a BN."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelfold.repair import calibration as calib


def channel_axis(module: nn.Module, output: torch.Tensor) -> int:
    """Conv outputs carry channels on dim 1, Linear outputs on the last dim."""
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else output.ndim - 1


def channel_moments(out: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = out.detach().movedim(axis, -1).reshape(-1, out.shape[axis]).double()
    return flat.mean(0), flat.std(0, unbiased=False)


@torch.no_grad()
def reset_batchnorm(model: nn.Module, data: Any) -> int:
    """Recompute every BN's running statistics on `data` (one batch: exact statistics).

    Only BN layers switch to train mode (dropout and the like stay in eval mode). Returns the
    number of BN layers reset.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    if not bns:
        return 0
    states = [(m, m.training, getattr(m, "momentum", None)) for m in model.modules()]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over batches
        bn.train()
    counts: dict[nn.Module, int] = {}

    def count(module, inputs):
        counts[module] = inputs[0].numel() // inputs[0].shape[1]

    handles = [bn.register_forward_pre_hook(count) for bn in bns]
    try:
        calib.run(model, data)
    finally:
        for h in handles:
            h.remove()
        for m, training, momentum in states:
            m.train(training)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum
    # Train mode normalised with the biased batch variance but stored the unbiased one; store
    # the biased one so that eval mode reproduces exactly what the statistics pass computed.
    for bn, n in counts.items():
        if n > 1:
            bn.running_var.mul_((n - 1) / n)
    return len(bns)


def run_with_hooks(model: nn.Module, hooks: dict[nn.Module, Any], data: Any) -> None:
    """One eval-mode forward pass on `data` with temporary forward hooks."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks.items()]
    was = model.training
    try:
        model.eval()
        calib.run(model, data)
    finally:
        model.train(was)
        for h in handles:
            h.remove()


@torch.no_grad()
def measure(model: nn.Module, modules: dict[str, nn.Module], data: Any
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and std of each named module's output on `data` (eval mode)."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def fn(module, inputs, output):
            stats[name] = channel_moments(output, channel_axis(module, output))
        return fn

    run_with_hooks(model, {m: hook(n) for n, m in modules.items()}, data)
    return stats


@torch.no_grad()
def repair_channels(model: nn.Module, targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    data: Any, eps: float = 1e-6) -> None:
    """REPAIR: give each named module's output channels the target mean and std.

    One pass in which every module's output is standardised with its own statistics on `data`
    and mapped to the target (so downstream modules see repaired inputs), then the affine map is
    fused into the module's weight and bias: W' = W a, b' = (b - m) a + mu*, a = sigma*/s.
    """
    modules = dict(model.named_modules())
    measured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def fn(module, inputs, output):
            axis = channel_axis(module, output)
            mean, std = channel_moments(output, axis)
            measured[name] = (mean, std)
            goal_mean, goal_std = targets[name]
            scale = (goal_std / std.clamp_min(eps)).to(output.dtype)
            shift = (goal_mean - mean * scale.double()).to(output.dtype)
            shape = [1] * output.ndim
            shape[axis] = -1
            return output * scale.view(shape) + shift.view(shape)
        return fn

    run_with_hooks(model, {modules[n]: hook(n) for n in targets}, data)
    for name, (mean, std) in measured.items():
        module = modules[name]
        goal_mean, goal_std = targets[name]
        scale = goal_std / std.clamp_min(eps)
        weight = module.weight
        out_axis = 1 if getattr(module, "transposed", False) else 0
        shape = [1] * weight.ndim
        shape[out_axis] = -1
        weight.data.mul_(scale.view(shape).to(weight.dtype))
        bias = module.bias.double() if module.bias is not None else torch.zeros_like(mean)
        new_bias = bias * scale + goal_mean - mean * scale
        if module.bias is None:
            module.bias = nn.Parameter(new_bias.to(weight.dtype))
        else:
            module.bias.data.copy_(new_bias.to(weight.dtype))


def batchnorm_members(folded: nn.Module, discovery: Any, plan: Any) -> dict[str, torch.Tensor]:
    """Cluster label of every original channel, for each BN of `folded` whose channels are one
    folded group's channels in order (merged channel c = cluster c); unfolded BNs map
    one-to-one. BNs with any other layout (e.g. concatenations) are left out."""
    members: dict[str, torch.Tensor] = {}
    for group in discovery.groups:
        gp = plan.groups.get(group.name)
        if gp is None or group.kind != "channels":
            continue
        for slot in group.slots:
            bn = slot.module
            if (isinstance(bn, nn.modules.batchnorm._BatchNorm)
                    and slot.idxs == list(range(group.n)) == slot.root_idxs):
                members[slot.name] = torch.tensor(gp.labels)
    for name, bn in folded.named_modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and name not in members:
            members[name] = torch.arange(bn.num_features)
    return members


@torch.no_grad()
def debias_batchnorm(original: nn.Module, folded: nn.Module, members: dict[str, torch.Tensor],
                     data: Any) -> int:
    """Correct statistics measured on synthetic `data` by the gap the ORIGINAL model shows
    between its stored (real-data) statistics and the same synthetic data.

    For merged channel c with members S: mean += mean_S(mu_real - mu_syn) and
    var *= mean_S(var_real) / mean_S(var_syn). Synthetic images match the original BN
    statistics only approximately; the folded model sees the same bias, so its statistics on
    them are corrected by it. Returns the number of BN layers corrected."""
    import copy

    probe = copy.deepcopy(original)
    reset_batchnorm(probe, data)
    synthetic = dict(probe.named_modules())
    originals = dict(original.named_modules())
    done = 0
    for name, bn in folded.named_modules():
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or name not in members:
            continue
        real, syn = originals.get(name), synthetic.get(name)
        if real is None or real.running_var is None or bn.running_var is None:
            continue
        labels = members[name].to(bn.running_mean.device)
        k = bn.num_features
        if labels.numel() != real.num_features or int(labels.max()) + 1 != k:
            continue
        shift = cluster_mean(real.running_mean - syn.running_mean, labels, k)
        scale = (cluster_mean(real.running_var, labels, k)
                 / cluster_mean(syn.running_var, labels, k).clamp_min(1e-12))
        bn.running_mean.add_(shift.to(bn.running_mean.dtype))
        bn.running_var.mul_(scale.to(bn.running_var.dtype))
        done += 1
    return done


def cluster_mean(values: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster average (float64) of per-channel `values` under `labels` (n,) in [0, k)."""
    sizes = torch.bincount(labels, minlength=k).double()
    out = torch.zeros(k, dtype=torch.float64, device=values.device)
    return out.index_add_(0, labels, values.double()) / sizes
