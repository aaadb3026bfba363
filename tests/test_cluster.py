"""Clusterers and the merge arithmetic."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from modelfold.cluster import kmeans, ward
from modelfold.cluster.kmeans import canonical_labels
from modelfold.graph.handlers import _bn_stats
from modelfold.graph.layout import SlotLayout
from modelfold.merge.apply import ChannelMap
from modelfold.merge.plan import GroupPlan


def blobs(k: int = 5, per: int = 20, d: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=gen) * 10
    truth = torch.arange(k).repeat_interleave(per)
    x = centers[truth] + 0.1 * torch.randn(k * per, d, generator=gen)
    perm = torch.randperm(k * per, generator=gen)
    return x[perm], truth[perm]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(canonical_labels(a), canonical_labels(b))


@pytest.mark.parametrize("cluster", ["kmeans", "ward"])
def test_well_separated_blobs_are_recovered(cluster):
    x, truth = blobs()
    labels = kmeans(x, 5, seed=0).labels if cluster == "kmeans" else ward(x, 5)
    assert same_partition(labels, truth)


def test_kmeans_is_deterministic_and_canonical():
    x, _ = blobs(k=7, per=9, d=3, seed=4)
    a, b = kmeans(x, 10, seed=1), kmeans(x, 10, seed=1)
    assert torch.equal(a.labels, b.labels) and a.inertia == b.inertia
    # clusters are numbered by their first member
    firsts = [int(torch.nonzero(a.labels == c)[0]) for c in range(10)]
    assert firsts == sorted(firsts)


def test_kmeans_always_returns_exactly_k_nonempty_clusters():
    x = torch.tensor([[0.0, 0.0]] * 6 + [[1.0, 1.0]] * 4)  # 2 distinct points, k = 5
    labels = kmeans(x, 5, seed=0).labels
    assert torch.bincount(labels, minlength=5).min() >= 1 and labels.max() == 4


def test_kmeans_inertia_is_no_worse_than_sklearn():
    sklearn = pytest.importorskip("sklearn.cluster")
    x, _ = blobs(k=12, per=15, d=16, seed=2)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    x = x + noise * 5  # overlapping clusters: a real optimisation problem
    ours = kmeans(x, 12, n_init=10, seed=0).inertia
    ref = sklearn.KMeans(12, n_init=10, random_state=0).fit(x.numpy()).inertia_
    assert ours <= ref * 1.01


def lowrank_rows(n: int = 300, d: int = 48, seed: int = 0) -> torch.Tensor:
    """Rows like trained weights (shared low-rank structure plus noise): the k ~ n regime."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 8, generator=gen) @ torch.randn(8, d, generator=gen)
            + 0.5 * torch.randn(n, d, generator=gen))


@pytest.mark.parametrize("k", [150, 240])
def test_hartigan_refinement_lowers_inertia_and_keeps_k_clusters(k):
    x = lowrank_rows()
    lloyd = kmeans(x, k, n_init=1, seed=0)
    refined = kmeans(x, k, n_init=1, seed=0, hartigan=True)
    counts = torch.bincount(refined.labels, minlength=k)
    assert counts.min() >= 1 and refined.labels.max() == k - 1
    assert refined.inertia < 0.97 * lloyd.inertia  # Lloyd stalls when k ~ n; moves do not
    # the reported inertia is the partition's true within-cluster sum of squares
    xc = x.double() - x.double().mean(0)
    cent = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, refined.labels, xc)
    cent /= counts[:, None]
    assert refined.inertia == pytest.approx(float(((xc - cent[refined.labels]) ** 2).sum()),
                                            rel=1e-4)


def test_hartigan_keeps_planted_duplicates_together():
    base = lowrank_rows(n=40, d=12, seed=5)
    x = torch.cat([base, base[:25]])  # 25 planted duplicates: k = 40 is a zero-inertia fold
    res = kmeans(x, 40, seed=0, hartigan=True)
    assert res.inertia == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(res.labels[40:], res.labels[:25])


def test_chunked_distances_give_the_same_clustering(monkeypatch):
    km = importlib.import_module("modelfold.cluster.kmeans")  # the module, not the function

    x = lowrank_rows()
    whole = kmeans(x, 200, seed=0, hartigan=True)
    monkeypatch.setattr(km, "_CHUNK_ELEMENTS", 1000)  # 5 rows per block
    chunked = kmeans(x, 200, seed=0, hartigan=True)
    assert torch.equal(whole.labels, chunked.labels)
    assert chunked.inertia == pytest.approx(whole.inertia, rel=1e-5)


