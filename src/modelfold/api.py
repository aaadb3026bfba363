"""`fold()`: validate -> discover groups -> cluster -> merge -> check."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from modelfold.cluster import cluster_channels, group_features
from modelfold.config import FoldConfig, bisect_ratio, check_ratio, kept_channels
from modelfold.errors import FoldError, check_parameters
from modelfold.graph import GroupDiscovery, discover_groups
from modelfold.merge.apply import apply_plan, predicted_parameter_count
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


def fold(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    ratio: float | None = None,
    target_sparsity: float | None = None,
    config: FoldConfig | None = None,
    seed: int | None = None,
    module_ratios: dict[str, float] | None = None,
    ignored: Iterable[nn.Module] = (),
    inplace: bool = False,
    device: str | torch.device | None = None,
    repair: str | None = None,
    calibration: Any = None,
    parts: Iterable[str] = ("mlp",),
    recipe: str | dict | None = None,
    self_calibrate: bool | None = None,
) -> nn.Module:
    """Fold `model`: cluster the channels of every coupled group and merge each cluster.

    Hugging Face LLaMA / Qwen2 / Mistral causal LMs need no `example_inputs`: they are folded
    layer by layer by `modelfold.llm.fold_llm` (`parts` = "mlp" and/or "attention", `recipe` =
    per-layer ratios or a preset; `repair`, `module_ratios`, `ignored` do not apply).

    Args:
        model: any traceable PyTorch model. It is not modified unless `inplace=True`.
        example_inputs: a tensor, a tuple of tensors or a dict of tensors fitting `model`.
        ratio: fraction of channels removed in every group (k = max(1, round(n(1 - ratio)))).
        target_sparsity: fraction of parameters to remove instead; the ratio reaching it within
            `config.sparsity_tolerance` is solved for (see `summary(...).ratio`).
        config: a `FoldConfig`; `ratio`, `target_sparsity`, `seed`, `module_ratios` override it.
        ignored: modules whose channel groups are left as they are.
        inplace: fold `model` itself instead of a copy (saves memory; if folding fails part way
            the model may be left partly folded, so keep a copy of anything you cannot rebuild).
        device: where to fold (the folded model stays there); defaults to the model's device.
        repair: "none" (Fold-Naive, default), "data" (Fold-R), "approx" (Fold-AR),
            "deep_inversion" (Fold-DIR) or "deep_inversion_debiased"; see `modelfold.repair`.
        calibration: input batches for repair="data" (a tensor, DataLoader or iterable).
        self_calibrate: the best data-free recipe for any model: the model synthesises its own
            calibration inputs, channels are merged by what they compute on them, measured
            sensitivity allocates the budget and the consumers are refitted by least squares
            (`modelfold.calibrate`; for LLMs the self-generated-text recipe). No real data.

    Returns:
        The folded model: a real, smaller `nn.Module` of the same classes.
    """
    if _is_llm(model, example_inputs):
        from modelfold.llm import fold_llm

        if module_ratios or calibration is not None:
            raise FoldError("LLM folding takes `ratio`, `target_sparsity` or `recipe`, `parts`, "
                            "`config`, `seed`, `inplace`, `device`, `repair` ('none' or "
                            "'self_generated'); `module_ratios` and `calibration` apply to the "
                            "graph-based path only.")
        if repair is not None or self_calibrate:  # fold_llm validates it with the rest
            base = config.to_dict() if config is not None else FoldConfig(ratio=0.0).to_dict()
            if repair is not None:
                base["repair"] = repair
            if self_calibrate:
                base = {**base, **llm_self_calibrated(base, parts)}
            config = FoldConfig.from_dict(base)
        return fold_llm(model, ratio=ratio, target_sparsity=target_sparsity, parts=parts,
                        recipe=recipe, config=config, seed=seed, inplace=inplace, device=device)
    if recipe is not None:
        raise FoldError("`recipe` applies to Hugging Face LLMs; use `module_ratios` here.")
    config = _resolve_config(config, ratio, target_sparsity, seed, module_ratios, repair)
    if self_calibrate is not None:
        config = FoldConfig.from_dict({**config.to_dict(), "self_calibrate": self_calibrate})
    if config.self_calibrate and (config.repair != "none" or config.allocation != "uniform"):
        raise FoldError("self_calibrate=True chooses its own repair (a least-squares refit) and "
                        "allocation (measured sensitivity); leave `repair` and `allocation` at "
                        f"their defaults (got repair={config.repair!r}, "
                        f"allocation={config.allocation!r}).")
    if config.clusterer == "activation" or config.allocation == "sensitivity":
        raise FoldError(f"clusterer={config.clusterer!r} / allocation={config.allocation!r}: "
                        "'activation' and 'sensitivity' run a Hugging Face causal LM on text it "
                        "generates itself; for this model use clusterer 'kmeans', 'hartigan' or "
                        "'ward' and allocation 'uniform' or 'inertia'.")
    repairer = get_repair(config.repair)
    if not isinstance(model, nn.Module):
        raise FoldError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if example_inputs is None:
        raise FoldError("`example_inputs` is required: a tensor, tuple or dict the model accepts.")
    check_parameters(model)
    dev = _resolve_device(device, model)
    ignored_names = check_targets(model, ignored, config.module_ratios)

    attrs_before = {n: simple_attrs(m) for n, m in model.named_modules()}
    was_training = model.training
    work = model if inplace else copy.deepcopy(model)
    work = work.to(dev)
    inputs = _to_device(example_inputs, dev)
    reference = reference_output(work, inputs)

    if not (repairer.needs_original or config.self_calibrate):
        original = work  # unused by the repair
    elif inplace or _device_of(model) != dev:
        original = copy.deepcopy(work)  # work is still unfolded here
    else:
        original = model  # only read (hooks, eval mode restored afterwards)
    modules = dict(work.named_modules())
    discovery = discover_groups(work, inputs, ignored=[modules[n] for n in ignored_names])
    params_before = sum(p.numel() for p in _unique_params(work))
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
    base_ratio = config.ratio
    if config.target_sparsity is not None:
        base_ratio = solve_ratio(work, discovery, config, params_before)
    calibration_report = None
    if not config.self_calibrate:
        repairer.before_plan(work, discovery, config)
        ks = None
        if config.allocation == "inertia":
            ks = allocate_clusters(work, discovery, config, base_ratio)
        plan = make_plan(discovery, config, base_ratio, ks)
        predicted = predicted_parameter_count(work, discovery,
                                              {g: p.k for g, p in plan.groups.items()})
        repairer.before_merge(work, discovery, plan, config)
        apply_plan(discovery, plan)
    original_training = original.training
    try:
        if config.self_calibrate:
            from modelfold.calibrate.graph import self_calibrated_fold

            plan, predicted, calibration_report = self_calibrated_fold(
                work, original, discovery, config,
                uniform_clusters(discovery, config, base_ratio), inputs)
            plan.ratio = base_ratio
        else:
            repairer.after_merge(original, work, discovery, plan, config, calibration, inputs)
    finally:
        original.train(original_training)
    work.train(was_training)

    params_after = sum(p.numel() for p in _unique_params(work))
    if params_after != predicted:
        raise FoldError(
            f"folding removed a different number of parameters than the channel groups imply "
            f"({params_after} left, {predicted} expected): an op the dependency graph cannot see "
            "couples channels. Pass the modules around it in `ignored=`."
        )
    _check_output(work, inputs, reference)
    record = FoldRecord(
        config=config.to_dict(),
        ratio=base_ratio,
        plan=plan.to_dict(),
        groups=_group_infos(discovery, plan),
        module_attrs=changed_attrs(attrs_before, work),
        input_spec=input_spec(example_inputs),
        params_before=params_before,
        params_after=params_after,
        factory=getattr(model, FACTORY_ATTR, None),
        extra={"self_calibration": calibration_report} if calibration_report else {},
    )
    setattr(work, RECORD_ATTR, record)
    return work


def llm_self_calibrated(config: dict[str, Any], parts: Iterable[str]) -> dict[str, Any]:
    """The self-calibrated recipe for a Hugging Face LLM: MLP channels merged by activation on
    self-generated text, sensitivity allocation, least-squares refit of the down projections;
    with attention heads too, the heads are clustered on their weights (the activation merge
    and the sensitivity allocation cover MLP channels only) and the refit stays."""
    mlp_only = set(parts) == {"mlp"}
    recipe = {"self_calibrate": True, "repair": "self_generated"}
    if mlp_only:
        recipe.update(clusterer="activation", allocation="sensitivity")
    elif config.get("clusterer") == "activation":
        recipe["clusterer"] = "kmeans"
    return recipe


def _is_llm(model: Any, example_inputs: Any) -> bool:
    """A Hugging Face LLM of a supported family. Other Hugging Face models go through the graph
    path when given `example_inputs`; without them, the error lists the supported families."""
    from modelfold.llm.architectures import architecture_of, supported_model_types

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return False
    if model_type in supported_model_types():
        return True
    if example_inputs is None:
        architecture_of(model)  # raises, listing the supported model types
    return False


def uniform_clusters(discovery: GroupDiscovery, config: FoldConfig,
                     ratio: float) -> dict[str, int]:
    """k of every foldable group under `ratio` (and the module_ratios overrides)."""
    return {g.name: kept_channels(g.n, group_ratio(g, config.module_ratios, ratio),
                                  config.round_to)
            for g in discovery.groups if g.foldable}


def allocate_clusters(model: nn.Module, discovery: GroupDiscovery, config: FoldConfig,
                      ratio: float) -> dict[str, int]:
    """Budget-aware k per group (`allocation="inertia"`): the parameter count of the uniform
    `ratio`, spread by the groups' Ward distortion curves (`cluster.allocation`). Groups with
    a module_ratios override keep their k."""
    from modelfold.cluster.allocation import allocate, distortion_curve

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


def make_plan(discovery: GroupDiscovery, config: FoldConfig, ratio: float,
              ks: dict[str, int] | None = None) -> FoldPlan:
    """Cluster every foldable group (all on the unmodified weights) into its k clusters: `ks`
    (group name -> k) when given, else the uniform ratio's."""
    plan = FoldPlan(ratio=ratio)
    kept = uniform_clusters(discovery, config, ratio) if ks is None else ks
    for group in discovery.groups:
        if not group.foldable:
            continue
        k = kept.get(group.name, group.n)
        if k == group.n:
            continue
        x = group_features(group, features=config.features,
                           normalize_blocks=config.normalize_blocks)
        labels = cluster_channels(x, k, config)
        plan.groups[group.name] = GroupPlan(group.name, group.kind, group.n, k,
                                            labels.cpu().tolist())
    return plan


