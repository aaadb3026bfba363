"""What a fold leaves on the folded model: config, plan, shapes, provenance.

`FoldRecord` describes a graph fold, `LLMFoldRecord` an LLM fold (or pruning) done layer by
layer; both are plain JSON in a saved folder's manifest."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

RECORD_ATTR = "_modelfold_record"
FACTORY_ATTR = "_modelfold_factory"
LLM_RECORD_ATTR = "_modelfold_llm_record"


@dataclass
class GroupInfo:
    name: str
    kind: str
    n: int
    k: int
    modules: list[str]
    status: str  # "folded", "kept", "output", "ignored", "unsafe"
    reason: str | None = None  # why an "unsafe" group could not be folded


@dataclass
class FoldRecord:
    config: dict[str, Any]
    ratio: float
    plan: dict[str, Any]
    groups: list[GroupInfo]
    module_attrs: dict[str, dict[str, Any]]  # attributes changed by folding, per module
    input_spec: Any  # shapes/dtypes of example_inputs (see `input_spec`)
    params_before: int
    params_after: int
    factory: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LLMFoldRecord:
    """Per-layer shapes, ratios and parameter counts of an LLM fold (or pruning)."""

    params_before: int
    params_after: int
    ratio: float  # the uniform ratio (0 for a recipe)
    layers_before: list[dict[str, int]]  # LayerShape fields, per decoder layer
    layers: list[dict[str, int]]
    method: str = "fold"
    architecture: str = ""
    parts: list[str] = field(default_factory=list)
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)  # part -> layer -> ratio
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a manifest we do not know

    def to_dict(self) -> dict[str, Any]:
        """The JSON object a manifest stores."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LLMFoldRecord:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def __getitem__(self, key: str) -> Any:
        """Read access by key, as to the plain dict this record used to be."""
        return self.to_dict()[key]


def get_record(model: nn.Module) -> FoldRecord | None:
    return getattr(model, RECORD_ATTR, None)


def get_llm_record(model: nn.Module) -> LLMFoldRecord | None:
    return getattr(model, LLM_RECORD_ATTR, None)


def attach_llm_record(model: nn.Module, record: LLMFoldRecord) -> None:
    setattr(model, LLM_RECORD_ATTR, record)


def input_spec(inputs: Any) -> Any:
    """JSON-able description of example inputs (shapes and dtypes, no values)."""
    if isinstance(inputs, torch.Tensor):
        return {"shape": list(inputs.shape), "dtype": str(inputs.dtype).removeprefix("torch.")}
    if isinstance(inputs, dict):
        return {"dict": {k: input_spec(v) for k, v in inputs.items()}}
    if isinstance(inputs, (list, tuple)):
        return {"tuple": [input_spec(v) for v in inputs]}
    raise TypeError(type(inputs).__name__)


def inputs_from_spec(spec: Any, device: torch.device | str | None = None) -> Any:
    """Zero tensors matching a spec (enough for tracing and MAC counting)."""
    if "shape" in spec:
        dtype = getattr(torch, spec["dtype"])
        return torch.zeros(spec["shape"], dtype=dtype, device=device)
    if "dict" in spec:
        return {k: inputs_from_spec(v, device) for k, v in spec["dict"].items()}
    return tuple(inputs_from_spec(v, device) for v in spec["tuple"])


def simple_attrs(module: nn.Module) -> dict[str, Any]:
    """Int/float/bool/tuple attributes of a module: the ones folding may change."""
    out: dict[str, Any] = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, (bool, int, float)) or (
            isinstance(value, tuple) and all(isinstance(v, int) for v in value)
        ):
            out[key] = value
    return out


def changed_attrs(
    before: dict[str, dict[str, Any]], model: nn.Module
) -> dict[str, dict[str, Any]]:
    changed: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        now = simple_attrs(module)
        diff = {k: (list(v) if isinstance(v, tuple) else v) for k, v in now.items()
                if before.get(name, {}).get(k) != v}
        if diff:
            changed[name] = diff
    return changed
