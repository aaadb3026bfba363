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


def _exact_zeros(d: torch.Tensor, x_sq: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    """Zero the distances the |x|^2 - 2 x.c + |c|^2 expansion cannot tell from 0 in float32
    (relative rounding ~1e-6 of |x|^2 + |c|^2), so duplicates of a chosen center get exactly
    zero k-means++ weight and are never picked again."""
    tiny = 1e-5 * (x_sq[:, None] + c_sq[None, :])
    return d.masked_fill_(d <= tiny, 0.0)


def _plus_plus(
    x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator,
    pair: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row indices of k centers by greedy k-means++ (as scikit-learn): of 2 + ln k candidates
    drawn by D^2 sampling, keep the one that lowers the potential most; the winner's distances
    become the new closest-center distances. `pair` (n, n), when given, holds every pairwise
    squared distance (`_pairwise`), so each step is a row lookup instead of a matrix product
    with x. The loop runs k times: it keeps to a handful of torch calls per step."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))

    def rows(idx: torch.Tensor) -> torch.Tensor:  # (len(idx), n) distances of idx to all
        if pair is not None:
            return pair.index_select(0, idx)
        return _exact_zeros(_sq_dists(x[idx], x_sq[idx], x), x_sq[idx], x_sq)

    first = int(torch.randint(n, (1,), generator=gen))
    centers = [first]
    closest = rows(torch.tensor([first], device=x.device))[0]
    for _ in range(1, k):
        weights = closest.double().cpu()  # multinomial normalises D^2 itself
        if not float(weights.sum()) > 0:  # fewer distinct points than k: take an unused one
            unused = torch.ones(n, dtype=torch.bool, device=x.device)
            unused[centers] = False
            centers.append(int(torch.nonzero(unused)[0]))
            continue
        candidates = torch.multinomial(weights, trials, replacement=True, generator=gen)
        trial = torch.minimum(closest, rows(candidates.to(x.device)))
        j = int(trial.sum(1).argmin())
        centers.append(candidates.tolist()[j])
        closest = trial[j]
    return torch.tensor(centers, device=x.device)


def _pairwise(x: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """(n, n) squared distances between all rows, exactly 0 between duplicates (symmetric)."""
    d = _exact_zeros(_sq_dists(x, x_sq, x), x_sq, x_sq)
    return torch.minimum(d, d.T)  # one matmul can round (i, j) and (j, i) differently


_CHUNK_ELEMENTS = 1 << 25  # distance-matrix block: 128 MB of float32 per chunk of rows
_PAIRWISE_ELEMENTS = 1 << 24  # n x n matrix for seeding up to n = 4096 (64 MB of float32)


def _assign(
    x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest center and squared distance of every row, in row chunks so the n x k distance
    matrix is never materialised whole (LLaMA-70B MLP: 28672 x 17000 would be 2 GB)."""
    n, k = x.shape[0], centers.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    dist = torch.empty(n, dtype=x.dtype, device=x.device)
    for lo in range(0, n, step):
        rows = slice(lo, lo + step)
        dist[rows], labels[rows] = _sq_dists(x[rows], x_sq[rows], centers).min(1)
    return labels, dist


def _pair_assign(
    pair: torch.Tensor, seeds: torch.Tensor, members: torch.Tensor | None,
    reseeded: dict[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_assign` from the pairwise matrix alone, O(n^2) instead of O(n k d). The centers are
    the rows `seeds` while `members` is None, else the means of the rows `members` labels c,
    |x - mean|^2 = mean_m |x - x_m|^2 - mean_{m, m'} |x_m - x_m'|^2 / 2, except the clusters
    in `reseeded` (cluster -> row), which sit on that row (every cluster without members
    must be among them). Few, large torch calls: each one is a thread-pool round trip."""
    if members is None:
        d = pair.index_select(1, seeds)
    else:
        # (n, k) layout throughout: torch's min over dim 1 is far faster than over dim 0.
        k = seeds.numel()
        sums = pair @ _one_hot(members, k, pair.dtype)
        inv = torch.bincount(members, minlength=k).clamp_min_(1).to(pair.dtype).reciprocal_()
        own = sums.gather(1, members[:, None]).squeeze(1)
        spread = torch.zeros(k, dtype=pair.dtype, device=pair.device).index_add_(0, members,
                                                                                own)
        d = torch.addcmul(spread * inv * inv * -0.5, sums, inv)
        if reseeded:
            cols = torch.tensor(list(reseeded), device=pair.device)
            rows = torch.tensor(list(reseeded.values()), device=pair.device)
            d.index_copy_(1, cols, pair.index_select(1, rows))
    dist, labels = d.min(1)
    return labels, dist.clamp_min_(0)


def _lloyd(
    x: torch.Tensor, x_sq: torch.Tensor, seeds: torch.Tensor, max_iter: int, tol: float,
    pair: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Lloyd iterations from the rows `seeds` with scikit-learn's stopping rules: labels
    unchanged (strict convergence) or total squared center shift <= tol * mean feature
    variance. With `pair` (`_pairwise`) the assignments read distances from it."""
    n, k = x.shape[0], seeds.numel()
    centers = x[seeds]
    # Centers as `_pair_assign` sees them: the seed rows, then the means of the rows `members`
    # labels c except re-seeded empty clusters (cluster -> row).
    members: torch.Tensor | None = None
    reseeded: dict[int, int] = {}

    def assign() -> tuple[torch.Tensor, torch.Tensor]:
        if pair is not None:
            return _pair_assign(pair, seeds, members, reseeded)
        return _assign(x, x_sq, centers)

    scale = float(x_sq.sum()) / ((n - 1) * max(x.shape[1], 1)) if n > 1 else 1.0  # x is centred
    previous = None
    for _ in range(max_iter):
        labels, dist = assign()
        if previous is not None and torch.equal(labels, previous):
            break
        previous = labels
        counts = torch.bincount(labels, minlength=k)
        new = _one_hot(labels, k, x.dtype).T @ x
        reseeded = {}
        empty = counts == 0
        if bool(empty.any()):  # re-seed empty clusters with the worst-fitted points
            worst = dist.argsort(descending=True)
            for j, c in enumerate(torch.nonzero(empty).flatten().tolist()):
                new[c] = x[worst[j]]
                counts[c] = 1
                reseeded[c] = int(worst[j])
        new /= counts[:, None].to(new.dtype)
        shift = float(((new - centers) ** 2).sum())
        centers, members = new, labels
        if shift <= tol * max(scale, 1e-30):
            break
    labels, dist = assign()
    # A final assignment can empty a cluster when points coincide; give it its own center's
    # nearest point so exactly k clusters remain.
    counts = torch.bincount(labels, minlength=k)
    for c in torch.nonzero(counts == 0).flatten().tolist():
        donors = torch.nonzero(torch.bincount(labels, minlength=k)[labels] > 1).flatten()
        gap = ((x[donors] - centers[c]) ** 2).sum(1)
        pick = donors[gap.argmin()]
        labels[pick] = c
        dist[pick] = gap.min()
    return labels, float(dist.sum())


def _hartigan(
    x: torch.Tensor, x_sq: torch.Tensor, labels: torch.Tensor, k: int, max_rounds: int
) -> torch.Tensor:
    """Hartigan single-point moves after Lloyd. Moving point i from cluster s (n_s members)
    to t changes the inertia by n_t/(n_t+1) |x_i-c_t|^2 - n_s/(n_s-1) |x_i-c_s|^2, which Lloyd
    ignores: with k close to n most clusters hold one or two points and Lloyd stalls where
    these exact moves still help. Every round applies the best improving moves of all points
    that touch pairwise-distinct clusters, so each round lowers the inertia by the sum of its
    gains exactly. Singletons never move (exactly k clusters stay non-empty)."""
    n = x.shape[0]
    step = max(1, _CHUNK_ELEMENTS // k)
    for _ in range(max_rounds):
        centers, counts = _centroids(x, labels, k)
        add_scale = counts / (counts + 1)
        gain = torch.empty(n, dtype=x.dtype, device=x.device)
        target = torch.empty(n, dtype=torch.long, device=x.device)
        for lo in range(0, n, step):
            rows = slice(lo, lo + step)
            d = _sq_dists(x[rows], x_sq[rows], centers)
            own_label = labels[rows, None]
            own = d.gather(1, own_label).squeeze(1)
            n_own = counts[labels[rows]]
            remove = torch.where(n_own > 1, n_own / (n_own - 1).clamp_min(1) * own, -1.0)
            add = (d * add_scale).scatter_(1, own_label, float("inf"))
            best_add, target[rows] = add.min(1)
            # Gains below float32 resolution of the distance expansion are noise.
            gain[rows] = torch.where(remove - best_add > 1e-5 * x_sq[rows],
                                     remove - best_add, 0.0)
        movers = torch.nonzero(gain > 0).flatten()
        if movers.numel() == 0:
            break
        movers = movers[gain[movers].argsort(descending=True)]
        used: set[int] = set()
        chosen, dest = [], []
        for i, s, t in zip(movers.tolist(), labels[movers].tolist(), target[movers].tolist()):
            if s not in used and t not in used:
                used.update((s, t))
                chosen.append(i)
                dest.append(t)
        labels = labels.clone()
        labels[torch.tensor(chosen, device=x.device)] = torch.tensor(dest, device=x.device)
    return labels


def _centroids(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """(k, d) cluster means and (k,) cluster sizes (all clusters non-empty)."""
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    return (_one_hot(labels, k, x.dtype).T @ x) / counts[:, None], counts


def _one_hot(labels: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, k) membership matrix. Cluster sums as a matrix product instead of `index_add_`:
    a scatter along columns is single-threaded and was most of a ResNet18 fold's time, and a
    product is deterministic on CUDA, where `index_add_` uses atomics."""
    out = torch.zeros(labels.numel(), k, dtype=dtype, device=labels.device)
    return out.scatter_(1, labels[:, None], 1.0)


def _inertia(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    centers, _ = _centroids(x, labels, k)
    return float(((x - centers[labels]) ** 2).sum())


def kmeans(
    x: torch.Tensor, k: int, *, n_init: int = 3, max_iter: int = 100, tol: float = 1e-6,
    seed: int = 0, hartigan: bool = False,
) -> KMeansResult:
    """Cluster the rows of `x` (n, d) into exactly k non-empty clusters.

    `hartigan=True` refines every restart with Hartigan single-point moves after Lloyd (up to
    `max_iter` rounds; lower inertia, most so when k is close to n).

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
    # Up to a few thousand rows, all pairwise distances (one matmul, shared by the restarts)
    # are cheaper than the ~k (2 + ln k) candidate products that seeding otherwise needs.
    pair = _pairwise(x, x_sq) if n * n <= _PAIRWISE_ELEMENTS else None
    best: tuple[torch.Tensor, float] | None = None
    for _ in range(n_init):
        seeds = _plus_plus(x, x_sq, k, gen, pair)
        labels, inertia = _lloyd(x, x_sq, seeds, max_iter, tol, pair)
        if hartigan:
            labels = _hartigan(x, x_sq, labels, k, max_iter)
            inertia = _inertia(x, labels, k)
        if best is None or inertia < best[1]:
            best = (labels, inertia)
    assert best is not None
    return KMeansResult(canonical_labels(best[0]), best[1])