def solve_ratio(
    model: nn.Module, discovery: GroupDiscovery, config: FoldConfig, params_before: int
) -> float:
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


def group_ratio(group, module_ratios: dict[str, float], ratio: float) -> float:
    """A group takes the override of a module that writes its channels (a producer)."""
    for slot in group.slots:
        if slot.role == "producer" and slot.name in module_ratios:
            return module_ratios[slot.name]
    return ratio


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
            return _call(model.eval(), inputs)
    except Exception as exc:
        raise FoldError(
            f"the model does not run on `example_inputs` ({type(exc).__name__}: {exc})."
        ) from exc


def _group_infos(discovery: GroupDiscovery, plan: FoldPlan) -> list[GroupInfo]:
    infos = []
    for g in discovery.groups:
        gp = plan.groups.get(g.name)
        status = ("output" if g.folds_output else "ignored" if g.ignored_by
                  else "unsafe" if g.unsafe else "folded" if gp else "kept")
        infos.append(GroupInfo(g.name, g.kind, g.n, gp.k if gp else g.n,
                               sorted({s.name for s in g.slots}), status,
                               g.unsafe if status == "unsafe" else None))
    return infos


def _resolve_config(config, ratio, target_sparsity, seed, module_ratios, repair) -> FoldConfig:
    if config is not None and not isinstance(config, FoldConfig):
        raise FoldError(f"`config` must be a FoldConfig, got {type(config).__name__}.")
    if ratio is not None and target_sparsity is not None:
        raise FoldError("give either `ratio` or `target_sparsity`, not both.")
    if ratio is not None:
        check_ratio(ratio, "ratio")
    if target_sparsity is not None:
        check_ratio(target_sparsity, "target_sparsity")
    data = config.to_dict() if config is not None else {}
    if ratio is not None:
        data.update(ratio=ratio, target_sparsity=None)
    if target_sparsity is not None:
        data.update(target_sparsity=target_sparsity, ratio=None)
    if seed is not None:
        data["seed"] = seed
    if module_ratios is not None:
        data["module_ratios"] = dict(module_ratios)
    if repair is not None:
        data["repair"] = repair
    if data.get("ratio") is None and data.get("target_sparsity") is None:
        raise FoldError("give `ratio` (fraction of channels removed) or `target_sparsity`.")
    return FoldConfig.from_dict(data)


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _resolve_device(device, model: nn.Module) -> torch.device:
    if device is None:
        return _device_of(model)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FoldError(f"`device`={device!r} is not a valid torch device.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FoldError(f"`device`={device!r} was requested but no CUDA GPU is available.")
    return dev


def _to_device(x: Any, dev: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dev)
    if isinstance(x, dict):
        return {k: _to_device(v, dev) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, dev) for v in x)
    raise FoldError(
        "`example_inputs` must be a tensor, a tuple/list of tensors or a dict of tensors, "
        f"got {type(x).__name__}."
    )


def _call(model: nn.Module, inputs: Any) -> Any:
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


def _check_output(model: nn.Module, inputs: Any, reference: Any) -> None:
    """Last sanity check: the folded model runs on `example_inputs` with the output shapes it
    had. It does not vouch for the values (an op reordering channels keeps every shape): that a
    fold keeps channel identity is decided by the dependency graph, which leaves any group
    flowing through an op not known to keep it unfolded (`modelfold.graph.channel_ops`)."""
    was = model.training
    try:
        with torch.no_grad():
            out = _call(model.eval(), inputs)
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


def _unique_params(model: nn.Module):
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p
