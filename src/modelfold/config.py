"""Pipeline configs: every knob of a fold, declarative and JSON-serialisable (torchao style).

`FoldConfig` configures the graph path (any traceable model); `modelfold.llm.LLMFoldConfig`
configures Hugging Face causal LMs. Each holds only the fields of its own pipeline; strategy
fields (clusterer, allocation, repair, ...) are checked against their registries, so the names a
config accepts are the names registered.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from modelfold.budget import allocation_names, check_ratio
from modelfold.cluster import clusterer_names, feature_names
from modelfold.errors import FoldError
from modelfold.repair import correlation_names, repair_names
from modelfold.repair.deep_inversion import DeepInversionConfig

CONFIG_VERSION = 1  # fields added with a default (target_macs, target_memory, target_latency)
# keep older configs readable
# budget fields in [0, 1)
BUDGET_RATIOS = ("ratio", "target_sparsity", "target_macs", "target_latency")


class PipelineConfig:
    """Base of the pipeline configs: validated on construction, versioned, JSON round trip.

    Subclasses are dataclasses with a `version` field that set `VERSION`, `applies_to` (what
    the config folds, for error messages), `budget_fields` (exactly one must be set) and
    `choices()` (strategy field -> registered names). The common fields (`seed`, `n_init`,
    `max_iter`, `round_to`, `sparsity_tolerance`, `self_calibrate`) are checked where present."""

    VERSION: ClassVar[int] = CONFIG_VERSION
    applies_to: ClassVar[str] = ""
    budget_fields: ClassVar[tuple[str, ...]] = ("ratio", "target_sparsity")
    auto_round_to: ClassVar[bool] = False  # whether round_to="auto" (measured) is accepted
    _classes: ClassVar[list[type[PipelineConfig]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        PipelineConfig._classes.append(cls)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def choices(cls) -> dict[str, Callable[[], list[str]]]:
        """Strategy field -> the function listing its registered names."""
        return {}

    def validate(self) -> None:
        """Raise `FoldError` naming the first invalid field."""
        name = type(self).__name__
        if sum(getattr(self, f) is not None for f in self.budget_fields) != 1:
            raise FoldError(f"{name}: give exactly one of {_either(self.budget_fields)}.")
        for f in BUDGET_RATIOS:
            if getattr(self, f, None) is not None:
                check_ratio(getattr(self, f), f)
        if getattr(self, "target_memory", None) is not None:
            check_bytes(self.target_memory, "target_memory")
        for f, names in self.choices().items():
            self.check_choice(f, names())
        for f in ("n_init", "max_iter", "round_to"):
            if f == "round_to" and getattr(self, f, None) == "auto" and self.auto_round_to:
                continue  # measured when folding (`modelfold.rounding`)
            if hasattr(self, f):
                check_positive_int(self, f)
        seed = getattr(self, "seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise FoldError(f"{name}.seed must be an integer, got {seed!r}.")
        if not 0 < getattr(self, "sparsity_tolerance", 0.5) < 1:
            raise FoldError(f"{name}.sparsity_tolerance must lie in (0, 1).")
        if not isinstance(getattr(self, "self_calibrate", False), bool):
            raise FoldError(f"{name}.self_calibrate must be true or false, got "
                            f"{self.self_calibrate!r}.")
        if self.version != self.VERSION:
            raise FoldError(f"{name} version {self.version} is not supported by this modelfold "
                            f"(expects {self.VERSION}).")

    def check_choice(self, f: str, names: list[str]) -> None:
        """`self.<f>` must be a registered name; the error lists them, and names the config
        that takes the value if another pipeline does."""
        value = getattr(self, f)
        if value in names:
            return
        hint = ""
        for other in PipelineConfig._classes:
            if other is not type(self) and f in other.choices() and value in other.choices()[f]():
                hint = f" {value!r} applies to {other.applies_to}."
                break
        raise FoldError(f"{type(self).__name__}.{f}={value!r} is unknown; registered: "
                        f"{names}.{hint}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise FoldError(f"{cls.__name__}: unknown keys {unknown}; known keys: "
                            f"{sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Any:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FoldError(f"{cls.__name__}: invalid JSON ({exc}).") from exc
        if not isinstance(data, dict):
            raise FoldError(f"{cls.__name__}: JSON must be an object.")
        return cls.from_dict(data)


@dataclass
class FoldConfig(PipelineConfig):
    """Everything that decides what `modelfold.fold` computes on the graph path.

    Attributes:
        ratio: fraction of channels removed in every coupled group; a group of n channels keeps
            k = max(1, round(n * (1 - ratio))) (the paper's semantics).
        target_sparsity: fraction of the model's parameters to remove instead of a fixed ratio;
            the ratio reaching it within `sparsity_tolerance` is searched for.
        target_macs: fraction of the model's multiply-accumulates to remove, counted on the
            example input (`modelfold.macs.count_macs`: convolutions, matrix products and
            attention); solved like `target_sparsity`, and the folded model is counted again
            to check it.
        target_memory: bytes the folded model's parameters and buffers may take at most (their
            dtypes as they are); the smallest uniform ratio fitting is searched for, and the
            folded model is measured to check it.
        target_latency: fraction of the measured forward-pass latency on the example input (on
            the folding device, at the example's batch size) to remove: the smallest uniform
            ratio whose folded model runs that fast is searched for by bisection, each step a
            fold and a measurement (median of 5 runs). The one budget that depends on timing:
            results vary with the machine and its load. Exactly one of `ratio`,
            `target_sparsity`, `target_macs`, `target_memory` and `target_latency` is given.
        module_ratios: per-module overrides, module name (as in `named_modules`) -> ratio. A group
            takes the override of its root module (the first producer in the group).
        clusterer: a registered clusterer (`modelfold.cluster.register_clusterer`): "kmeans"
            (Lloyd, k-means++ init), "hartigan" (k-means followed by Hartigan single-point
            moves: lower inertia) or "ward" (agglomerative, Ward linkage).
        features: a registered feature set (`modelfold.cluster.register_features`): "full" =
            producer rows + consumer columns (reference R1 semantics), "producer" = producer
            rows only.
        normalize_blocks: scale every tensor block of a feature vector to unit Frobenius norm
            so large tensors do not dominate the distance.
        allocation: a registered allocation (`modelfold.budget.register_allocation`):
            "uniform" (every group loses the same fraction: the paper) or "inertia" (same
            parameter count (MACs under `target_macs`, bytes under `target_memory`) as the
            uniform ratio / target,
            spread over the groups by their Ward clustering-distortion curves: redundant groups
            fold harder). An allocation registered for parameters only refuses `target_macs`.
        round_to: kept channel counts are rounded to a multiple of this (1 = the paper's exact
            k; 8 or 64 let GPU kernels run at full speed on the folded shapes), or "auto": the
            multiple of 1, 8, 16, 32, 64 whose fold at the same budget runs fastest on
            `example_inputs` on the folding device, measured by folding with each
            (`modelfold.rounding`; a plain `ratio` is then spent as the MACs it removes with
            exact counts, and the record keeps the timings).
        n_init, max_iter, tol: k-means restarts, Lloyd iterations and relative-shift tolerance.
        seed: seed of the clustering (the result is deterministic for a given seed).
        sparsity_tolerance: allowed gap between the achieved and the target reduction
            (parameters for `target_sparsity`, MACs for `target_macs`).
        repair: a registered repair (`modelfold.repair.register_repair`): "none" (Fold-Naive),
            "data" (Fold-R, needs `calibration`), "approx" (Fold-AR, data-free),
            "deep_inversion" (Fold-DIR) or "deep_inversion_debiased" (Fold-DIR corrected by the
            original model's real-vs-synthetic statistics gap).
        calibration_samples: sample budget of "data" / "deep_inversion" repair.
        ar_correlation: a registered estimator (`modelfold.repair.register_correlation`) of
            how Fold-AR estimates activation correlations from weights: "calibrated" (default;
            cosines under an input covariance fitted to the BN statistics), "producer" rows (the
            paper's derivation, white inputs), "full" group vectors (the reference code's last
            version) or "spatial_mean" (summed kernels).
        ar_floor: positive floor of Fold-AR's denominator 1 + (N - 1) rho.
        self_calibrate: data-free folding calibrated on inputs the model synthesises itself
            (BN-statistics inversion or sampled tokens, channels merged by their activations,
            allocation by measured sensitivity, least-squares refit of the consumers, see
            `modelfold.calibrate`). Chooses the repair and allocation itself.
        deep_inversion: `DeepInversionConfig` fields (defaults: the reference's settings; see
            `DeepInversionConfig.preset("cpu")` for a fast one).
    """

    applies_to: ClassVar[str] = "the graph-based path (FoldConfig)"
    budget_fields: ClassVar[tuple[str, ...]] = ("ratio", "target_sparsity", "target_macs",
                                                "target_memory", "target_latency")
    auto_round_to: ClassVar[bool] = True

    ratio: float | None = None
    target_sparsity: float | None = None
    target_macs: float | None = None
    target_memory: int | None = None
    target_latency: float | None = None
    module_ratios: dict[str, float] = field(default_factory=dict)
    clusterer: str = "kmeans"
    features: str = "full"
    normalize_blocks: bool = False
    allocation: str = "uniform"
    round_to: int | str = 1
    n_init: int = 3
    max_iter: int = 100
    tol: float = 1e-6
    seed: int = 0
    sparsity_tolerance: float = 0.01
    repair: str = "none"
    calibration_samples: int = 1024
    ar_correlation: str = "calibrated"
    ar_floor: float = 0.05
    deep_inversion: dict[str, Any] = field(
        default_factory=lambda: dataclasses.asdict(DeepInversionConfig())
    )
    self_calibrate: bool = False
    version: int = CONFIG_VERSION

    @classmethod
    def choices(cls) -> dict[str, Callable[[], list[str]]]:
        return {"clusterer": clusterer_names, "allocation": allocation_names,
                "features": feature_names, "repair": repair_names,
                "ar_correlation": correlation_names}

    def validate(self) -> None:
        super().validate()
        for name, r in self.module_ratios.items():
            check_ratio(r, f"module_ratios[{name!r}]")
        if not 0 < self.ar_floor <= 1:
            raise FoldError(f"FoldConfig.ar_floor must lie in (0, 1], got {self.ar_floor}.")
        try:
            DeepInversionConfig(**self.deep_inversion).validate()
        except TypeError as exc:
            raise FoldError(f"FoldConfig.deep_inversion: {exc}.") from exc
        check_positive_int(self, "calibration_samples")
        if self.self_calibrate and (self.repair != "none" or self.allocation != "uniform"):
            raise FoldError("self_calibrate=True chooses its own repair (a least-squares refit) "
                            "and allocation (measured sensitivity); leave `repair` and "
                            f"`allocation` at their defaults (got repair={self.repair!r}, "
                            f"allocation={self.allocation!r}).")


@dataclass(frozen=True)
class Pipeline:
    """A registered pipeline: `fn(model, example_inputs, config, **options)` folds a model as a
    config of `config_cls` says; `options` are the run-time keywords (not part of the config)
    it takes."""

    config_cls: type[PipelineConfig]
    fn: Callable[..., nn.Module]
    options: tuple[str, ...]


PIPELINES: dict[type[PipelineConfig], Pipeline] = {}


def register_pipeline(config_cls: type[PipelineConfig], *,
                      options: tuple[str, ...] = ("inplace", "device")
                      ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: `fn` folds models configured by `config_cls` (`modelfold.fold` dispatches
    on the config's type)."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        PIPELINES[config_cls] = Pipeline(config_cls, fn, tuple(options))
        return fn

    return add


def pipeline_for(config: object) -> Pipeline:
    """The pipeline registered for the type of `config` (or its closest base)."""
    for cls in type(config).__mro__:
        if cls in PIPELINES:
            return PIPELINES[cls]
    names = sorted(cls.__name__ for cls in PIPELINES)
    raise FoldError(f"`config` must be one of the registered configs {names}, got "
                    f"{type(config).__name__}.")


def resolve_config(cls: type[PipelineConfig], config: PipelineConfig | None,
                   **overrides: Any) -> Any:
    """`config` (defaults when None) with the keyword `overrides` that are not None applied; a
    budget keyword (ratio, target_sparsity, ...) replaces the config's budget."""
    if config is not None and not isinstance(config, cls):
        raise FoldError(f"`config` must be a {cls.__name__}, got {type(config).__name__}.")
    given = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in given:
        if key not in known:
            other = [c.applies_to for c in PipelineConfig._classes
                     if c is not cls and key in {f.name for f in dataclasses.fields(c)}]
            where = f"; it applies to {other[0]}" if other else ""
            raise FoldError(f"`{key}` does not apply to {cls.applies_to}{where}.")
    budget = [k for k in cls.budget_fields if k in given]
    if len(budget) > 1:
        given_names = " and ".join(f"`{k}`" for k in budget)
        raise FoldError(f"give exactly one of {_either(cls.budget_fields)} (got {given_names}).")
    for key in budget:
        if key in BUDGET_RATIOS:
            check_ratio(given[key], key)
        elif key == "target_memory":
            check_bytes(given[key], key)
    data = config.to_dict() if config is not None else {}
    if budget:
        data.update(dict.fromkeys(cls.budget_fields))
    data.update(given)
    if all(data.get(k) is None for k in cls.budget_fields):
        raise FoldError(f"give {_either(cls.budget_fields)} (how much to remove).")
    return cls.from_dict(data)


def check_bytes(value: object, name: str) -> int:
    """A byte count is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FoldError(f"`{name}` must be a positive integer number of bytes, got {value!r}.")
    return value


def check_positive_int(config: Any, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FoldError(f"{type(config).__name__}.{name} must be a positive integer, got "
                        f"{value!r}.")


def _either(names: tuple[str, ...]) -> str:
    quoted = [f"`{n}`" for n in names]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]
