"""`LLMFoldConfig`: every knob of folding a Hugging Face causal LM, JSON-serialisable."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from modelfold.budget import check_ratio
from modelfold.cluster import clusterer_names
from modelfold.config import CONFIG_VERSION, FoldConfig, PipelineConfig
from modelfold.errors import FoldError
from modelfold.registry import Registry

PARTS = ("mlp", "attention")


@dataclass(frozen=True)
class LLMStrategy:
    """A named LLM strategy; `needs_text`: it runs the model on text it generates itself (so it
    needs the original model next to the folded one, and the whole model loaded)."""

    fn: Callable[..., Any]
    needs_text: bool = False


# clusterers beyond the weight clusterers of `modelfold.cluster`: fn(context) -> selector
LLM_CLUSTERERS: Registry[LLMStrategy] = Registry("LLM clusterer")
# fn(context, plan) -> plan with the budget spread over the layers
LLM_ALLOCATIONS: Registry[LLMStrategy] = Registry("LLM allocation")
# fn(context, selector) -> selector that also repairs
LLM_REPAIRS: Registry[LLMStrategy] = Registry("LLM repair")


def _registrar(registry: Registry[LLMStrategy], name: str, needs_text: bool):
    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        registry.register(name, LLMStrategy(fn, needs_text))
        return fn

    return add


def register_llm_clusterer(name: str, *, needs_text: bool = False):
    """Decorator registering `fn(context) -> selector` as an LLM clusterer."""
    return _registrar(LLM_CLUSTERERS, name, needs_text)


def register_llm_allocation(name: str, *, needs_text: bool = False):
    """Decorator registering `fn(context, plan) -> plan` as an LLM allocation."""
    return _registrar(LLM_ALLOCATIONS, name, needs_text)


def register_llm_repair(name: str, *, needs_text: bool = False):
    """Decorator registering `fn(context, selector) -> selector` as an LLM repair."""
    return _registrar(LLM_REPAIRS, name, needs_text)


def llm_clusterer_names() -> list[str]:
    """The weight clusterers of `modelfold.cluster` and the LLM clusterers."""
    return sorted({*clusterer_names(), *LLM_CLUSTERERS.names()})


def llm_allocation_names() -> list[str]:
    return LLM_ALLOCATIONS.names()


def llm_repair_names() -> list[str]:
    return LLM_REPAIRS.names()


@dataclass
class LLMFoldConfig(PipelineConfig):
    """Everything that decides what `modelfold.fold` computes on a LLaMA / Qwen2 / Mistral LM.

    Attributes:
        ratio: fraction of channels / query heads removed in every layer of `parts`.
        target_sparsity: fraction of all parameters to remove; a uniform ratio is solved for.
        recipe: per-layer ratios instead: a preset name (`modelfold.llm.RECIPES`) or
            {"mlp": {layer: ratio}, "attention": {...}} (layer keys: ints or "a-b" ranges).
            Exactly one of `ratio`, `target_sparsity` and `recipe` is given.
        parts: what is folded: "mlp" (SwiGLU channels) and / or "attention" (query heads).
        clusterer: a weight clusterer of `modelfold.cluster` ("kmeans", "hartigan", "ward")
            or an LLM clusterer (`modelfold.llm.register_llm_clusterer`): "activation" (MLP
            channels and query heads clustered by their outputs on text the model generates
            itself; folded heads' output projection refitted on it).
        allocation: a registered LLM allocation (`modelfold.llm.register_llm_allocation`):
            "uniform", "inertia" (MLP widths spread by clustering distortion at the same
            parameter count) or "sensitivity" (MLPs whose output error on self-generated text
            is over twice the median keep all channels; with attention folded too, MLP
            channels take the budget first, up to 80 % of a layer's, and query heads the rest,
            see `modelfold.llm.fold.split_heads_and_mlp`).
        repair: a registered LLM repair (`modelfold.llm.register_llm_repair`): "none" or
            "self_generated" (least-squares refit of the folded down projections on text the
            model generates itself).
        round_to: kept MLP widths are rounded to multiples of this.
        n_init, max_iter, tol, seed: clustering settings (as `FoldConfig`).
        sparsity_tolerance: allowed gap between achieved and target parameter sparsity.
        self_calibrate: the data-free recipe: clusterer "activation", allocation "sensitivity"
            and repair "self_generated" (set on construction).
    """

    applies_to: ClassVar[str] = "Hugging Face causal LMs (LLMFoldConfig)"
    budget_fields: ClassVar[tuple[str, ...]] = ("ratio", "target_sparsity", "recipe")

    ratio: float | None = None
    target_sparsity: float | None = None
    recipe: str | dict[str, dict[str, float]] | None = None
    parts: tuple[str, ...] = ("mlp",)
    clusterer: str = "kmeans"
    allocation: str = "uniform"
    repair: str = "none"
    round_to: int = 1
    n_init: int = 3
    max_iter: int = 100
    tol: float = 1e-6
    seed: int = 0
    sparsity_tolerance: float = 0.01
    self_calibrate: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.parts, str):
            self.parts = (self.parts,)
        elif isinstance(self.parts, Iterable) and not isinstance(self.parts, Mapping):
            self.parts = tuple(self.parts)
        if isinstance(self.recipe, Mapping):  # JSON keys are strings: store them so
            self.recipe = {part: ({str(k): v for k, v in table.items()}
                                  if isinstance(table, Mapping) else table)
                           for part, table in self.recipe.items()}
        if self.self_calibrate is True:
            self.clusterer, self.allocation = "activation", "sensitivity"
            self.repair = "self_generated"
        super().__post_init__()

    @classmethod
    def choices(cls) -> dict[str, Callable[[], list[str]]]:
        return {"clusterer": llm_clusterer_names, "allocation": llm_allocation_names,
                "repair": llm_repair_names}

    def validate(self) -> None:
        super().validate()
        if (not isinstance(self.parts, tuple) or not self.parts
                or any(p not in PARTS for p in self.parts)):
            raise FoldError(f"`parts` must be a non-empty subset of {PARTS}, got {self.parts}.")
        if self.recipe is not None and not isinstance(self.recipe, (str, Mapping)):
            raise FoldError("`recipe` must be a preset name or {part: {layer: ratio}}, got "
                            f"{type(self.recipe).__name__}.")
        if isinstance(self.recipe, Mapping):
            for part, table in self.recipe.items():
                if not isinstance(table, Mapping):
                    raise FoldError(f"recipe[{part!r}] must map layers to ratios.")
                for key, value in table.items():
                    check_ratio(value, f"recipe[{part!r}][{key!r}]")

    @classmethod
    def from_fold_config(cls, config: FoldConfig) -> LLMFoldConfig:
        """The `LLMFoldConfig` of a `FoldConfig` given for a causal LM: the fields both have; a
        graph-only field set to other than its default is refused."""
        own = {f.name for f in dataclasses.fields(cls)}
        data = {}
        for f in dataclasses.fields(FoldConfig):
            value = getattr(config, f.name)
            if f.name in own:
                data[f.name] = value
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if value != default:
                raise FoldError(f"FoldConfig.{f.name} applies to the graph-based path only; "
                                "fold this causal LM with an LLMFoldConfig.")
        return cls.from_dict(data)
