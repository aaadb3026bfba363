"""IFM — Iterative Feature Merging (Chen, Zhou, Yan, "Going Beyond Neural Network Feature
Similarity: The Network Feature Complexity and Its Interpretation Using Category Theory",
ICLR 2024, arXiv 2310.06756; code github.com/Ytchen981/Iterative-Feature-Merging).

Data-free. In every channel group, repeatedly merge the two channels whose pairing vectors
v = [producer rows | consumer columns] (weights only, no normalisation) are closest in squared
Euclidean distance: the merged channel's producer rows and biases are the *sum* of the two, its
consumer columns the mean of the original columns it now stands for (count-weighted), and the
distances are recomputed on the updated vectors. Groups are merged one after another on the
weights the previous groups left (the code merges in rounds, one pair per group per round;
within a group the result is the same).

What differs from the reference code, and why:
* a target width k per group (the sweep's `ratio`) instead of the code's stopping threshold
  min D > beta * max D (beta = 0.1), so that all methods are compared at equal parameter counts.
* BN scales are folded into the producers first (`modelfold.merge.batchnorm`); the code sums raw
  BN parameters, which is wrong by sqrt(2) even for exact duplicates. With BN folded, merging
  channels with identical producer rows is exact under ReLU (the paper's functional
  equivalence), which the tests check.
* the merged weights are written as mean of producer rows and sum of consumer columns. Across a
  positively homogeneous path (ReLU, pooling, residual sums, BN folded into the producer) this
  is the same function as the paper's sum of rows and mean of columns (relu(2z) c/2 =
  relu(z) c); where the path is not homogeneous (a BN that is not directly after its producer,
  as in pre-activation DenseNets; GELU; attention heads) only this form merges duplicates
  exactly. The pairs are chosen on the paper's sum / count-weighted-mean vectors.
* the diagonal is excluded from the argmin (the code can pick a channel paired with itself when
  two channels are exact duplicates).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelfold.baselines.driver import compress, group_blocks
from modelfold.graph import ChannelGroup
from modelfold.merge.apply import ChannelMap


def ifm(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float,
    module_ratios: dict[str, float] | None = None,
    ignored: tuple[nn.Module, ...] | list[nn.Module] = (),
) -> nn.Module:
    """IFM on a copy of `model`: every foldable group merged down to k = round(n (1 - ratio))."""
    return compress(model, example_inputs, method="ifm", ratio=ratio, make_map=ifm_map,
                    module_ratios=module_ratios, ignored=ignored, fold_bn=True, sequential=True)


def ifm_map(group: ChannelGroup, k: int, _score: torch.Tensor | None = None) -> ChannelMap:
    blocks = group_blocks(group)
    producer = torch.cat(blocks.producer_weights, dim=1)
    consumer = torch.cat(blocks.consumer_weights or [producer[:, :0]], dim=1)
    members = ifm_clusters(producer, consumer, k)
    n = group.n
    keep = torch.tensor([min(m) for m in members])
    summed = torch.zeros(k, n, dtype=torch.float64)
    mean = torch.zeros(k, n, dtype=torch.float64)
    for j, m in enumerate(members):
        summed[j, m] = 1.0
        mean[j, m] = 1.0 / len(m)
    # sum of rows + mean of columns == mean of rows + sum of columns across a positively
    # homogeneous path (ReLU, pooling, residual sums, folded BN); the latter also stays exact
    # for duplicates across the paths where the former is not (pre-activation BN, GELU, heads)
    return ChannelMap(keep, producer=mean, consumer=summed)


def ifm_clusters(producer: torch.Tensor, consumer: torch.Tensor, k: int) -> list[list[int]]:
    """Merge closest pairs until k channels are left; returns the members of each, by position.

    `producer` (n, p) rows are summed on a merge, `consumer` (n, c) columns averaged weighted by
    how many original channels each side holds; distances ||v_i - v_j||^2 on [producer|consumer].
    """
    n = producer.shape[0]
    prod, cons = producer.double().clone(), consumer.double().clone()
    count = torch.ones(n, dtype=torch.float64)
    members: list[list[int]] = [[i] for i in range(n)]
    alive = torch.ones(n, dtype=torch.bool)
    vec = torch.cat([prod, cons], dim=1)
    sq = (vec * vec).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * vec @ vec.T).clamp_min(0)
    dist.fill_diagonal_(float("inf"))
    for _ in range(n - k):
        flat = int(torch.argmin(dist))
        i, j = divmod(flat, n)
        i, j = min(i, j), max(i, j)
        prod[i] += prod[j]
        cons[i] = (count[i] * cons[i] + count[j] * cons[j]) / (count[i] + count[j])
        count[i] += count[j]
        members[i] += members[j]
        members[j] = []
        alive[j] = False
        dist[j, :] = float("inf")
        dist[:, j] = float("inf")
        v = torch.cat([prod[i], cons[i]])
        rest = torch.cat([prod, cons], dim=1)
        d = ((rest - v) ** 2).sum(1)
        d[~alive] = float("inf")
        d[i] = float("inf")
        dist[i, :] = d
        dist[:, i] = d
    return [sorted(m) for m, a in zip(members, alive.tolist(), strict=True) if a]
