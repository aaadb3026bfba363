"""Lloyd k-means with k-means++ seeding, written in torch so it runs batched on CPU and CUDA.

Hand-written on purpose: scikit-learn's KMeans is CPU/NumPy only, and folding needs a seeded,
device-agnostic clusterer that stays inside torch (no round trip for CUDA tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KMeansResult:
    labels: torch.Tensor  # (n,) int64, canonical: clusters numbered by their first member
    inertia: float


def canonical_labels(labels: torch.Tensor) -> torch.Tensor:
    """Renumber clusters in order of their smallest member index (deterministic output)."""
    n = labels.numel()
    first = torch.full((int(labels.max()) + 1,), n, dtype=torch.long, device=labels.device)
    first.scatter_reduce_(0, labels, torch.arange(n, device=labels.device), reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=labels.device)
    return rank[labels]


def _sq_dists(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    d = x_sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    return d.clamp_min_(0)


def _dist_to(x: torch.Tensor, i: int) -> torch.Tensor:
    # Direct differences (not the matmul expansion) so duplicates of a chosen center get
    # exactly zero weight and are never picked again.
    return ((x - x[i]) ** 2).sum(1)


def _plus_plus(
    x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator
) -> torch.Tensor:
    """Greedy k-means++ (as scikit-learn): of 2 + ln k candidates drawn by D^2 sampling, keep
    the one that lowers the potential most."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [first]
    closest = _dist_to(x, first)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:  # fewer distinct points than k: take any unused point
            unused = torch.ones(n, dtype=torch.bool, device=x.device)
            unused[centers] = False
            nxt = int(torch.nonzero(unused)[0])
            centers.append(nxt)
            closest = torch.minimum(closest, _dist_to(x, nxt))
            continue
        probs = (closest / total).double().cpu()
        candidates = torch.multinomial(probs, trials, replacement=True, generator=gen)
        # Potentials of all candidates at once from one matrix product; only the winner's
        # distances are then computed exactly (see `_dist_to`).
        cand = x[candidates.to(x.device)]
        trial = torch.minimum(closest[:, None], _sq_dists(x, x_sq, cand))
        best = int(candidates[int(trial.sum(0).argmin())])
        centers.append(best)
        closest = torch.minimum(closest, _dist_to(x, best))
    return x[centers].clone()


def _lloyd(
    x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor, max_iter: int, tol: float
) -> tuple[torch.Tensor, float]:
    n, k = x.shape[0], centers.shape[0]
    scale = float(x.var(0).mean()) if n > 1 else 1.0
    for _ in range(max_iter):
        d = _sq_dists(x, x_sq, centers)
        labels = d.argmin(1)
        counts = torch.bincount(labels, minlength=k)
        new = torch.zeros_like(centers).index_add_(0, labels, x)
        empty = counts == 0
        if bool(empty.any()):  # re-seed empty clusters with the worst-fitted points
            worst = d.gather(1, labels[:, None]).squeeze(1).argsort(descending=True)
            for j, c in enumerate(torch.nonzero(empty).flatten().tolist()):
                new[c] = x[worst[j]]
                counts[c] = 1
        new /= counts[:, None].to(new.dtype)
        shift = float(((new - centers) ** 2).sum(1).max())
        centers = new
        if shift <= tol * max(scale, 1e-30):
            break
    d = _sq_dists(x, x_sq, centers)
    labels = d.argmin(1)
    # A final assignment can empty a cluster when points coincide; give it its own center's
    # nearest point so exactly k clusters remain.
    counts = torch.bincount(labels, minlength=k)
    for c in torch.nonzero(counts == 0).flatten().tolist():
        donors = torch.nonzero(torch.bincount(labels, minlength=k)[labels] > 1).flatten()
        pick = donors[d[donors, c].argmin()]
        labels[pick] = c
    inertia = float(d.gather(1, labels[:, None]).sum())
    return labels, inertia


def kmeans(
    x: torch.Tensor, k: int, *, n_init: int = 3, max_iter: int = 100, tol: float = 1e-6,
    seed: int = 0,
) -> KMeansResult:
    """Cluster the rows of `x` (n, d) into exactly k non-empty clusters.

    Deterministic for a given seed on a given device. k = n returns the identity clustering.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    if k == n:
        return KMeansResult(torch.arange(n, device=x.device), 0.0)
    x = x.float()
    x = x - x.mean(0)  # centring keeps |x|^2 - 2 x.c + |c|^2 accurate in float32
    if k == 1:
        labels = torch.zeros(n, dtype=torch.long, device=x.device)
        return KMeansResult(labels, float(((x - x.mean(0)) ** 2).sum()))
    x_sq = (x * x).sum(1)
    gen = torch.Generator().manual_seed(seed)
    best: tuple[torch.Tensor, float] | None = None
    for _ in range(n_init):
        centers = _plus_plus(x, x_sq, k, gen)
        labels, inertia = _lloyd(x, x_sq, centers, max_iter, tol)
        if best is None or inertia < best[1]:
            best = (labels, inertia)
    assert best is not None
    return KMeansResult(canonical_labels(best[0]), best[1])
