"""Intra-Fusion (Theus, Geimer, Wicke, Hofmann, Anagnostidis, Singh, "Towards Meta-Pruning via
Optimal Transport", ICLR 2024, arXiv 2402.07839; code github.com/alexandertheus/Intra-Fusion).

Data-free. BN scales are folded into the producers, each group keeps the k channels of largest
L1 importance (mean over the group's producer rows and consumer columns of each channel's
summed |w|), and instead of discarding the others every channel is *fused* into the kept ones
by exact optimal transport (POT's `ot.emd`, network simplex): uniform marginals 1/n over all n
channels and 1/k over the kept ones, cost = L1 distance between L2-normalised pairing vectors
[producer rows | consumer columns]. With the plan G (n x k), a kept channel's producer rows
become the transport-weighted average of the rows sent to it (G[:, r] / sum G[:, r]) and its
consumer columns the transport-weighted sum of the columns sent to it (each channel's mass
split over its targets: G[i, :] / sum G[i, :]).

What differs from the reference code, and why: the code applies the same source-normalised map
to producers and consumers, so a fused channel's output is scaled by about n/k (two exact
duplicates give twice their contribution). Averaging producers and summing consumers, as here,
is the only normalisation under which fusing duplicates is exact (tested).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from modelfold._optional import require
from modelfold.baselines.driver import compress, group_blocks
from modelfold.baselines.magnitude import top_k
from modelfold.graph import ChannelGroup
from modelfold.merge.apply import ChannelMap


def intra_fusion(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float,
    module_ratios: dict[str, float] | None = None,
    ignored: tuple[nn.Module, ...] | list[nn.Module] = (),
) -> nn.Module:
    """Intra-Fusion on a copy of `model` (see the module doc)."""
    return compress(model, example_inputs, method="intra-fusion", ratio=ratio,
                    make_map=intra_fusion_map, module_ratios=module_ratios, ignored=ignored,
                    fold_bn=True)


def intra_fusion_map(group: ChannelGroup, k: int, _score: torch.Tensor | None = None
                     ) -> ChannelMap:
    # POT, the optimal-transport library the reference code uses
    ot = require("ot", "bench", "the Intra-Fusion baseline")

    blocks = group_blocks(group)
    weights = blocks.producer_weights + blocks.consumer_weights
    importance = torch.stack([b.abs().sum(1) for b in weights]).mean(0)
    keep = top_k(importance, k)
    vectors = torch.cat(weights, dim=1)
    vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-30)
    cost = torch.cdist(vectors, vectors[keep], p=1).numpy()
    n = group.n
    plan = ot.emd(np.full(n, 1.0 / n), np.full(k, 1.0 / k), cost)  # (n, k)
    g = torch.from_numpy(np.asarray(plan, dtype=np.float64)).T  # (k, n)
    producer = g / g.sum(1, keepdim=True).clamp_min(1e-300)
    consumer = g / g.sum(0, keepdim=True).clamp_min(1e-300)
    return ChannelMap(torch.tensor(keep), producer=producer, consumer=consumer)
