"""Folding (and channel selection) of Hugging Face LLaMA-family decoders, layer by layer.

MLP (SwiGLU): the intermediate channels of a layer are clustered on [gate row | up row | down
column]; a cluster's gate and up rows are averaged, its down columns summed.

Attention: heads are folded as whole `head_dim` blocks, so RoPE (which rotates pairs inside a
head) stays consistent. With grouped-query attention every query head stays attached to its
key/value head: the query heads *inside each KV group* are clustered (q rows averaged, o columns
summed), every group keeps the same number of query heads (`num_attention_heads` stays a
multiple of `num_key_value_heads`) and the KV heads - hence the KV cache - are unchanged. With
multi-head attention (one query head per KV head) whole heads are clustered on [q | k | v rows |
o columns] and q, k, v averaged. See the README for why (and numbers).

Every transformation is one pair of matrices per layer: `mean_map` (k x n) mixes producer rows,
`sum_map` (k x n) mixes consumer columns. Folding uses cluster averages / cluster sums; magnitude
and Wanda-sp pruning (`modelfold.baselines.llm`) use the same code with a selection matrix.
Math is done in float32 whatever the model's dtype, and the user's model is never changed
unless `inplace=True`: the result shares every unchanged tensor with it instead of copying the
whole model, so memory stays at one model plus the rebuilt layers.

`fold_llm(model, LLMFoldConfig(...))` picks its strategies by name from registries:
clusterers (the weight clusterers of `modelfold.cluster` plus `register_llm_clusterer`),
`register_llm_allocation` and `register_llm_repair`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from modelfold.budget import bisect_ratio, check_ratio, kept_channels
from modelfold.cluster import cluster_channels
from modelfold.config import register_pipeline
from modelfold.errors import FoldError, check_parameters
from modelfold.llm.architectures import DecoderArchitecture, architecture_of
from modelfold.llm.config import (
    LLM_ALLOCATIONS,
    LLM_CLUSTERERS,
    LLM_REPAIRS,
    PARTS,
    LLMFoldConfig,
    register_llm_allocation,
    register_llm_clusterer,
    register_llm_repair,
)
from modelfold.llm.repair import always_resident
from modelfold.record import LLMFoldRecord, attach_llm_record

# The paper's LLaMA-1-7B recipe (Section 5): MLP of layers 5-10 at 0.5 and 13-27 at 0.4.
RECIPES: dict[str, dict[str, dict[int, float]]] = {
    "llama-7b-paper": {"mlp": {**{i: 0.5 for i in range(5, 11)},
                               **{i: 0.4 for i in range(13, 28)}}},
}


@dataclass(frozen=True)
class LayerShape:
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int


class LLMFoldContext:
    """What LLM strategies read: the model, its architecture, the config and, computed once on
    first use, text the original model generates itself.

    `resident(i)` is a context manager in which decoder layer i holds its weights: a no-op for
    a loaded model; `fold_checkpoint` passes one that reads the layer from the checkpoint, so
    strategies that read every layer's weights run with one layer in memory at a time."""

    def __init__(self, model: nn.Module, config: LLMFoldConfig,
                 resident: Callable[[int], AbstractContextManager] = always_resident
                 ) -> None:
        self.model, self.config = model, config
        self.arch = architecture_of(model)
        self.resident = resident
        self._tokens: torch.Tensor | None = None

    @property
    def tokens(self) -> torch.Tensor:
        if self._tokens is None:
            from modelfold.llm.repair import self_generated_tokens

            self._tokens = self_generated_tokens(self.model, seed=self.config.seed)
        return self._tokens


