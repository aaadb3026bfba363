"""INN — Integral Neural Networks (Solodskikh, Kurbanov, Aydarkhanov, Zhelavskaya, Parfenov,
Song, Lefkimmiatis, CVPR 2023; code github.com/TheStageAI/TorchIntegral), used as the folding
paper compares with it: a trained network converted and resized without data or fine-tuning.

Per channel group:
1. BN scales are folded into the producers (TorchIntegral's `fuse_bn`).
2. Channels are ordered so the weights are smooth along the channel axis: an open-path
   travelling-salesman tour over the channels with d(i, j) = sum over the group's tensors of the
   mean |t_i - t_j| (total variation), found by 2-opt from several starts (TorchIntegral:
   `NOptPermutation`, 100 random starts, stop at 0.1 % relative improvement). Here: one
   nearest-neighbour start plus `restarts` random ones, each 2-opt run to a local optimum with
   best-improvement moves; a correct 2-opt gain (the code's counts one edge twice and never moves
   the end points).
3. The ordered samples sit on a uniform grid t_i = linspace(-1, 1, n); every tensor is a
   function of t through cubic convolution interpolation (Keys, a = -0.75, clamped borders,
   = `grid_sample(mode="bicubic", align_corners=True, padding_mode="border")`).
4. Resizing to k channels evaluates producer rows and biases at linspace(-1, 1, k); consumer
   columns are integrands, so they are divided by the trapezoid weights of the n-point grid and
   multiplied by those of the k-point grid (interior (n - 1)/(k - 1), halved at both ends).

Choices the paper leaves open: the number of random starts (default 10 here: the tour length is
within a fraction of a percent of 100 starts on our models, at a tenth of the time); a group of
k = 1 is sampled at the centre with the whole interval as its weight; BNs that cannot be folded
(their conv output has other users) are resampled like biases. No anti-aliasing (as the code).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelfold.baselines.driver import compress, group_blocks
from modelfold.graph import ChannelGroup
from modelfold.merge.apply import ChannelMap

KEYS_A = -0.75


def inn(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float,
    restarts: int = 10,
    seed: int = 0,
    module_ratios: dict[str, float] | None = None,
    ignored: tuple[nn.Module, ...] | list[nn.Module] = (),
) -> nn.Module:
    """INN resampling of a copy of `model` to k = round(n (1 - ratio)) channels per group."""
    return compress(model, example_inputs, method="inn", ratio=ratio,
                    make_map=lambda group, k, _: inn_map(group, k, restarts=restarts, seed=seed),
                    module_ratios=module_ratios, ignored=ignored, fold_bn=True,
                    config={"restarts": restarts, "seed": seed})


def inn_map(group: ChannelGroup, k: int, *, restarts: int = 10, seed: int = 0) -> ChannelMap:
    blocks = group_blocks(group)
    dist = sum(torch.cdist(b, b, p=1) / max(b.shape[1], 1) for b in blocks.all())
    order = torch.tensor(smooth_order(dist, restarts=restarts, seed=seed))
    n = group.n
    sample = cubic_resample_matrix(n, k)  # (k, n) on the ordered axis
    weights_n, weights_k = trapezoid_weights(n), trapezoid_weights(k)
    integrand = sample * weights_k[:, None] / weights_n[None, :]
    perm = torch.zeros(n, n, dtype=torch.float64)
    perm[torch.arange(n), order] = 1.0  # ordered position -> channel
    return ChannelMap(torch.arange(k), producer=sample @ perm, consumer=integrand @ perm)


def trapezoid_weights(n: int) -> torch.Tensor:
    """Trapezoid weights of n uniform nodes on [-1, 1] (one node: the whole interval)."""
    if n == 1:
        return torch.full((1,), 2.0, dtype=torch.float64)
    w = torch.full((n,), 2.0 / (n - 1), dtype=torch.float64)
    w[0] = w[-1] = 1.0 / (n - 1)
    return w


def _keys(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    a = KEYS_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def cubic_resample_matrix(n: int, k: int) -> torch.Tensor:
    """(k, n) matrix evaluating the cubic-convolution interpolant of n samples on
    linspace(-1, 1, n) at linspace(-1, 1, k) (at 0 when k = 1), borders clamped."""
    if n == 1:
        return torch.ones(k, 1, dtype=torch.float64)
    pos = torch.linspace(0, n - 1, k, dtype=torch.float64) if k > 1 else \
        torch.tensor([(n - 1) / 2], dtype=torch.float64)
    base = pos.floor()
    matrix = torch.zeros(k, n, dtype=torch.float64)
    rows = torch.arange(k)
    for offset in (-1, 0, 1, 2):
        node = base + offset
        weight = _keys(pos - node)
        matrix.index_put_((rows, node.clamp(0, n - 1).long()), weight, accumulate=True)
    return matrix


def path_length(dist: torch.Tensor, order: list[int] | torch.Tensor) -> float:
    o = torch.as_tensor(order)
    return float(dist[o[:-1], o[1:]].sum())


def smooth_order(dist: torch.Tensor, *, restarts: int = 10, seed: int = 0) -> list[int]:
    """Shortest open path found by 2-opt from a nearest-neighbour start and `restarts` random
    starts (`dist` symmetric, (n, n))."""
    n = dist.shape[0]
    if n <= 2:
        return list(range(n))
    dist = dist.double()
    gen = torch.Generator().manual_seed(seed)
    starts = [_nearest_neighbour(dist)] + [torch.randperm(n, generator=gen)
                                           for _ in range(restarts)]
    best, best_len = None, float("inf")
    for start in starts:
        order = _two_opt(dist, start)
        length = path_length(dist, order)
        if length < best_len - 1e-12:
            best, best_len = order, length
    return best.tolist()


def _nearest_neighbour(dist: torch.Tensor) -> torch.Tensor:
    n = dist.shape[0]
    seen = torch.zeros(n, dtype=torch.bool)
    order = [int(dist.sum(1).argmax())]  # start at an extreme channel
    seen[order[0]] = True
    for _ in range(n - 1):
        d = dist[order[-1]].clone()
        d[seen] = float("inf")
        nxt = int(d.argmin())
        order.append(nxt)
        seen[nxt] = True
    return torch.tensor(order)


def _two_opt(dist: torch.Tensor, order: torch.Tensor, max_moves: int = 100_000) -> torch.Tensor:
    """Best-improvement 2-opt on an open path: reversing order[i..j] changes the length by
    d(o[i-1], o[j]) + d(o[i], o[j+1]) - d(o[i-1], o[i]) - d(o[j], o[j+1]) (absent edges at the
    ends count 0). All moves are scored at once on the distance matrix in path order, which a
    reversal updates by flipping a block of rows and columns."""
    n = order.numel()
    order = order.clone()
    dp = dist[order][:, order].clone()
    lower = ~torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    tol = -1e-12 * max(float(dist.max()), 1e-300)
    left = torch.zeros(n, n, dtype=dist.dtype)
    right = torch.zeros(n, n, dtype=dist.dtype)
    for _ in range(max_moves):
        edges = torch.diagonal(dp, 1)  # d(o[i], o[i+1])
        left[1:] = dp[:-1] - edges[:, None]  # d(o[i-1], o[j]) - d(o[i-1], o[i])
        right[:, :-1] = dp[:, 1:] - edges[None, :]  # d(o[i], o[j+1]) - d(o[j], o[j+1])
        gain = (left + right).masked_fill_(lower, 0.0)
        flat = int(gain.argmin())
        if float(gain.view(-1)[flat]) >= tol:
            break
        i, j = divmod(flat, n)
        order[i:j + 1] = order[i:j + 1].flip(0)
        dp[i:j + 1] = dp[i:j + 1].flip(0)
        dp[:, i:j + 1] = dp[:, i:j + 1].flip(1)
    return order
