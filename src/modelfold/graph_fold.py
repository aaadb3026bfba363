"""The graph path: fold any traceable model (`FoldConfig`), and the steps it shares with the
baselines of `modelfold.baselines` (copy, trace, check, record).

validate -> copy -> trace the channel groups -> budget (`modelfold.budget.cluster_counts`) ->
repair.before_plan -> cluster every group -> repair.before_merge -> merge -> repair.after_merge
-> check the parameter count and output shapes -> record.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from modelfold.budget import BudgetCost, budget_cost, budget_target, cluster_counts
from modelfold.cluster import cluster_channels, group_features
from modelfold.config import FoldConfig, register_pipeline
from modelfold.errors import FoldError, check_parameters
from modelfold.graph import GroupDiscovery, discover_groups
from modelfold.graph.reuse import keep_trace, reuse_traces, reused_trace
from modelfold.macs import count_macs
from modelfold.merge.apply import apply_plan, memory_bytes, predicted_parameter_count
from modelfold.merge.plan import FoldPlan, GroupPlan
from modelfold.record import (
    FACTORY_ATTR,
    RECORD_ATTR,
    FoldRecord,
    GroupInfo,
    changed_attrs,
    input_spec,
    simple_attrs,
)
from modelfold.repair import get_repair


@register_pipeline(FoldConfig, options=("ignored", "inplace", "device", "calibration"))
def fold_graph(
    model: nn.Module,
    example_inputs: Any,
    config: FoldConfig,
    *,
    ignored: Iterable[nn.Module] = (),
    inplace: bool = False,
    device: str | torch.device | None = None,
    calibration: Any = None,
) -> nn.Module:
    """Fold `model` as `config` says: cluster the channels of every coupled group and merge
    each cluster (arguments as `modelfold.fold`)."""
    if not isinstance(config, FoldConfig):
        raise FoldError(f"`config` must be a FoldConfig, got {type(config).__name__}.")
    if config.round_to == "auto":
        from modelfold.rounding import resolve_round_to

        options = {"ignored": tuple(ignored), "device": device, "calibration": calibration}
        dev = resolve_device(device, model)
        inputs = to_device(example_inputs, dev)
        dense = model_on(model, dev)
        with reuse_traces():  # one trace for the candidates and the fold
            config, measured = resolve_round_to(
                config, inputs, count_macs(dense, inputs),
                lambda c: fold_graph(model, example_inputs, c, **options))
            folded = fold_graph(model, example_inputs, config, inplace=inplace, **options)
        getattr(folded, RECORD_ATTR).extra["round_to_auto"] = measured
        return folded
    if config.target_latency is not None:
        return fold_to_latency(model, example_inputs, config, ignored=ignored, inplace=inplace,
                               device=device, calibration=calibration)
    repairer = get_repair(config.repair)
    if not isinstance(model, nn.Module):
        raise FoldError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if example_inputs is None:
        raise FoldError("`example_inputs` is required: a tensor, tuple or dict the model accepts.")
    check_parameters(model)
    dev = resolve_device(device, model)
    ignored_names = check_targets(model, ignored, config.module_ratios)

    attrs_before = {n: simple_attrs(m) for n, m in model.named_modules()}
    was_training = model.training
    inputs = to_device(example_inputs, dev)
    work, reference, discovery = copy_and_trace(model, inputs, ignored_names, dev, inplace)

    if not (repairer.needs_original or config.self_calibrate):
        original = work  # unused by the repair
    elif inplace or device_of(model) != dev:
        original = copy.deepcopy(work)  # work is still unfolded here
    else:
        original = model  # only read (hooks, eval mode restored afterwards)
    params_before = count_parameters(work)
    if params_before == 0:
        raise FoldError("the model has no parameters to fold.")
    producers = {s.name for g in discovery.groups if g.foldable for s in g.slots
                 if s.role == "producer"}
    for name in config.module_ratios:
        if name not in producers:
            raise FoldError(
                f"module_ratios[{name!r}]: this module writes no foldable channel group (its "
                "outputs are the network output, ignored, or coupled by an unsupported op)."
            )
    cost = budget_cost(work, discovery, config, inputs)
    if config.self_calibrate:
        base_ratio, ks = cluster_counts(work, discovery, config, cost=cost)
    else:
        repairer.before_plan(work, discovery, config)
        base_ratio, ks = cluster_counts(work, discovery, config, cost=cost)
        plan = make_plan(discovery, config, base_ratio, ks)
        kept = {g: p.k for g, p in plan.groups.items()}
        predicted = predicted_parameter_count(work, discovery, kept)
        predicted_macs = cost.count(kept) if cost.unit == "MACs" else None
        repairer.before_merge(work, discovery, plan, config)
        apply_plan(discovery, plan)
    calibration_report = None
    if config.self_calibrate:
        predicted_macs = None  # its allocation runs (and folds) inside self_calibrated_fold
    original_training = original.training
    try:
        if config.self_calibrate:
            from modelfold.calibrate.graph import self_calibrated_fold

            plan, predicted, calibration_report = self_calibrated_fold(
                work, original, discovery, config, ks, inputs, count=cost.count)
            plan.ratio = base_ratio
        else:
            repairer.after_merge(original, work, discovery, plan, config, calibration, inputs)
    finally:
        original.train(original_training)
    work.train(was_training)

    params_after = count_parameters(work)
    if params_after != predicted:
        raise FoldError(
            f"folding removed a different number of parameters than the channel groups imply "
            f"({params_after} left, {predicted} expected): an op the dependency graph cannot see "
            "couples channels. Pass the modules around it in `ignored=`."
        )
    check_output(work, inputs, reference)
    extra: dict[str, Any] = {"self_calibration": calibration_report} if calibration_report else {}
    if cost.unit == "MACs":
        extra.update(check_macs(work, inputs, config, cost, predicted_macs))
    if cost.unit == "bytes":
        extra.update(check_memory(work, config, cost))
    record = FoldRecord(
        config=config.to_dict(),
        ratio=base_ratio,
        plan=plan.to_dict(),
        groups=group_infos(discovery, plan),
        module_attrs=changed_attrs(attrs_before, work),
        input_spec=input_spec(example_inputs),
        params_before=params_before,
        params_after=params_after,
        factory=getattr(model, FACTORY_ATTR, None),
        extra=extra,
    )
    setattr(work, RECORD_ATTR, record)
    return work


LATENCY_STEPS = 6  # bisection steps of a target_latency search (one fold and timing each)
LATENCY_MAX_RATIO = 0.95  # the largest ratio a target_latency search tries


def fold_to_latency(model: nn.Module, example_inputs: Any, config: FoldConfig,
                    **options: Any) -> nn.Module:
    """`target_latency`: the fold at the smallest uniform ratio (within LATENCY_STEPS
    bisection steps over [0, LATENCY_MAX_RATIO]) whose measured latency on `example_inputs`
    is at most (1 - target_latency) x the dense model's, both measured here
    (`modelfold.latency.median_latency`) on the folding device; a fold that misses the goal is
    timed twice and keeps the faster. The record keeps the config as given and the three
    latencies (dense, goal, folded)."""
    from modelfold.latency import median_latency

    if example_inputs is None:
        raise FoldError("target_latency needs the example input the latency is measured on.")
    dev = resolve_device(options.get("device"), model)
    inputs = to_device(example_inputs, dev)
    dense = median_latency(model_on(model, dev), inputs)
    goal = (1.0 - config.target_latency) * dense
    data = {**config.to_dict(), "target_latency": None}
    inplace = options.pop("inplace", False)

    def fold_at(ratio: float, in_place: bool = False) -> tuple[nn.Module, float]:
        folded = fold_graph(model, example_inputs, FoldConfig.from_dict({**data, "ratio": ratio}),
                            inplace=in_place, **options)
        seconds = median_latency(folded, inputs)
        if seconds > goal:  # a timing disturbed by other work must not decide alone
            seconds = min(seconds, median_latency(folded, inputs))
        return folded, seconds

    with reuse_traces():  # one trace for the whole search
        folded, seconds = _latency_search(fold_at, config.target_latency, dense, goal, dev,
                                          inplace)
    record = getattr(folded, RECORD_ATTR)
    record.config = config.to_dict()
    record.extra.update(latency_before_s=dense, latency_goal_s=goal, latency_after_s=seconds)
    return folded


def _latency_search(fold_at, target: float, dense: float, goal: float, dev: torch.device,
                    inplace: bool) -> tuple[nn.Module, float]:
    """The bisection of `fold_to_latency`: (fold, its seconds) at the smallest ratio that
    meets `goal`."""
    lo, hi = 0.0, LATENCY_MAX_RATIO
    best = fold_at(hi)
    if best[1] > goal:
        raise FoldError(
            f"target_latency={target}: even ratio {hi} runs in "
            f"{best[1] * 1e3:.3f} ms, {1 - best[1] / dense:.1%} below the dense "
            f"{dense * 1e3:.3f} ms on {dev} (goal {goal * 1e3:.3f} ms): this model's time is "
            "not in the folded layers at this input size. Lower the target or use a larger "
            "batch.")
    best_ratio = hi
    for _ in range(LATENCY_STEPS):
        mid = (lo + hi) / 2
        folded, seconds = fold_at(mid)
        if seconds <= goal:
            hi, best, best_ratio = mid, (folded, seconds), mid
        else:
            lo = mid
    return fold_at(best_ratio, in_place=True) if inplace else best


def uniform_ratio(model: nn.Module, example_inputs: Any, **budget: Any) -> float:
    """The uniform ratio `fold` solves for one budget (`target_sparsity=`, `target_macs=`,
    `target_memory=` or `target_latency=`, as in `FoldConfig`) on `model`: what a structured
    method that removes the same share of every group's channels must use to spend the same
    budget. A latency budget runs the `target_latency` search (Fold-Naive, timed here)."""
    config = FoldConfig(**budget)
    if budget_target(config)[1] is None and config.target_latency is None:
        raise FoldError(f"uniform_ratio needs one budget of {FoldConfig.budget_fields[1:]}, "
                        f"got {sorted(budget)}.")
    if config.target_latency is not None:
        return getattr(fold_to_latency(model, example_inputs, config), RECORD_ATTR).ratio
    dev = device_of(model)
    inputs = to_device(example_inputs, dev)
    work, _, discovery = copy_and_trace(model, inputs, [], dev)
    return cluster_counts(work, discovery, config, inputs)[0]


def copy_and_trace(model: nn.Module, inputs: Any, ignored_names: list[str],
                   dev: torch.device, inplace: bool = False
                   ) -> tuple[nn.Module, Any, GroupDiscovery]:
    """(the model to fold: a copy of `model` on `dev`, or `model` itself when `inplace`; its
    output on `inputs`; its channel groups). Inside `modelfold.reuse_traces()` a copy comes
    with the groups of an earlier trace of the same model instead of a new trace."""
    hit = None if inplace else reused_trace(model, inputs, ignored_names, dev)
    work = hit[0] if hit else (model if inplace else copy.deepcopy(model)).to(dev)
    reference = reference_output(work, inputs)
    if hit:
        return work, reference, hit[1]
    modules = dict(work.named_modules())
    discovery = discover_groups(work, inputs, ignored=[modules[n] for n in ignored_names])
    if not inplace:
        keep_trace(model, inputs, ignored_names, dev, work, discovery)
    return work, reference, discovery


def check_macs(folded: nn.Module, inputs: Any, config: FoldConfig, cost: BudgetCost,
               predicted: int | None) -> dict[str, int]:
    """Count the folded model's MACs on `inputs`: they must be the `predicted` ones (when
    known), and their reduction must meet `target_macs` within the tolerance. Returns the
    counts for the fold record."""
    after = count_macs(folded, inputs)
    achieved = 1.0 - after / cost.total
    if predicted is not None and after != predicted:
        raise FoldError(
            f"target_macs={config.target_macs}: the folded model does {after:,} MACs, not the "
            f"{predicted:,} its shapes imply: an op whose work does not follow the folded "
            "weights or attention heads changed size. Pass the modules around it in `ignored=`."
        )
    if abs(achieved - config.target_macs) > config.sparsity_tolerance:
        raise FoldError(
            f"target_macs={config.target_macs}: the allocation ({config.allocation}"
            f"{', self-calibrated' if config.self_calibrate else ''}) removes {achieved:.4f} of "
            f"the MACs, outside sparsity_tolerance ({config.sparsity_tolerance}): its groups' "
            "channels cost MACs in steps too coarse for this target. Use allocation='uniform', "
            "another target or a larger sparsity_tolerance."
        )
    return {"macs_before": cost.total, "macs_after": after}


def check_memory(folded: nn.Module, config: FoldConfig, cost: BudgetCost) -> dict[str, int]:
    """The folded model's parameters and buffers must fit `target_memory` bytes. Returns the
    sizes for the fold record."""
    after = memory_bytes(folded)
    if after > config.target_memory:
        raise FoldError(f"target_memory={config.target_memory:,}: the folded model takes "
                        f"{after:,} bytes, more than its shapes imply: a tensor the channel "
                        "groups were expected to shrink did not. Pass the modules around it in "
                        "`ignored=`.")
    return {"memory_before": cost.total, "memory_after": after}


def make_plan(discovery: GroupDiscovery, config: FoldConfig, ratio: float,
              ks: dict[str, int]) -> FoldPlan:
    """Cluster every foldable group (all on the unmodified weights) into its k clusters (`ks`:
    group name -> k; groups not in it keep all channels)."""
    plan = FoldPlan(ratio=ratio)
    for group in discovery.groups:
        if not group.foldable:
            continue
        k = ks.get(group.name, group.n)
        if k == group.n:
            continue
        x = group_features(group, features=config.features,
                           normalize_blocks=config.normalize_blocks)
        labels = cluster_channels(x, k, config)
        plan.groups[group.name] = GroupPlan(group.name, group.kind, group.n, k,
                                            labels.cpu().tolist())
    return plan


# ---------------------------------------------------------------- steps shared with baselines


def check_targets(model: nn.Module, ignored: Iterable[nn.Module],
                  module_ratios: dict[str, float]) -> list[str]:
    """Names of the `ignored` modules; refuses modules (or module_ratios names) not in `model`."""
    names = {id(m): n for n, m in model.named_modules()}
    ignored_names = []
    for m in ignored:
        if id(m) not in names:
            raise FoldError(
                f"`ignored` contains a {type(m).__name__} that is not part of the model."
            )
        ignored_names.append(names[id(m)])
    modules = set(names.values())
    for name in module_ratios:
        if name not in modules:
            raise FoldError(f"module_ratios names {name!r}, which is not a module of the model.")
    return ignored_names


def reference_output(model: nn.Module, inputs: Any) -> Any:
    """The model's output on `inputs` in eval mode (what the compressed model must match)."""
    try:
        with torch.no_grad():
            return call(model.eval(), inputs)
    except Exception as exc:
        raise FoldError(
            f"the model does not run on `example_inputs` ({type(exc).__name__}: {exc})."
        ) from exc


