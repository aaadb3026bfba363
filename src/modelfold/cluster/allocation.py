"""Budget-aware allocation: how many clusters each channel group keeps under one parameter budget.

Uniform folding removes the same fraction of every group. Groups differ in redundancy, though: a
group whose channels come in near-duplicate pairs loses little when folded hard, one whose
channels are all distinct loses much. The data-free signal used here is each group's clustering
distortion curve D_g(k) = within-cluster sum of squares at k clusters / total sum of squares, read
for every k at once from one Ward dendrogram (merge heights h give the added SSE h^2 / 2).

Allocation minimises sum_g D_g(k_g) subject to the parameter budget: for a Lagrange multiplier
lambda every group picks argmin_k D_g(k) + lambda * c_g * k (c_g = parameters one channel of g
costs), and lambda is bisected until the predicted parameter count meets the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch


def distortion_curve(features: torch.Tensor) -> np.ndarray:
    """D(k) for k = 1..n (index k-1): relative within-cluster SSE of the Ward clustering."""
    x = features.detach().double().cpu().numpy()
    n = x.shape[0]
    if n == 1:
        return np.zeros(1)
    total = float(((x - x.mean(0)) ** 2).sum())
    from scipy.cluster.hierarchy import linkage  # imported when used

    heights = linkage(x, method="ward")[:, 2]  # merge m takes n-m clusters to n-m-1
    added = np.cumsum(heights**2 / 2.0)  # SSE after m+1 merges = at n-m-1 clusters
    sse = np.concatenate([[0.0], added])[::-1]  # index k-1 -> SSE at k clusters
    return sse / total if total > 0 else np.zeros(n)


def allocate(curves: Mapping[str, np.ndarray], costs: Mapping[str, float],
             count: Callable[[dict[str, int]], int], budget: int,
             max_ratio: float = 0.9, round_to: int = 1) -> dict[str, int]:
    """Clusters per group (name -> k) with `count(ks)` <= `budget` parameters, minimising the
    summed distortion. `max_ratio` caps what any single group loses (k >= n (1 - max_ratio));
    with `round_to` > 1 only multiples of it (or n) are chosen."""
    names = list(curves)
    floors = {g: max(1, int(np.ceil(len(curves[g]) * (1 - max_ratio)))) for g in names}

    def choose(lam: float) -> dict[str, int]:
        ks = {}
        for g in names:
            n = len(curves[g])
            k = np.arange(1, n + 1)
            objective = curves[g] + lam * costs[g] * k
            objective[: floors[g] - 1] = np.inf
            if round_to > 1:
                objective[(k % round_to != 0) & (k != n)] = np.inf
            # ties (e.g. a zero-distortion plateau at lambda = 0) go to the larger k
            ks[g] = n - int(np.argmin(objective[::-1]))
        return ks

    lo, hi = 0.0, 1.0
    while count(choose(hi)) > budget and hi < 1e12:
        hi *= 4
    best = choose(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        ks = choose(mid)
        if count(ks) <= budget:
            hi, best = mid, ks
        else:
            lo = mid
    return _refill(best, curves, costs, count, budget, round_to)


def _refill(ks: dict[str, int], curves: Mapping[str, np.ndarray], costs: Mapping[str, float],
            count: Callable[[dict[str, int]], int], budget: int, round_to: int) -> dict[str, int]:
    """Give channels back while the budget allows: the Lagrangian choice jumps in steps (flat
    distortion plateaus), so it can land well below the budget. Greedy on distortion saved per
    parameter, one step (1 or `round_to` channels) at a time."""
    ks = dict(ks)
    blocked: set[str] = set()
    while True:
        best, best_gain = None, -1.0
        for g, k in ks.items():
            n = len(curves[g])
            if g in blocked or k >= n:
                continue
            nxt = min(n, k + round_to)
            gain = (curves[g][k - 1] - curves[g][nxt - 1]) / costs[g]
            if gain > best_gain:
                best, best_gain = g, gain
        if best is None:
            return ks
        grown = {**ks, best: min(len(curves[best]), ks[best] + round_to)}
        if count(grown) <= budget:
            ks = grown
        else:
            blocked.add(best)