def true_inertia(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    xc = x.double() - x.double().mean(0)
    counts = torch.bincount(labels, minlength=k)
    cent = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, labels, xc)
    return float(((xc - cent[labels] / counts[labels, None]) ** 2).sum())


def reference_kmeans(x: torch.Tensor, k: int, n_init: int = 3, seed: int = 0):
    """Plain float64 greedy k-means++ and Lloyd, drawing from the generator exactly as
    `kmeans` does, with explicit centroids and no shortcuts: (canonical labels, inertia)."""
    x = x.double() - x.double().mean(0)
    n, trials = x.shape[0], 2 + int(math.log(k))
    gen = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(n_init):
        chosen = [int(torch.randint(n, (1,), generator=gen))]
        closest = ((x - x[chosen[0]]) ** 2).sum(1)
        for _ in range(1, k):
            cand = torch.multinomial(closest, trials, replacement=True, generator=gen)
            trial = torch.minimum(closest, torch.cdist(x[cand], x) ** 2)
            j = int(trial.sum(1).argmin())
            chosen.append(int(cand[j]))
            closest = trial[j]
        centers, previous = x[chosen], None
        for _ in range(100):
            labels = (torch.cdist(x, centers) ** 2).argmin(1)
            if previous is not None and torch.equal(labels, previous):
                break
            previous = labels
            counts = torch.bincount(labels, minlength=k)
            assert counts.min() > 0  # these test problems never empty a cluster
            centers = torch.zeros_like(centers).index_add_(0, labels, x) / counts[:, None]
        labels = (torch.cdist(x, centers) ** 2).argmin(1)
        inertia = float(((x - centers[labels]) ** 2).sum())
        if best is None or inertia < best[1]:
            best = (canonical_labels(labels), inertia)
    return best


@pytest.mark.parametrize(("k", "seed"), [(5, 0), (12, 1), (40, 2)])
def test_kmeans_matches_a_plain_reference_implementation(k, seed):
    x, _ = blobs(k=8, per=12, d=6, seed=seed)
    x = x + 3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    labels, inertia = reference_kmeans(x, k, seed=seed)
    ours = kmeans(x, k, seed=seed)
    assert torch.equal(ours.labels, labels)
    assert ours.inertia == pytest.approx(inertia, rel=1e-5)


@pytest.mark.parametrize("k", [30, 200, 280])
def test_pairwise_matrix_path_gives_the_same_clustering(monkeypatch, k):
    """Up to a few thousand rows seeding and Lloyd read one pairwise distance matrix; beyond,
    they take matrix products with x. Both compute the same clustering."""
    km = importlib.import_module("modelfold.cluster.kmeans")  # the module, not the function

    x = lowrank_rows()
    fast = kmeans(x, k, seed=0)
    monkeypatch.setattr(km, "_PAIRWISE_ELEMENTS", 0)
    direct = kmeans(x, k, seed=0)
    assert torch.equal(fast.labels, direct.labels)
    # each reports its partition's true inertia (the pairwise path has exact zeros for
    # singletons, the direct one float32 rounding noise)
    true = true_inertia(x, fast.labels, k)
    assert fast.inertia == pytest.approx(true, rel=1e-5)
    assert direct.inertia == pytest.approx(true, rel=1e-4)


def test_pairwise_assignment_equals_distances_to_explicit_centers():
    km = importlib.import_module("modelfold.cluster.kmeans")
    x = lowrank_rows(n=120, d=20, seed=7)
    x = x - x.mean(0)
    x_sq = (x * x).sum(1)
    pair = km._pairwise(x, x_sq)
    seeds = torch.randperm(120, generator=torch.Generator().manual_seed(0))[:15]
    members = torch.arange(120) % 15
    members[members == 4] = 3  # cluster 4 is empty: it sits on a re-seeded row
    centers = torch.zeros(15, 20).index_add_(0, members, x)
    centers /= torch.bincount(members, minlength=15).clamp_min(1)[:, None]
    centers[4] = x[99]
    labels, dist = km._pair_assign(pair, seeds, members, {4: 99})
    ref_labels, ref_dist = km._assign(x, x_sq, centers)
    assert torch.equal(labels, ref_labels)
    assert torch.allclose(dist, ref_dist, rtol=1e-4, atol=1e-4)
    labels, dist = km._pair_assign(pair, seeds, None, {})
    assert torch.equal(labels, km._assign(x, x_sq, x[seeds])[0])