def fold_llm(
    model: nn.Module,
    config: LLMFoldConfig,
    *,
    inplace: bool = False,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Fold a Hugging Face LLaMA / Qwen2 / Mistral causal LM (see the module docstring) as
    `config` says: budget (`ratio`, `target_sparsity` or `recipe`), `parts`, clusterer,
    allocation and repair."""
    if not isinstance(config, LLMFoldConfig):
        raise FoldError(f"`config` must be an LLMFoldConfig, got {type(config).__name__}.")
    if inplace and self_calibrated(config):
        raise FoldError(f"{calibrated_options(config)} compare(s) the folded layers with "
                        "the original ones; it cannot fold in place.")
    context = LLMFoldContext(model, config)
    selector = selector_from_context(context)
    allocation = partial(LLM_ALLOCATIONS.get(config.allocation).fn, context)
    return transform_llm(model, selector, ratio=config.ratio,
                         target_sparsity=config.target_sparsity, parts=config.parts,
                         recipe=config.recipe, tolerance=config.sparsity_tolerance,
                         inplace=inplace, device=device, method="fold",
                         settings=config.to_dict(), round_to=config.round_to,
                         allocation=allocation)


def selector_from_context(context: LLMFoldContext):
    """The selector (clusterer, then repair) that `context.config` names. Self-calibrated
    options generate the original model's text first, before anything is folded."""
    config = context.config
    if self_calibrated(config):
        context.tokens  # noqa: B018
    if config.clusterer in LLM_CLUSTERERS:
        selector = LLM_CLUSTERERS.get(config.clusterer).fn(context)
    else:
        selector = fold_selector_from_config(config)
    return LLM_REPAIRS.get(config.repair).fn(context, selector)


@register_pipeline(LLMFoldConfig)
def fold_llm_pipeline(model: nn.Module, example_inputs: Any, config: LLMFoldConfig,
                      **options: Any) -> nn.Module:
    """`modelfold.fold` for an `LLMFoldConfig`: no example inputs are needed (or read)."""
    return fold_llm(model, config, **options)


def self_calibrated(config: LLMFoldConfig) -> bool:
    """Whether folding with `config` runs the model on text it generates itself."""
    return bool(calibrated_options(config))


def calibrated_options(config: LLMFoldConfig) -> str:
    """The options of `config` that run the model on its own text, e.g. "clusterer='activation'"."""
    options = [f"{name}={value!r}" for name, value, registry in (
        ("clusterer", config.clusterer, LLM_CLUSTERERS),
        ("repair", config.repair, LLM_REPAIRS),
        ("allocation", config.allocation, LLM_ALLOCATIONS))
        if value in registry and registry.get(value).needs_text]
    return ", ".join(options)


@register_llm_clusterer("activation", needs_text=True)
def _activation_clusterer(context: LLMFoldContext):
    """MLP channels clustered by their outputs on self-generated text (`modelfold.llm.repair`)."""
    from modelfold.llm.repair import CalibratedSelector

    return CalibratedSelector(context.model, context.arch, context.tokens)


@register_llm_repair("none")
def _no_repair(context: LLMFoldContext, selector):
    return selector


@register_llm_repair("self_generated", needs_text=True)
def _self_generated_repair(context: LLMFoldContext, selector):
    """Least-squares refit of the folded down projections on self-generated text."""
    from modelfold.llm.repair import CalibratedSelector

    if isinstance(selector, CalibratedSelector):
        selector.repair = True
        return selector
    return CalibratedSelector(context.model, context.arch, context.tokens, base=selector,
                              repair=True)


@register_llm_allocation("uniform")
def _uniform_allocation(context: LLMFoldContext, plan: LayerPlan) -> LayerPlan:
    """Every layer of `parts` loses the same fraction (or the recipe's)."""
    return plan


@register_llm_allocation("inertia")
def _inertia_allocation(context: LLMFoldContext, plan: LayerPlan) -> LayerPlan:
    return allocate_mlp(context.model, context.arch, plan, context.config.round_to,
                        resident=context.resident)


@register_llm_allocation("sensitivity", needs_text=True)
def _sensitivity_allocation(context: LLMFoldContext, plan: LayerPlan) -> LayerPlan:
    if {"mlp", "attention"} <= set(plan.parts) and any(plan.ratios["attention"].values()):
        plan, protected = split_heads_and_mlp(context.model, context.arch, context.tokens, plan,
                                              context.config.round_to, resident=context.resident)
        if protected:
            return plan
    return protect_sensitive_layers(context.model, context.arch, context.tokens,
                                    context.config.round_to, plan, resident=context.resident)


MAX_MLP_RATIO = 0.8  # split_heads_and_mlp: MLP channels take the budget up to this ratio


def split_heads_and_mlp(model: nn.Module, arch: DecoderArchitecture, tokens: torch.Tensor,
                        plan: LayerPlan, round_to: int = 1, *,
                        resident: Callable[[int], AbstractContextManager] = always_resident
                        ) -> tuple[LayerPlan, bool]:
    """`allocation="sensitivity"` with MLPs and attention folded: the parameter count of `plan`
    split between MLP channels (one ratio for all layers) and query heads (per layer: u heads
    removed from every head group), MLP channels first. Query heads take only what the MLPs
    cannot give at MAX_MLP_RATIO of the channels of the layers the sensitivity allocation does
    not keep whole, level by level: one head per group from every layer before
    two from any, the layers of a level taken where folding their heads costs least (expected
    KL divergence of folding and refitting them on held-out self-generated text:
    `modelfold.llm.repair.head_error_curves`, measured for a level only when the budget
    reaches it). Returns (plan, whether its sensitive MLPs are protected already: so when no
    head is folded and the plan is the MLP-only one the sensitivity pass measured).

    Why this order, and why 0.8 (measured on SmolLM2-135M, tail perplexity on 12 windows,
    docs/ablations.md): at 40 % of all parameters, MLP channels alone (ratio 0.70) give 26.9;
    a third of the query heads in every layer but the first plus MLP channels 39.3, in the
    last 15 layers 71.0; splits minimising the sum of measured per-layer errors (expected KL
    or relative output norm) 65-80 - per-layer measurements undervalue heads several-fold
    against MLP channels, and a second head of a group far more than a first. At 50 % the
    MLPs alone (ratio 0.87) collapse (1,405) while a third of the heads in layers 1-29 plus
    MLP channels at 0.79 give 121.6.
    """
    from modelfold.llm.repair import head_error_curves

    shapes = plan.shapes
    n = len(shapes)
    group = [s.num_attention_heads if s.num_attention_heads == s.num_key_value_heads
             else s.num_attention_heads // s.num_key_value_heads for s in shapes]
    n_groups = [s.num_attention_heads // g for s, g in zip(shapes, group, strict=True)]

    def with_units(units: list[int], widths: list[int]) -> list[LayerShape]:
        out = []
        for s, u, g, w in zip(shapes, units, n_groups, widths, strict=True):
            q = s.num_attention_heads - u * g
            kv = q if s.num_attention_heads == s.num_key_value_heads else s.num_key_value_heads
            out.append(LayerShape(w, q, kv))
        return out

    full = [s.intermediate_size for s in shapes]
    base = predicted_parameter_count(model, arch, with_units([0] * n, full))
    head_cost = [base - predicted_parameter_count(model, arch, with_units(
        [int(j == i) for j in range(n)], full)) for i in range(n)]
    target = 1 - plan.params_after / plan.params_before

    def widths_for(u: list[int]) -> list[int]:
        """MLP widths, one ratio for all layers, that bring head units `u` to the budget."""
        def sparsity(r: float) -> float:
            kept = [kept_channels(w, r, round_to) if r > 0 else w for w in full]
            return 1 - predicted_parameter_count(model, arch, with_units(u, kept)) / \
                plan.params_before

        r = bisect_ratio(sparsity, target, 0.999)
        return [kept_channels(w, r, round_to) if r > 0 else w for w in full]

    # the layers the sensitivity allocation keeps whole when the budget is spent on MLP
    # channels alone give no channels: the cap applies to the MLPs of the others
    mlp_only = LayerPlan(plan.parts, {**plan.ratios, "attention": dict.fromkeys(range(n), 0.0)},
                         plan.uniform, shapes,
                         with_units([0] * n, widths_for([0] * n)), plan.params_before,
                         plan.params_after)
    mlp_protected = protect_sensitive_layers(model, arch, tokens, round_to, mlp_only,
                                             resident=resident)
    protected = {i for i, s in enumerate(mlp_protected.new_shapes)
                 if s.intermediate_size == full[i]}
    mlp_total = base - predicted_parameter_count(model, arch, with_units(
        [0] * n, [w if i in protected else 0 for i, w in enumerate(full)]))
    removed = plan.params_before - plan.params_after

    def mlp_ratio(u: list[int]) -> float:
        return (removed - sum(a * c for a, c in zip(u, head_cost, strict=True))) / mlp_total

    units = [0] * n
    if mlp_ratio(units) <= MAX_MLP_RATIO:
        return mlp_protected, True
    if resident is not always_resident:
        raise FoldError("allocation='sensitivity' ranks the query heads on loss gradients "
                        "of the whole model; fold in memory, or give allocation='uniform' "
                        "to a streamed fold.")
    most = [g - 1 for g in group]
    measured, errors = 0, [[0.0] for _ in range(n)]
    while mlp_ratio(units) > MAX_MLP_RATIO:
        options = [i for i in range(n) if units[i] < most[i]]
        if not options:
            break
        level = min(units[i] for i in options) + 1
        if level > measured:  # the costs of a deeper level only once the budget reaches it
            measured = level
            errors = head_error_curves(model, arch, tokens, [min(level, m) for m in most])
        # level by level (every layer loses one head per group before any loses two),
        # the cheapest layers of a level first
        i = min((j for j in options if units[j] < level),
                key=lambda j: (errors[j][units[j] + 1] - errors[j][units[j]]) / head_cost[j])
        units[i] += 1
    new = with_units(units, widths_for(units))
    ratios = {**plan.ratios,
              "mlp": {i: 1 - s.intermediate_size / full[i] for i, s in enumerate(new)},
              "attention": {i: units[i] / group[i] for i in range(n)}}
    return LayerPlan(plan.parts, ratios, plan.uniform, shapes, new, plan.params_before,
                     predicted_parameter_count(model, arch, new)), False


def protect_sensitive_layers(model: nn.Module, arch: DecoderArchitecture, tokens: torch.Tensor,
                             round_to: int, plan: LayerPlan, *,
                             resident: Callable[[int], AbstractContextManager] = always_resident
                             ) -> LayerPlan:
    """`allocation="sensitivity"`: `plan` with its most sensitive MLPs kept whole and their
    channels taken from the other layers (`modelfold.llm.repair.sensitive_layers`)."""
    from modelfold.llm.repair import protect, sensitive_layers

    kept = [s.intermediate_size for s in plan.new_shapes]
    widths = [s.intermediate_size for s in plan.shapes]
    # a quarter of the text (512 tokens by default): it only has to single out outlier layers
    protected = sensitive_layers(model, arch, tokens[: max(1, tokens.shape[0] // 4)], kept,
                                 resident=resident)
    # at large budgets the other layers cannot absorb every sensitive layer's channels: protect
    # the most sensitive ones that fit
    while protected:
        try:
            new = protect(kept, widths, protected, round_to)
            break
        except FoldError:
            protected = protected[:-1]
    else:
        new = kept
    return with_mlp_widths(model, arch, plan, dict(enumerate(new)))


def transform_llm(
    model: nn.Module,
    selector: Callable[[str, int, nn.Module, DecoderArchitecture, int], Any],
    *,
    ratio: float | None,
    target_sparsity: float | None,
    parts: Iterable[str],
    recipe: str | Mapping[str, Mapping[Any, float]] | None,
    tolerance: float = 0.01,
    inplace: bool = False,
    device: str | torch.device | None = None,
    method: str = "fold",
    settings: dict[str, Any] | None = None,
    round_to: int = 1,
    allocation: Callable[[LayerPlan], LayerPlan] | None = None,
) -> nn.Module:
    """Shrink the layers of `model` with `selector`, which maps (part, layer index, layer,
    architecture, kept count) to a (mean_map, sum_map) pair; `allocation` may then spread the
    planned budget over the layers. Shared by folding and pruning."""
    arch = architecture_of(model)
    check_parameters(model)
    plan = plan_layers(model, arch, ratio=ratio, target_sparsity=target_sparsity, parts=parts,
                       recipe=recipe, tolerance=tolerance, round_to=round_to)
    if allocation is not None:
        plan = allocation(plan)
    shapes, new_shapes, predicted = plan.shapes, plan.new_shapes, plan.params_after

    work = model if inplace else share_unchanged_copy(model)
    work_layers = arch.layers(work)
    with torch.no_grad():
        for i, layer in enumerate(work_layers):
            shrink_layer(arch, layer, i, selector, shapes[i], new_shapes[i], device)
    set_config_shapes(work, new_shapes)
    params_after = count_parameters(work)
    if params_after != predicted:
        raise FoldError(f"{method}: {params_after} parameters left, {predicted} expected; the "
                        "model's layers are not the LLaMA-family layout this handler assumes.")
    attach_llm_record(work, plan.record(method, arch, settings))
    return work


@dataclass
class LayerPlan:
    """Per-layer ratios and shapes of one compression, from shapes alone (no weights)."""

    parts: tuple[str, ...]
    ratios: dict[str, dict[int, float]]
    uniform: float  # the uniform ratio (0 for a recipe)
    shapes: list[LayerShape]
    new_shapes: list[LayerShape]
    params_before: int
    params_after: int

    def record(self, method: str, arch: DecoderArchitecture, settings: dict | None
               ) -> LLMFoldRecord:
        return LLMFoldRecord(
            params_before=self.params_before, params_after=self.params_after,
            ratio=self.uniform, layers_before=[s.__dict__ for s in self.shapes],
            layers=[s.__dict__ for s in self.new_shapes], method=method,
            architecture=arch.name, parts=list(self.parts),
            ratios={p: {str(i): r for i, r in v.items() if r} for p, v in self.ratios.items()},
            settings=settings or {})


def plan_layers(model: nn.Module, arch: DecoderArchitecture, *, ratio: float | None,
                target_sparsity: float | None, parts: Iterable[str],
                recipe: str | Mapping[str, Mapping[Any, float]] | None,
                tolerance: float = 0.01, round_to: int = 1) -> LayerPlan:
    """Resolve exactly one of ratio / target_sparsity / recipe into per-layer shapes (MLP
    widths rounded to multiples of `round_to`). Works on a meta-device skeleton too (only
    shapes are read)."""
    parts = _check_parts(parts)
    layers = arch.layers(model)
    shapes = [layer_shape(arch, layer) for layer in layers]
    given = [x is not None for x in (ratio, target_sparsity, recipe)]
    if sum(given) != 1:
        raise FoldError("give exactly one of `ratio`, `target_sparsity` or `recipe`.")
    uniform = 0.0
    if recipe is not None:
        ratios = recipe_ratios(recipe, len(layers))
        unknown = set(ratios) - set(PARTS)
        if unknown:
            raise FoldError(f"recipe names unknown parts {sorted(unknown)}; known: {PARTS}.")
        parts = tuple(p for p in PARTS if p in ratios)
    elif target_sparsity is not None:
        target = check_ratio(target_sparsity, "target_sparsity")
        uniform = solve_uniform_ratio(model, arch, parts, target, tolerance, round_to)
        ratios = {p: dict.fromkeys(range(len(layers)), uniform) for p in parts}
    else:
        uniform = check_ratio(ratio, "ratio")
        ratios = {p: dict.fromkeys(range(len(layers)), uniform) for p in parts}
    new_shapes = [kept_shape(s, ratios.get("mlp", {}).get(i, 0.0),
                             ratios.get("attention", {}).get(i, 0.0), round_to)
                  for i, s in enumerate(shapes)]
    return LayerPlan(parts, ratios, uniform, shapes, new_shapes, count_parameters(model),
                     predicted_parameter_count(model, arch, new_shapes))


def allocate_mlp(model: nn.Module, arch: DecoderArchitecture, plan: LayerPlan,
                 round_to: int = 1, *,
                 resident: Callable[[int], AbstractContextManager] = always_resident
                 ) -> LayerPlan:
    """`allocation="inertia"` for LLMs: the parameter count of `plan`, with the MLP widths of
    the layers chosen by their Ward clustering-distortion curves on [gate | up | down^T]
    (`modelfold.cluster.allocation`): layers whose channels are redundant fold harder."""
    from modelfold.cluster.allocation import allocate, distortion_curve

    if any(plan.ratios.get("attention", {}).values()):
        raise FoldError("allocation='inertia' spreads MLP channels only; fold parts=('mlp',).")
    layers = arch.layers(model)
    curves, costs = {}, {}
    for i, layer in enumerate(layers):
        with resident(i):
            gate, up, down = arch.mlp_linears(layer)
            if gate.weight.device.type == "meta":
                raise FoldError("allocation='inertia' reads the MLP weights, but layer "
                                f"{i} has none (a meta-device model).")
            features = torch.cat([gate.weight.float(), up.weight.float(),
                                  down.weight.float().T], 1)
            curves[i] = distortion_curve(features)
        costs[i] = features.shape[1] / plan.params_before  # parameters per channel (no bias)

    def count(ks: dict[int, int]) -> int:
        return with_mlp_widths(model, arch, plan, ks).params_after

    ks = allocate(curves, costs, count, plan.params_after, round_to=round_to)
    return with_mlp_widths(model, arch, plan, ks)


def with_mlp_widths(model: nn.Module, arch: DecoderArchitecture, plan: LayerPlan,
                    ks: dict[int, int]) -> LayerPlan:
    """`plan` with the MLP of layer i kept at ks[i] channels."""
    shapes = [replace(s, intermediate_size=ks[i]) for i, s in enumerate(plan.new_shapes)]
    ratios = {**plan.ratios, "mlp": {i: 1 - ks[i] / s.intermediate_size
                                     for i, s in enumerate(plan.shapes)}}
    return LayerPlan(plan.parts, ratios, plan.uniform, plan.shapes, shapes,
                     plan.params_before, predicted_parameter_count(model, arch, shapes))


def shrink_layer(arch: DecoderArchitecture, layer: nn.Module, index: int, selector,
                 old: LayerShape, new: LayerShape, device) -> None:
    """Rebuild one decoder layer to `new` with the maps `selector` chooses: the attention
    first, so that a calibrated selector sees the MLP input through the rebuilt attention."""
    if new.num_attention_heads != old.num_attention_heads:
        maps = selector("attention", index, layer, arch, new.num_attention_heads)
        _rebuild_attention(arch, layer, *maps, new=new, device=device)
    if new.intermediate_size != old.intermediate_size:
        maps = selector("mlp", index, layer, arch, new.intermediate_size)
        _rebuild_mlp(arch, layer, *maps, device=device)


# ---------------------------------------------------------------- shapes and budgets


def layer_shape(arch: DecoderArchitecture, layer: nn.Module) -> LayerShape:
    gate, _, _ = arch.mlp_linears(layer)
    attn = arch.attention_module(layer)
    q, k = getattr(attn, arch.q), getattr(attn, arch.k)
    head_dim = attn.head_dim
    return LayerShape(gate.out_features, q.out_features // head_dim, k.out_features // head_dim)


def kept_shape(shape: LayerShape, mlp_ratio: float, attention_ratio: float,
               round_to: int = 1) -> LayerShape:
    """Shape of a layer after removing `mlp_ratio` of its channels (kept count rounded to a
    multiple of `round_to`) and `attention_ratio` of its query heads (per KV group with GQA,
    whole heads with MHA)."""
    n_q, n_kv = shape.num_attention_heads, shape.num_key_value_heads
    if attention_ratio <= 0:
        q_new, kv_new = n_q, n_kv
    elif n_q == n_kv:
        q_new = kv_new = kept_channels(n_q, attention_ratio)
    else:
        q_new, kv_new = n_kv * kept_channels(n_q // n_kv, attention_ratio), n_kv
    return LayerShape(kept_channels(shape.intermediate_size, mlp_ratio, round_to)
                      if mlp_ratio > 0
                      else shape.intermediate_size, q_new, kv_new)


def predicted_parameter_count(model: nn.Module, arch: DecoderArchitecture,
                              new_shapes: list[LayerShape]) -> int:
    total = count_parameters(model)
    for layer, new in zip(arch.layers(model), new_shapes, strict=True):
        old = layer_shape(arch, layer)
        gate, up, down = arch.mlp_linears(layer)
        per_channel = (gate.in_features + up.in_features + down.out_features
                       + (gate.bias is not None) + (up.bias is not None))
        total -= (old.intermediate_size - new.intermediate_size) * per_channel
        attn = arch.attention_module(layer)
        q, k, v, o = (getattr(attn, n) for n in (arch.q, arch.k, arch.v, arch.o))
        hd = attn.head_dim
        per_q = hd * (q.in_features + (q.bias is not None) + o.out_features)
        per_kv = hd * (k.in_features + (k.bias is not None) + v.in_features + (v.bias is not None))
        total -= (old.num_attention_heads - new.num_attention_heads) * per_q
        total -= (old.num_key_value_heads - new.num_key_value_heads) * per_kv
    return total


def solve_uniform_ratio(model: nn.Module, arch: DecoderArchitecture, parts: tuple[str, ...],
                        target: float, tolerance: float, round_to: int = 1) -> float:
    """The uniform ratio over `parts` whose parameter sparsity is closest to `target`."""
    shapes = [layer_shape(arch, layer) for layer in arch.layers(model)]
    total = count_parameters(model)

    def sparsity(r: float) -> float:
        new = [kept_shape(s, r if "mlp" in parts else 0.0,
                          r if "attention" in parts else 0.0, round_to) for s in shapes]
        return 1 - predicted_parameter_count(model, arch, new) / total

    best = bisect_ratio(sparsity, target, 0.999)
    if abs(sparsity(best) - target) > tolerance:
        raise FoldError(f"target_sparsity {target:.3f} is not reachable by folding {parts} "
                        f"(closest: {sparsity(best):.3f} at ratio {best:.3f}; the maximum is "
                        f"{sparsity(0.999):.3f}). Add parts or lower the target.")
    return best


def recipe_ratios(recipe: str | Mapping[str, Mapping[Any, float]], n_layers: int
                  ) -> dict[str, dict[int, float]]:
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise FoldError(f"unknown recipe {recipe!r}; presets: {sorted(RECIPES)}.")
        recipe = RECIPES[recipe]
    out: dict[str, dict[int, float]] = {}
    for part, table in recipe.items():
        ratios: dict[int, float] = {}
        for key, value in table.items():
            for i in _layer_range(key):
                if not 0 <= i < n_layers:
                    raise FoldError(f"recipe[{part!r}] names layer {i}; the model has layers "
                                    f"0-{n_layers - 1}.")
                ratios[i] = check_ratio(value, f"recipe[{part!r}][{key!r}]")
        out[part] = ratios
    return out


def _layer_range(key: Any) -> range:
    if isinstance(key, int):
        return range(key, key + 1)
    if isinstance(key, str):
        try:
            a, _, b = key.partition("-")
            return range(int(a), int(b or a) + 1)
        except ValueError:
            pass
    raise FoldError(f"recipe layer key {key!r}: use an int or an 'a-b' range string.")


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied embedding / lm_head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------- selectors


def assignment_maps(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_map, sum_map), both (k, n): cluster averages and cluster sums."""
    one_hot = torch.zeros(k, labels.numel(), dtype=torch.float32, device=labels.device)
    one_hot[labels, torch.arange(labels.numel(), device=labels.device)] = 1.0
    return one_hot / one_hot.sum(1, keepdim=True), one_hot


def selection_maps(keep: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_map, sum_map) that keep the channels `keep` (in their original order)."""
    keep = torch.sort(keep).values
    select = torch.zeros(keep.numel(), n, dtype=torch.float32, device=keep.device)
    select[torch.arange(keep.numel(), device=keep.device), keep] = 1.0
    return select, select


def fold_selector_from_config(config: Any):
    """The folding selector with the clusterer settings of `config`."""
    return folding_selector(lambda features, k: cluster_channels(features, k, config))


def folding_selector(cluster: Callable[[torch.Tensor, int], torch.Tensor]):
    """Selector that clusters channels / heads on their weights (see the module docstring)."""

    def select(part: str, index: int, layer: nn.Module, arch: DecoderArchitecture, k: int):
        if part == "mlp":
            gate, up, down = arch.mlp_linears(layer)
            features = torch.cat([gate.weight.float(), up.weight.float(),
                                  down.weight.float().T], 1)
            return assignment_maps(cluster(features, k), k)
        attn = arch.attention_module(layer)
        head_features = head_blocks(arch, attn)
        n_q, n_kv = head_features["q"].shape[0], head_features["k"].shape[0]
        if n_q == n_kv:  # multi-head: merge whole heads
            features = torch.cat([head_features[n] for n in ("q", "k", "v", "o")], 1)
            return assignment_maps(cluster(features, k), k)
        m, per_group = n_q // n_kv, k // n_kv
        features = torch.cat([head_features["q"], head_features["o"]], 1)
        mean_map = torch.zeros(k, n_q)
        sum_map = torch.zeros(k, n_q)
        for g in range(n_kv):  # query heads stay in their KV group
            rows, cols = slice(g * per_group, (g + 1) * per_group), slice(g * m, (g + 1) * m)
            mean_map[rows, cols], sum_map[rows, cols] = assignment_maps(
                cluster(features[cols], per_group), per_group)
        return mean_map, sum_map

    return select


def head_blocks(arch: DecoderArchitecture, attn: nn.Module) -> dict[str, torch.Tensor]:
    """Per-head flattened weights: q/k/v rows of each head and o columns of each head."""
    hd = attn.head_dim
    out = {}
    for name in ("q", "k", "v"):
        w = getattr(attn, getattr(arch, name)).weight.float()
        out[name] = w.reshape(-1, hd * w.shape[1])
    o = getattr(attn, arch.o).weight.float()  # (hidden, n_q * hd)
    out["o"] = o.T.reshape(-1, hd * o.shape[0])
    return out


# ---------------------------------------------------------------- rebuilding layers


def _expand_heads(head_map: torch.Tensor, head_dim: int) -> torch.Tensor:
    return torch.kron(head_map, torch.eye(head_dim, dtype=head_map.dtype,
                                          device=head_map.device))


@torch.no_grad()
def _new_linear(old: nn.Linear, mean_map: torch.Tensor | None, sum_map: torch.Tensor | None,
                device: str | torch.device | None) -> nn.Linear:
    """`old` with its output rows mixed by `mean_map` and input columns by `sum_map` (fp32)."""
    dev = torch.device(device) if device is not None else old.weight.device
    w = old.weight.detach().to(dev, torch.float32)
    b = old.bias.detach().to(dev, torch.float32) if old.bias is not None else None
    if mean_map is not None:
        mean_map = mean_map.to(dev)
        w = mean_map @ w
        b = mean_map @ b if b is not None else None
    if sum_map is not None:
        w = w @ sum_map.to(dev).T
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=old.weight.device,
                    dtype=old.weight.dtype)
    new.weight.copy_(w)
    if b is not None:
        new.bias.copy_(b)
    new.weight.requires_grad_(old.weight.requires_grad)
    return new


def _rebuild_mlp(arch: DecoderArchitecture, layer: nn.Module, mean_map: torch.Tensor,
                 sum_map: torch.Tensor, down_weight: torch.Tensor | None = None, *,
                 device) -> None:
    """Gate/up rows mixed by `mean_map`, down columns by `sum_map` - or, when a selector
    refitted it, the down projection's weight `down_weight` (hidden, k) itself."""
    mlp = layer.get_submodule(arch.mlp)
    gate, up, down = arch.mlp_linears(layer)
    setattr(mlp, arch.gate, _new_linear(gate, mean_map, None, device))
    setattr(mlp, arch.up, _new_linear(up, mean_map, None, device))
    new_down = _new_linear(down, None, sum_map, device)
    if down_weight is not None:
        new_down.weight.copy_(down_weight)
    setattr(mlp, arch.down, new_down)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = mean_map.shape[0]


def _rebuild_attention(arch: DecoderArchitecture, layer: nn.Module, mean_map: torch.Tensor,
                       sum_map: torch.Tensor, o_weight: torch.Tensor | None = None, *,
                       new: LayerShape, device) -> None:
    """Query (and, with multi-head attention, key / value) heads mixed by `mean_map`, output
    columns by `sum_map` - or, when a selector refitted it, the output projection's weight
    `o_weight` (hidden, k * head_dim) itself."""
    attn = arch.attention_module(layer)
    hd = attn.head_dim
    q_mean, o_sum = _expand_heads(mean_map, hd), _expand_heads(sum_map, hd)
    n_kv_old = getattr(attn, arch.k).out_features // hd
    setattr(attn, arch.q, _new_linear(getattr(attn, arch.q), q_mean, None, device))
    new_o = _new_linear(getattr(attn, arch.o), None, o_sum, device)
    if o_weight is not None:
        new_o.weight.copy_(o_weight)
    setattr(attn, arch.o, new_o)
    if new.num_key_value_heads != n_kv_old:  # multi-head: k and v heads merge with q
        for name in (arch.k, arch.v):
            setattr(attn, name, _new_linear(getattr(attn, name), q_mean, None, device))
    attn.num_key_value_groups = new.num_attention_heads // new.num_key_value_heads
    for attr, value in (("num_heads", new.num_attention_heads),
                        ("num_key_value_heads", new.num_key_value_heads)):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, value)


def set_config_shapes(model: nn.Module, new: list[LayerShape]) -> None:
    """Uniform shapes go into the HF config (plain `from_pretrained` then loads the folder);
    per-layer shapes are recorded for `modelfold.load`."""
    cfg = model.config
    head_dim = arch_head_dim(model)
    cfg.head_dim = head_dim  # explicit: hidden_size / num_attention_heads no longer holds
    for attr, field in (("intermediate_size", "intermediate_size"),
                        ("num_attention_heads", "num_attention_heads"),
                        ("num_key_value_heads", "num_key_value_heads")):
        values = {getattr(s, field) for s in new}
        if len(values) == 1:
            setattr(cfg, attr, values.pop())
    if _non_uniform(new):
        cfg.modelfold_layers = [s.__dict__ for s in new]
    elif hasattr(cfg, "modelfold_layers"):
        del cfg.modelfold_layers
    blocks = block_configs(new) if _non_uniform(new) else None
    if blocks is not None:
        cfg.block_configs = blocks
    elif hasattr(cfg, "block_configs"):
        del cfg.block_configs


def block_configs(shapes: list[LayerShape]) -> list[dict] | None:
    """Per-layer shapes in the DeciLM / Nemotron-NAS `block_configs` layout (what vLLM's
    `DeciLMForCausalLM` reads: one query-head count for the model, per-layer KV groups and MLP
    widths); None when the query-head count differs between layers, which that layout cannot
    express."""
    if len({s.num_attention_heads for s in shapes}) != 1:
        return None
    return [{"attention": {"no_op": False, "replace_with_linear": False,
                           "n_heads_in_group": s.num_attention_heads // s.num_key_value_heads},
             "ffn": {"no_op": False, "replace_with_linear": False,
                     "intermediate_size": s.intermediate_size}} for s in shapes]


def _non_uniform(shapes: list[LayerShape]) -> bool:
    return len({(s.intermediate_size, s.num_attention_heads, s.num_key_value_heads)
                for s in shapes}) > 1


def arch_head_dim(model: nn.Module) -> int:
    arch = architecture_of(model)
    return int(arch.attention_module(arch.layers(model)[0]).head_dim)


def resize_layers(model: nn.Module, shapes: list[LayerShape]) -> None:
    """Give the layers of a freshly built model the per-layer shapes of a folded one (weights
    are placeholders until a state dict is loaded)."""
    arch = architecture_of(model)
    layers = arch.layers(model)
    if len(shapes) != len(layers):
        raise FoldError(f"{len(shapes)} layer shapes recorded, the model has {len(layers)}.")
    with torch.no_grad():
        for layer, new in zip(layers, shapes, strict=True):
            old = layer_shape(arch, layer)
            if new.intermediate_size != old.intermediate_size:
                keep = torch.arange(new.intermediate_size)
                _rebuild_mlp(arch, layer, *selection_maps(keep, old.intermediate_size), device=None)
            if (new.num_attention_heads, new.num_key_value_heads) != (
                    old.num_attention_heads, old.num_key_value_heads):
                if new.num_key_value_heads == old.num_key_value_heads:
                    per, m = (new.num_attention_heads // new.num_key_value_heads,
                              old.num_attention_heads // old.num_key_value_heads)
                    keep = torch.tensor([g * m + j for g in range(new.num_key_value_heads)
                                         for j in range(per)])
                else:
                    keep = torch.arange(new.num_attention_heads)
                _rebuild_attention(arch, layer, *selection_maps(keep, old.num_attention_heads),
                                   new=new, device=None)


# ---------------------------------------------------------------- checks and copies


def share_unchanged_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with `model`.

    Layers are then rebuilt with new tensors in the copy only, so `model` is left untouched
    without a second full copy of the weights in memory."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def _check_parts(parts: Iterable[str]) -> tuple[str, ...]:
    if isinstance(parts, str):
        parts = (parts,)
    parts = tuple(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise FoldError(f"`parts` must be a non-empty subset of {PARTS}, got {parts}.")
    return parts
