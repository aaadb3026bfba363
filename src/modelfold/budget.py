"""Budget arithmetic and allocation: how many channels every group keeps.

Ratio arithmetic (`check_ratio`, `kept_channels`, `bisect_ratio`) is shared by every pipeline.
For the graph path, `cluster_counts` is the one call a pipeline makes: it solves
`target_sparsity` for a ratio when asked and spreads the budget over the channel groups with
the configured allocation. Allocations are registered by name: `register_allocation("name")(fn)`,
`fn(model, discovery, config, ratio) -> {group name: k}`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from modelfold.cluster.allocation import allocate, distortion_curve
from modelfold.cluster.features import group_features
from modelfold.errors import FoldError
from modelfold.graph import GroupDiscovery
from modelfold.merge.apply import predicted_parameter_count
from modelfold.registry import Registry

Allocation = Callable[[nn.Module, GroupDiscovery, Any, float], dict[str, int]]
ALLOCATIONS: Registry[Allocation] = Registry("allocation")


def register_allocation(name: str) -> Callable[[Allocation], Allocation]:
    """Decorator registering `fn(model, discovery, config, ratio) -> {group: k}` (graph path)."""
    return ALLOCATIONS.register(name)


def allocation_names() -> list[str]:
    return ALLOCATIONS.names()


def check_ratio(value: object, name: str) -> float:
    """A ratio is a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FoldError(f"`{name}` must be a number in [0, 1), got {type(value).__name__}.")
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise FoldError(f"`{name}` must lie in [0, 1), got {value}.")
    return float(value)


def kept_channels(n: int, ratio: float, round_to: int = 1) -> int:
    """k = max(1, round(n * (1 - ratio))), rounding halves up (no banker's rounding).

    `round_to` > 1 then rounds k to the nearest multiple of `round_to` (at least one multiple,
    never more than n): GPU matrix kernels run much faster on multiples of 8 / 64."""
    k = max(1, min(n, math.floor(n * (1.0 - ratio) + 0.5)))
    if round_to > 1 and k < n:
        k = min(n, max(round_to, math.floor(k / round_to + 0.5) * round_to))
    return k


def bisect_ratio(sparsity: Callable[[float], float], target: float, hi: float) -> float:
    """The ratio in [0, hi] whose parameter sparsity is closest to `target`.

    `sparsity` is monotone and stepwise in the ratio (channel counts are integers): bisection
    brackets the step that crosses the target, then the closer side wins."""
    lo = 0.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if sparsity(mid) < target:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda r: abs(sparsity(r) - target))


def group_ratio(group, module_ratios: dict[str, float], ratio: float) -> float:
    """A group takes the override of a module that writes its channels (a producer)."""
    for slot in group.slots:
        if slot.role == "producer" and slot.name in module_ratios:
            return module_ratios[slot.name]
    return ratio


def uniform_clusters(discovery: GroupDiscovery, config: Any, ratio: float) -> dict[str, int]:
    """k of every foldable group under `ratio` (and the module_ratios overrides)."""
    return {g.name: kept_channels(g.n, group_ratio(g, config.module_ratios, ratio),
                                  config.round_to)
            for g in discovery.groups if g.foldable}


def solve_ratio(model: nn.Module, discovery: GroupDiscovery, config: Any,
                params_before: int) -> float:
    """Bisection on the ratio for the target parameter sparsity (count is monotone in ratio)."""
    target = float(config.target_sparsity)

    def sparsity(r: float) -> float:
        kept = uniform_clusters(discovery, config, r)
        return 1.0 - predicted_parameter_count(model, discovery, kept) / params_before

    hi = 1.0 - 1e-12  # at hi every group keeps one channel
    best = max(sparsity(hi), 0.0)
    if best + config.sparsity_tolerance < target:
        raise FoldError(
            f"target_sparsity={target} is unreachable: folding every group to one channel "
            f"removes at most {best:.4f} of the parameters (groups writing the network output "
            "and ignored modules are never folded)."
        )
    ratio = bisect_ratio(sparsity, target, hi)
    achieved = sparsity(ratio)
    if abs(achieved - target) > config.sparsity_tolerance:
        raise FoldError(
            f"target_sparsity={target}: the nearest reachable sparsity is {achieved:.4f} "
            f"(channel counts are integers); raise sparsity_tolerance "
            f"({config.sparsity_tolerance}) or choose another target."
        )
    return ratio


def cluster_counts(model: nn.Module, discovery: GroupDiscovery, config: Any,
                   params_before: int) -> tuple[float, dict[str, int]]:
    """(base ratio, k per foldable group): the ratio solved from `target_sparsity` when the
    config gives one, the budget spread over the groups by the config's allocation."""
    ratio = config.ratio
    if config.target_sparsity is not None:
        ratio = solve_ratio(model, discovery, config, params_before)
    return ratio, ALLOCATIONS.get(config.allocation)(model, discovery, config, ratio)


@register_allocation("uniform")
def uniform_allocation(model: nn.Module, discovery: GroupDiscovery, config: Any,
                       ratio: float) -> dict[str, int]:
    """Every group loses the same fraction of its channels (the paper)."""
    return uniform_clusters(discovery, config, ratio)


@register_allocation("inertia")
def inertia_allocation(model: nn.Module, discovery: GroupDiscovery, config: Any,
                       ratio: float) -> dict[str, int]:
    """The parameter count of the uniform `ratio`, spread by the groups' Ward distortion curves
    (`cluster.allocation`): redundant groups fold harder. Groups with a module_ratios override
    keep their k."""
    uniform = uniform_clusters(discovery, config, ratio)
    budget = predicted_parameter_count(model, discovery, uniform)
    fixed = {g.name for g in discovery.groups if g.foldable
             and any(s.role == "producer" and s.name in config.module_ratios for s in g.slots)}
    free = [g for g in discovery.groups if g.foldable and g.name not in fixed and g.n > 1]
    full = predicted_parameter_count(model, discovery, {})
    curves, costs = {}, {}
    for g in free:
        x = group_features(g, features=config.features, normalize_blocks=config.normalize_blocks)
        curves[g.name] = distortion_curve(x)
        costs[g.name] = (full - predicted_parameter_count(model, discovery,
                                                          {g.name: g.n - 1})) / full
    base = {name: uniform[name] for name in fixed}

    def count(ks: dict[str, int]) -> int:
        return predicted_parameter_count(model, discovery, {**base, **ks})

    return {**base, **allocate(curves, costs, count, budget, round_to=config.round_to)}