@pytest.mark.parametrize("pairwise", [True, False])
def test_duplicates_fold_losslessly(monkeypatch, pairwise):
    km = importlib.import_module("modelfold.cluster.kmeans")
    if not pairwise:
        monkeypatch.setattr(km, "_PAIRWISE_ELEMENTS", 0)
    base = lowrank_rows(n=40, d=12, seed=5)
    x = torch.cat([base, base[:25]])  # k = 40: every duplicate joins its twin, inertia 0
    res = kmeans(x, 40, seed=0)
    assert torch.equal(res.labels[40:], res.labels[:25])
    assert torch.equal(res.labels[:40], torch.arange(40))
    if pairwise:  # duplicates are exactly 0 apart in the pairwise matrix
        assert res.inertia == 0.0
    else:
        assert res.inertia == pytest.approx(0.0, abs=1e-3)


def test_edge_cases_of_k():
    x, _ = blobs(k=2, per=3)
    assert torch.equal(kmeans(x, 6).labels, torch.arange(6))
    assert kmeans(x, 1).labels.tolist() == [0] * 6
    assert ward(x, 1).tolist() == [0] * 6
    with pytest.raises(ValueError):
        kmeans(x, 0)


def test_layout_mean_and_sum_with_flatten_expansion():
    # 3 channels, each spanning 2 positions (as after flattening a 2-pixel map)
    layout = SlotLayout.build([0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 2, 2], 3, "fc")
    w = torch.arange(12.0).reshape(2, 6)  # consumer: columns are positions
    cmap = ChannelMap.from_labels(GroupPlan("fc", "channels", 3, 2, [0, 1, 0]))
    summed = layout.mix(w, 1, cmap.consumer, cmap.keep)
    assert torch.equal(summed[:, 0], w[:, 0] + w[:, 4])
    assert torch.equal(summed[:, 1], w[:, 1] + w[:, 5])
    assert torch.equal(summed[:, 2:4], w[:, 2:4])
    rows = torch.arange(6.0)
    meaned = layout.mix(rows, 0, cmap.producer, cmap.keep)
    assert meaned[:2].tolist() == [2.0, 3.0]


def test_bn_statistics_follow_the_inverse_std_rule():
    bn = torch.nn.BatchNorm1d(2, eps=1e-5)
    bn.running_mean.copy_(torch.tensor([1.0, 3.0]))
    bn.running_var.copy_(torch.tensor([4.0, 16.0]))
    layout = SlotLayout.build([0, 1], [0, 1], 2, "bn")
    cmap = ChannelMap.from_labels(GroupPlan("bn", "channels", 2, 1, [0, 0]))
    _bn_stats(bn, lambda t, axis, red: layout.mix(t, axis, cmap.matrix(red), cmap.keep))
    std = torch.tensor([4.0, 16.0]).add(1e-5).sqrt()
    inv = (1 / std).mean()
    assert torch.allclose(bn.running_var[0], 1 / inv**2 - 1e-5)
    assert torch.allclose(bn.running_mean[0], (torch.tensor([1.0, 3.0]) / std).mean() / inv)
    # the merged normalisation map is the average of the members' maps
    z = torch.linspace(-3, 3, 7)
    merged = (z - bn.running_mean[0]) / (bn.running_var[0] + 1e-5).sqrt()
    members = ((z[:, None] - torch.tensor([1.0, 3.0])) / std).mean(1)
    assert torch.allclose(merged, members, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kmeans_on_cuda_matches_cpu():
    x, _ = blobs()
    assert same_partition(kmeans(x.cuda(), 5, seed=0).labels.cpu(), kmeans(x, 5, seed=0).labels)
    rows = lowrank_rows()
    gpu = kmeans(rows.cuda(), 200, seed=0, hartigan=True)
    cpu = kmeans(rows, 200, seed=0, hartigan=True)
    assert gpu.labels.device.type == "cuda"
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=0.02)
