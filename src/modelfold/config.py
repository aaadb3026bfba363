"""`FoldConfig`: every knob of a fold, declarative and JSON-serialisable (torchao style)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from modelfold.errors import FoldError
from modelfold.repair.deep_inversion import DeepInversionConfig

CONFIG_VERSION = 1

Clusterer = Literal["kmeans", "hartigan", "ward", "activation"]
RepairName = Literal["none", "data", "approx", "deep_inversion", "deep_inversion_debiased",
                     "self_generated"]
FeatureSet = Literal["full", "producer"]


@dataclass
class FoldConfig:
    """Everything that decides what `modelfold.fold` computes.

    Attributes:
        ratio: fraction of channels removed in every coupled group; a group of n channels keeps
            k = max(1, round(n * (1 - ratio))) (the paper's semantics).
        target_sparsity: fraction of the model's parameters to remove instead of a fixed ratio;
            the ratio reaching it within `sparsity_tolerance` is searched for.
        module_ratios: per-module overrides, module name (as in `named_modules`) -> ratio. A group
            takes the override of its root module (the first producer in the group).
        clusterer: "kmeans" (Lloyd, k-means++ init), "hartigan" (k-means followed by Hartigan
            single-point moves: lower inertia), "ward" (agglomerative, Ward linkage) or, for
            Hugging Face LLMs only, "activation" (MLP channels clustered by their outputs on
            text the model generates itself; see `modelfold.llm.repair`).
        features: "full" = producer rows + consumer columns (reference R1 semantics),
            "producer" = producer rows only.
        normalize_blocks: scale every tensor block of a feature vector to unit Frobenius norm
            so large tensors do not dominate the distance.
        allocation: "uniform" (every group loses the same fraction: the paper) or "inertia"
            (same parameter count as the uniform ratio / target, spread over the groups by
            their Ward clustering-distortion curves: redundant groups fold harder) or, for LLMs
            only, "sensitivity" (MLPs whose output error on self-generated text is over twice
            the median keep all channels; the other layers share the same budget).
        round_to: kept channel counts are rounded to a multiple of this (1 = the paper's exact
            k; 8 or 64 let GPU kernels run at full speed on the folded shapes).
        n_init, max_iter, tol: k-means restarts, Lloyd iterations and relative-shift tolerance.
        seed: seed of the clustering (the result is deterministic for a given seed).
        sparsity_tolerance: allowed gap between achieved and target parameter sparsity.
        repair: "none" (Fold-Naive), "data" (Fold-R, needs `calibration`), "approx"
            (Fold-AR, data-free), "deep_inversion" (Fold-DIR) or "deep_inversion_debiased"
            (Fold-DIR corrected by the original model's real-vs-synthetic statistics gap);
            for LLMs "self_generated" (least-squares refit of the folded down projections on
            text the model generates itself).
        calibration_samples: sample budget of "data" / "deep_inversion" repair.
        ar_correlation: how Fold-AR estimates activation correlations from weights:
            "calibrated" (default; cosines under an input covariance fitted to the BN
            statistics), "producer" rows (the paper's derivation, white inputs), "full" group
            vectors (the reference code's last version) or "spatial_mean" (summed kernels).
        ar_floor: positive floor of Fold-AR's denominator 1 + (N - 1) rho.
        self_calibrate: data-free folding calibrated on inputs the model synthesises itself
            (graph models: BN-statistics inversion or sampled tokens, channels merged by their
            activations, allocation by measured sensitivity, least-squares refit of the
            consumers, see `modelfold.calibrate`; LLMs: clusterer "activation", allocation
            "sensitivity" and repair "self_generated"). Sets the clusterer, allocation and
            repair itself.
        deep_inversion: `DeepInversionConfig` fields (defaults: the reference's settings; see
            `DeepInversionConfig.preset("cpu")` for a fast one).
    """

    ratio: float | None = None
    target_sparsity: float | None = None
    module_ratios: dict[str, float] = field(default_factory=dict)
    clusterer: Clusterer = "kmeans"
    features: FeatureSet = "full"
    normalize_blocks: bool = False
    allocation: Literal["uniform", "inertia", "sensitivity"] = "uniform"
    round_to: int = 1
    n_init: int = 3
    max_iter: int = 100
    tol: float = 1e-6
    seed: int = 0
    sparsity_tolerance: float = 0.01
    repair: RepairName = "none"
    calibration_samples: int = 1024
    ar_correlation: Literal["producer", "full", "spatial_mean", "calibrated"] = "calibrated"
    ar_floor: float = 0.05
    deep_inversion: dict[str, Any] = field(
        default_factory=lambda: dataclasses.asdict(DeepInversionConfig())
    )
    self_calibrate: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if (self.ratio is None) == (self.target_sparsity is None):
            raise FoldError("FoldConfig: give exactly one of `ratio` or `target_sparsity`.")
        if self.ratio is not None:
            check_ratio(self.ratio, "ratio")
        if self.target_sparsity is not None:
            check_ratio(self.target_sparsity, "target_sparsity")
        for name, r in self.module_ratios.items():
            check_ratio(r, f"module_ratios[{name!r}]")
        if self.clusterer not in ("kmeans", "hartigan", "ward", "activation"):
            raise FoldError(f"FoldConfig.clusterer={self.clusterer!r} is unknown; use 'kmeans', "
                            "'hartigan', 'ward' or (LLMs) 'activation'.")
        if self.allocation not in ("uniform", "inertia", "sensitivity"):
            raise FoldError(f"FoldConfig.allocation={self.allocation!r} is unknown; use "
                            "'uniform', 'inertia' or (LLMs) 'sensitivity'.")
        if self.features not in ("full", "producer"):
            raise FoldError(
                f"FoldConfig.features={self.features!r} is unknown; use 'full' or 'producer'."
            )
        from modelfold.repair import repair_names

        if self.repair not in repair_names():
            raise FoldError(f"FoldConfig.repair={self.repair!r} is unknown; use one of "
                            f"{repair_names()}.")
        if self.ar_correlation not in ("full", "producer", "spatial_mean", "calibrated"):
            raise FoldError(f"FoldConfig.ar_correlation={self.ar_correlation!r} is unknown; use "
                            "'producer' or 'full'.")
        if not 0 < self.ar_floor <= 1:
            raise FoldError(f"FoldConfig.ar_floor must lie in (0, 1], got {self.ar_floor}.")
        try:
            DeepInversionConfig(**self.deep_inversion).validate()
        except TypeError as exc:
            raise FoldError(f"FoldConfig.deep_inversion: {exc}.") from exc
        for name in ("n_init", "max_iter", "calibration_samples", "round_to"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FoldError(f"FoldConfig.{name} must be a positive integer, got {value!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise FoldError(f"FoldConfig.seed must be an integer, got {self.seed!r}.")
        if not 0 < self.sparsity_tolerance < 1:
            raise FoldError("FoldConfig.sparsity_tolerance must lie in (0, 1).")
        if not isinstance(self.self_calibrate, bool):
            raise FoldError(f"FoldConfig.self_calibrate must be true or false, got "
                            f"{self.self_calibrate!r}.")
        if self.version != CONFIG_VERSION:
            raise FoldError(
                f"FoldConfig version {self.version} is not supported by this modelfold "
                f"(expects {CONFIG_VERSION})."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FoldConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FoldError(f"FoldConfig: unknown keys {unknown}; known keys: {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> FoldConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FoldError(f"FoldConfig: invalid JSON ({exc}).") from exc
        if not isinstance(data, dict):
            raise FoldError("FoldConfig: JSON must be an object.")
        return cls.from_dict(data)


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
