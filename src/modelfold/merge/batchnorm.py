"""Fold BatchNorm scales into the conv/linear layer that feeds them (for merge baselines).

IFM, INN and Intra-Fusion combine producer rows with weights that are not a cluster mean (sums,
interpolation, transport plans). A BN between producer and activation is not linear in its
channel's statistics, so those combinations are only meaningful on the BN-folded network:
W <- a W, b <- a b with a = gamma / sqrt(var + eps), and the BN keeps only its shift
beta - a mu (gamma = 1, mean = 0, var = 1 - eps, so it is exactly x + shift in eval mode). The
shift is a per-channel bias and is mixed like one; `restore_identity` puts gamma, mean and var
back to the identity after the mixing. The function of the network (eval mode) is unchanged.
Torch-Pruning has no such transform that keeps the modules in place, hence this one.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

_FILTERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
            nn.ConvTranspose3d)


def _feeding_filter(graph: tp.DependencyGraph, bn: nn.Module) -> nn.Module | None:
    """The conv/linear whose output goes to `bn` alone, if there is one."""
    node = graph.module2node.get(bn)
    if node is None or len(node.inputs) != 1:
        return None
    source = node.inputs[0]
    if not isinstance(source.module, _FILTERS) or len(source.outputs) != 1:
        return None
    return source.module


@torch.no_grad()
def fold_batchnorms(model: nn.Module, graph: tp.DependencyGraph) -> list[nn.Module]:
    """Fold every foldable BN's scale into its producer; returns the BNs changed."""
    folded = []
    for bn in model.modules():
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine \
                or bn.running_var is None:
            continue
        layer = _feeding_filter(graph, bn)
        if layer is None:
            continue
        scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
        out_axis = 1 if transposed else 0
        if transposed and layer.groups > 1:
            continue  # out channels are interleaved across groups; leave this BN as it is
        shape = [1] * layer.weight.ndim
        shape[out_axis] = -1
        layer.weight.copy_((layer.weight.double() * scale.view(shape)).to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_((layer.bias.double() * scale).to(layer.bias.dtype))
        bn.bias.copy_((bn.bias.double() - scale * bn.running_mean.double()).to(bn.bias.dtype))
        folded.append(bn)
    restore_identity(folded)
    return folded


@torch.no_grad()
def restore_identity(bns: list[nn.Module]) -> None:
    """gamma = 1, mean = 0, var = 1 - eps: each BN is x + beta in eval mode."""
    for bn in bns:
        bn.weight.fill_(1.0)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