def group_infos(discovery: GroupDiscovery, plan: FoldPlan) -> list[GroupInfo]:
    infos = []
    for g in discovery.groups:
        gp = plan.groups.get(g.name)
        status = ("output" if g.folds_output else "ignored" if g.ignored_by
                  else "unsafe" if g.unsafe else "folded" if gp else "kept")
        infos.append(GroupInfo(g.name, g.kind, g.n, gp.k if gp else g.n,
                               sorted({s.name for s in g.slots}), status,
                               g.unsafe if status == "unsafe" else None))
    return infos


def device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def model_on(model: nn.Module, dev: torch.device) -> nn.Module:
    """`model` itself when it is on `dev` (only read), else a copy moved there."""
    return model if device_of(model) == dev else copy.deepcopy(model).to(dev)


def resolve_device(device, model: nn.Module) -> torch.device:
    if device is None:
        return device_of(model)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FoldError(f"`device`={device!r} is not a valid torch device.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FoldError(f"`device`={device!r} was requested but no CUDA GPU is available.")
    return dev


def to_device(x: Any, dev: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dev)
    if isinstance(x, dict):
        return {k: to_device(v, dev) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, dev) for v in x)
    raise FoldError(
        "`example_inputs` must be a tensor, a tuple/list of tensors or a dict of tensors, "
        f"got {type(x).__name__}."
    )


