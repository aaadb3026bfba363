"""Budget arithmetic and allocation: how many channels every group keeps.

Ratio arithmetic (`check_ratio`, `kept_channels`, `bisect_ratio`) is shared by every pipeline.
For the graph path, `cluster_counts` is the one call a pipeline makes: it solves
`target_sparsity` (parameters), `target_macs` (multiply-accumulates on the example input) or
`target_memory` (a cap in bytes) for a ratio when asked and spreads the budget over the channel
groups with the configured allocation. Allocations are registered by name:
`register_allocation("name")(fn)`, `fn(model, discovery, config, ratio) -> {group name: k}`; one
registered with `units=("parameters", "MACs", "bytes")` also spends those budgets and is then
called with `cost=` (a `BudgetCost` in the unit asked).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from modelfold.cluster.allocation import allocate, distortion_curve
from modelfold.cluster.features import group_features
from modelfold.errors import FoldError
from modelfold.graph import GroupDiscovery
from modelfold.macs import profile_macs
from modelfold.merge.apply import (
    predicted_mac_count,
    predicted_memory,
    predicted_parameter_count,
)
from modelfold.registry import Registry

Allocation = Callable[..., dict[str, int]]
ALLOCATIONS: Registry[Allocation] = Registry("allocation")
UNITS = ("parameters", "MACs", "bytes")
_ALLOCATION_UNITS: dict[str, tuple[str, ...]] = {}  # allocation name -> budgets it can spend


def register_allocation(name: str, *, units: tuple[str, ...] = ("parameters",)
                        ) -> Callable[[Allocation], Allocation]:
    """Decorator registering `fn(model, discovery, config, ratio) -> {group: k}` (graph path).

    `units` are the budgets `fn` can spend: "parameters" (target_sparsity, ratio), "MACs"
    (target_macs) and "bytes" (target_memory). An allocation listing more than "parameters" is
    called with the keyword `cost` (a `BudgetCost`: `cost.count(ks)` is the folded model's
    amount in `cost.unit`) and must keep `cost.count` of its answer at or under that of the
    uniform `ratio`; a budget in a unit it does not list is refused instead of silently
    optimising parameters."""
    unknown = [u for u in units if u not in UNITS]
    if unknown or "parameters" not in units:
        raise FoldError(f"register_allocation({name!r}): `units` must include 'parameters' and "
                        f"may add 'MACs' and 'bytes', got {units!r}.")
    add = ALLOCATIONS.register(name)

    def register(fn: Allocation) -> Allocation:
        _ALLOCATION_UNITS[name] = tuple(units)
        return add(fn)

    return register


def allocation_units(name: str) -> tuple[str, ...]:
    """The budgets the registered allocation `name` can spend."""
    ALLOCATIONS.get(name)  # unknown names raise, listing the registered ones
    return _ALLOCATION_UNITS.get(name, ("parameters",))


@dataclass(frozen=True)
class BudgetCost:
    """What a budget counts: `count(ks)` is the amount (in `unit`) of the model folded to `ks`
    (group name -> k; other groups keep all channels), `total` that of the unfolded model."""

    unit: str
    count: Callable[[dict[str, int]], int]
    total: int


def parameter_cost(model: nn.Module, discovery: GroupDiscovery) -> BudgetCost:
    return BudgetCost("parameters", lambda ks: predicted_parameter_count(model, discovery, ks),
                      predicted_parameter_count(model, discovery, {}))


def mac_cost(model: nn.Module, discovery: GroupDiscovery, example_inputs: Any) -> BudgetCost:
    """MACs of the folded shapes on `example_inputs` (one profiled forward pass, then shapes
    alone: `modelfold.merge.apply.predicted_mac_count`)."""
    profile = profile_macs(model, example_inputs)
    if profile.total == 0:
        raise FoldError("target_macs: the model performs no multiply-accumulates the counter "
                        "sees (matrix products, convolutions, attention) on `example_inputs`.")
    return BudgetCost("MACs", lambda ks: predicted_mac_count(model, discovery, ks, profile),
                      profile.total)


def memory_cost(model: nn.Module, discovery: GroupDiscovery) -> BudgetCost:
    """Bytes of the folded model's parameters and buffers, from shapes alone
    (`modelfold.merge.apply.predicted_memory`)."""
    return BudgetCost("bytes", lambda ks: predicted_memory(model, discovery, ks),
                      predicted_memory(model, discovery, {}))


def budget_target(config: Any) -> tuple[str, float | None]:
    """(budget field, target) of a config: ("target_macs", 0.3), ("target_sparsity", 0.5),
    ("target_memory", bytes) or ("ratio", None) when the config gives a fixed ratio."""
    for name in ("target_memory", "target_macs", "target_sparsity"):
        if getattr(config, name, None) is not None:
            return name, float(getattr(config, name))
    return "ratio", None


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


def solve_ratio(discovery: GroupDiscovery, config: Any, cost: BudgetCost, target: float,
                name: str = "target_sparsity") -> float:
    """Bisection on the uniform ratio for the fraction `target` of `cost` removed (the count
    is monotone in the ratio); `name` is the config field the target came from."""

    def removed(r: float) -> float:
        return 1.0 - cost.count(uniform_clusters(discovery, config, r)) / cost.total

    hi = 1.0 - 1e-12  # at hi every group keeps one channel
    best = max(removed(hi), 0.0)
    if best + config.sparsity_tolerance < target:
        raise FoldError(
            f"{name}={target} is unreachable: folding every group to one channel "
            f"removes at most {best:.4f} of the {cost.unit} (groups writing the network output "
            "and ignored modules are never folded)."
        )
    ratio = bisect_ratio(removed, target, hi)
    achieved = removed(ratio)
    if abs(achieved - target) > config.sparsity_tolerance:
        raise FoldError(
            f"{name}={target}: the nearest reachable reduction of the {cost.unit} is "
            f"{achieved:.4f} (channel counts are integers); raise sparsity_tolerance "
            f"({config.sparsity_tolerance}) or choose another target."
        )
    return ratio


def solve_cap(discovery: GroupDiscovery, config: Any, cost: BudgetCost, cap: int,
              name: str = "target_memory") -> float:
    """The smallest uniform ratio whose folded amount is at most `cap` (bisection: the amount
    falls as the ratio grows); 0 when the model fits already."""
    def amount(r: float) -> int:
        return cost.count(uniform_clusters(discovery, config, r))

    if cost.total <= cap:
        return 0.0
    hi = 1.0 - 1e-12  # at hi every group keeps one channel
    least = amount(hi)
    if least > cap:
        raise FoldError(
            f"{name}={cap:,} is unreachable: folding every group to one channel leaves "
            f"{least:,} {cost.unit} (of {cost.total:,}; groups writing the network output and "
            "ignored modules are never folded)."
        )
    lo = 0.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if amount(mid) <= cap:
            hi = mid
        else:
            lo = mid
    return hi


def budget_cost(model: nn.Module, discovery: GroupDiscovery, config: Any,
                example_inputs: Any = None) -> BudgetCost:
    """The unit the config's budget is in: MACs for `target_macs` (counted on
    `example_inputs`), bytes for `target_memory`, parameters otherwise."""
    if getattr(config, "target_memory", None) is not None:
        return memory_cost(model, discovery)
    if getattr(config, "target_macs", None) is not None:
        if example_inputs is None:
            raise FoldError("target_macs needs the example input the MACs are counted on.")
        return mac_cost(model, discovery, example_inputs)
    return parameter_cost(model, discovery)


def cluster_counts(model: nn.Module, discovery: GroupDiscovery, config: Any,
                   example_inputs: Any = None, cost: BudgetCost | None = None
                   ) -> tuple[float, dict[str, int]]:
    """(base ratio, k per foldable group): the ratio solved from `target_sparsity`,
    `target_macs` or `target_memory` when the config gives one, the budget spread over the
    groups by the config's allocation in the budget's unit (`cost`, by default
    `budget_cost`)."""
    allocation = ALLOCATIONS.get(config.allocation)
    cost = cost or budget_cost(model, discovery, config, example_inputs)
    name, target = budget_target(config)
    units = allocation_units(config.allocation)
    if cost.unit not in units:
        able = [a for a in allocation_names() if cost.unit in allocation_units(a)]
        raise FoldError(f"allocation={config.allocation!r} spends a budget of "
                        f"{' or '.join(units)} only and cannot honour {name}; use one of {able}.")
    ratio = config.ratio
    if name == "target_memory":
        ratio = solve_cap(discovery, config, cost, int(target), name)
    elif target is not None:
        ratio = solve_ratio(discovery, config, cost, target, name)
    if set(units) == {"parameters"}:
        return ratio, allocation(model, discovery, config, ratio)
    ks = allocation(model, discovery, config, ratio, cost=cost)
    if name == "target_memory" and cost.count(ks) > target:
        raise FoldError(f"target_memory={int(target):,}: allocation={config.allocation!r} "
                        f"leaves {cost.count(ks):,} bytes, more than the target.")
    if cost.unit == "MACs" and target is not None:
        removed = 1.0 - cost.count(ks) / cost.total
        if abs(removed - target) > config.sparsity_tolerance:
            raise FoldError(
                f"{name}={target}: allocation={config.allocation!r} removes {removed:.4f} of the "
                f"MACs, outside sparsity_tolerance ({config.sparsity_tolerance}): its groups' "
                "channels cost MACs in steps too coarse for this target. Use "
                "allocation='uniform', another target or a larger sparsity_tolerance.")
    return ratio, ks


@register_allocation("uniform", units=UNITS)
def uniform_allocation(model: nn.Module, discovery: GroupDiscovery, config: Any,
                       ratio: float, cost: BudgetCost | None = None) -> dict[str, int]:
    """Every group loses the same fraction of its channels (the paper); a target is met by the
    ratio solved for it in its unit."""
    return uniform_clusters(discovery, config, ratio)


@register_allocation("inertia", units=UNITS)
def inertia_allocation(model: nn.Module, discovery: GroupDiscovery, config: Any,
                       ratio: float, cost: BudgetCost | None = None) -> dict[str, int]:
    """The amount (parameters, MACs under `target_macs`, bytes under `target_memory`) of the
    uniform `ratio`, spread by the groups' Ward distortion curves (`cluster.allocation`):
    redundant groups fold harder, and a channel costs what removing it saves in the budget's
    unit. Groups with a module_ratios override keep their k."""
    cost = cost or parameter_cost(model, discovery)
    uniform = uniform_clusters(discovery, config, ratio)
    budget = cost.count(uniform)
    fixed = {g.name for g in discovery.groups if g.foldable
             and any(s.role == "producer" and s.name in config.module_ratios for s in g.slots)}
    free = [g for g in discovery.groups if g.foldable and g.name not in fixed and g.n > 1]
    full = cost.total
    curves, costs = {}, {}
    for g in free:
        x = group_features(g, features=config.features, normalize_blocks=config.normalize_blocks)
        curves[g.name] = distortion_curve(x)
        # a channel costs at least a little, so the Lagrangian choice stays well defined
        costs[g.name] = max(full - cost.count({g.name: g.n - 1}), 1) / full
    base = {name: uniform[name] for name in fixed}

    def count(ks: dict[str, int]) -> int:
        return cost.count({**base, **ks})

    return {**base, **allocate(curves, costs, count, budget, round_to=config.round_to)}
