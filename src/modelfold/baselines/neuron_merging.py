"""Neuron Merging (Kim, Kim, Park, Jeon, "Neuron Merging: Compensating for Pruned Neurons",
NeurIPS 2020, arXiv 2010.13160; code github.com/friendshipkim/neuron-merging).

Data-free. Each group keeps the k channels with the largest L1 norm of their producer filters
(the paper's default criterion, on the raw weights: the kept set is SP-L1's). Every pruned
channel i is then matched to the kept channel r with the most similar filter; when the cosine
similarity reaches the threshold `t`, the pruned channel is treated as the positive multiple
S = ||v_i|| / ||v_r|| of the kept one (ReLU(S z) = S ReLU(z)) and its consumer columns are added
to r's with that scale (W_c' = W_c Z); below `t` it is simply dropped. Producers keep their rows.

Filter vectors: the paper compares [w, b] for linear layers and adds a bias penalty (weight
lambda) for conv + BN. Here BN scales are folded into the producers first
(`modelfold.merge.batchnorm`), so every filter is [w, b] of the BN-folded network and the
linear-layer rule is exact for BN networks too (a channel whose folded filter and shift are a
positive multiple of a kept one is reproduced exactly; the tests check it). Default t = 0.1, the
paper's value for conv nets with BN (0.45 for fully connected nets). Attention heads (not in the
paper) are pruned without compensation: attention is not positively homogeneous in q and k.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelfold.baselines.driver import compress, group_blocks
from modelfold.baselines.magnitude import channel_norms, top_k
from modelfold.errors import FoldError
from modelfold.graph import ChannelGroup
from modelfold.merge.apply import ChannelMap


def neuron_merging(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float,
    threshold: float = 0.1,
    module_ratios: dict[str, float] | None = None,
    ignored: tuple[nn.Module, ...] | list[nn.Module] = (),
) -> nn.Module:
    """Neuron Merging on a copy of `model`: SP-L1's kept set, pruned channels compensated."""
    if not -1.0 <= threshold <= 1.0:
        raise FoldError(f"neuron_merging: threshold is a cosine similarity in [-1, 1], got "
                        f"{threshold!r}.")
    return compress(
        model, example_inputs, method="neuron-merging", ratio=ratio,
        make_map=lambda group, k, norms: neuron_merging_map(group, k, norms, threshold),
        score=lambda group: channel_norms(group, 1), module_ratios=module_ratios,
        ignored=ignored, fold_bn=True, config={"threshold": threshold})


def neuron_merging_map(group: ChannelGroup, k: int, norms: torch.Tensor,
                       threshold: float) -> ChannelMap:
    pick = ChannelMap.selection(top_k(norms, k), group.n)
    if group.kind == "heads":
        return pick
    blocks = group_blocks(group)
    vectors = torch.cat(blocks.producer_weights + blocks.producer_biases, dim=1)
    keep = pick.keep.tolist()
    kept = vectors[keep]
    length = vectors.norm(dim=1)
    cosine = (vectors @ kept.T) / (length[:, None] * kept.norm(dim=1)[None, :]).clamp_min(1e-30)
    best, match = cosine.max(dim=1)
    z = pick.consumer.clone()  # (k, n): kept channels map to themselves
    kept_set = set(keep)
    for i in range(group.n):
        if i in kept_set or float(best[i]) < threshold:
            continue
        r = int(match[i])
        z[r, i] = float(length[i] / length[keep[r]].clamp_min(1e-30))
    return ChannelMap(pick.keep, producer=pick.producer, consumer=z)