def call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (list, tuple)) else model(inputs)


def _shapes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: _shapes(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [_shapes(v) for v in out]
    return None


def check_output(model: nn.Module, inputs: Any, reference: Any) -> None:
    """Last sanity check: the folded model runs on `example_inputs` with the output shapes it
    had. It does not vouch for the values (an op reordering channels keeps every shape): that a
    fold keeps channel identity is decided by the dependency graph, which leaves any group
    flowing through an op not known to keep it unfolded (`modelfold.graph.channel_ops`)."""
    was = model.training
    try:
        with torch.no_grad():
            out = call(model.eval(), inputs)
    except Exception as exc:
        raise FoldError(
            f"the folded model fails on `example_inputs` ({type(exc).__name__}: {exc}); an op the "
            "dependency graph cannot see couples channels. Pass the modules around it in "
            "`ignored=`."
        ) from exc
    finally:
        model.train(was)
    if _shapes(out) != _shapes(reference):
        raise FoldError(
            f"folding changed the output shapes {_shapes(reference)} -> {_shapes(out)}; an op "
            "the dependency graph cannot see couples channels with the output. Pass the "
            "modules around it in `ignored=`."
        )


def count_parameters(model: nn.Module) -> int:
    """Parameters of `model`, each shared tensor counted once."""
    return sum(p.numel() for p in unique_params(model))


def unique_params(model: nn.Module):
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p
