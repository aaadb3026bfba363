"""`summary(model, folded)`: parameters, MACs and every group n -> k, side by side.

MACs are counted on the aten ops of one forward pass (`modelfold.macs.count_macs`); with
`latency=True` both models are also timed on the example input (median of repeated runs, on
the device the models sit on)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelfold.errors import FoldError
from modelfold.latency import median_latency
from modelfold.macs import count_macs
from modelfold.record import GroupInfo, LLMFoldRecord, get_llm_record, get_record, inputs_from_spec


@dataclass
class FoldSummary:
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    ratio: float
    groups: list[GroupInfo]
    latency_before_s: float | None = None
    latency_after_s: float | None = None

    @property
    def speedup(self) -> float | None:
        """Measured latency before / after (None unless measured)."""
        if not self.latency_before_s or not self.latency_after_s:
            return None
        return self.latency_before_s / self.latency_after_s

    @property
    def sparsity(self) -> float:
        """Fraction of parameters removed."""
        return 1.0 - self.params_after / self.params_before

    @property
    def mac_reduction(self) -> float | None:
        if not self.macs_before or self.macs_after is None:
            return None
        return 1.0 - self.macs_after / self.macs_before

    def to_dict(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before, "params_after": self.params_after,
            "sparsity": self.sparsity, "macs_before": self.macs_before,
            "macs_after": self.macs_after, "ratio": self.ratio,
            "latency_before_s": self.latency_before_s, "latency_after_s": self.latency_after_s,
            "groups": [vars(g) for g in self.groups],
        }

    def __str__(self) -> str:
        lines = [
            f"parameters : {self.params_before:>14,} -> {self.params_after:>14,}"
            f"  ({self.sparsity:.1%} removed)",
        ]
        if self.macs_before is not None and self.macs_after is not None:
            removed = self.mac_reduction
            lines.append(f"MACs       : {self.macs_before:>14,} -> {self.macs_after:>14,}"
                         + (f"  ({removed:.1%} removed)" if removed is not None else ""))
        elif self.macs_after is not None:  # the unfolded model's MACs are unknown
            lines.append(f"MACs after : {self.macs_after:>14,}")
        if self.latency_after_s is not None:
            after = f"{self.latency_after_s * 1e3:.3f} ms"
            lines.append(f"latency    : {self.latency_before_s * 1e3:.3f} ms -> {after}  "
                         f"({self.speedup:.2f}x faster)" if self.speedup is not None
                         else f"latency after : {after}")
        lines.append(f"ratio      : {self.ratio:.4f}")
        width = max([len(g.name) for g in self.groups] + [5])
        lines.append(f"{'group':<{width}}  {'kind':<8}  {'n':>6} -> {'k':<6} {'status':<8} modules")
        for g in self.groups:
            mods = ", ".join(g.modules[:4]) + (f", +{len(g.modules) - 4}" if len(g.modules) > 4
                                               else "")
            lines.append(f"{g.name:<{width}}  {g.kind:<8}  {g.n:>6} -> {g.k:<6} {g.status:<8} "
                         f"{mods}")
        unsafe = [g for g in self.groups if g.status == "unsafe" and g.reason]
        if unsafe:
            lines.append("not foldable:")
            lines.extend(f"  {g.name}: {g.reason}" for g in unsafe)
        return "\n".join(lines)


def summary(
    model: nn.Module | None, folded: nn.Module, example_inputs: Any = None, *,
    latency: bool = False, runs: int = 20,
) -> FoldSummary:
    """Compare a model with its folded version (`model` may be None after `load`).

    `latency=True` also times a forward pass of both models on the example input (median of
    `runs`, after one warm-up run) on the device they are on."""
    llm = get_llm_record(folded)
    if llm is not None and latency:
        raise FoldError("summary(latency=True) times graph-path folds on their example input; "
                        "an LLM's latency depends on the sequence length: time it with "
                        "modelfold.latency.median_latency on token ids.")
    if llm is not None:
        return _llm_summary(llm, folded)
    record = get_record(folded)
    if record is None:
        raise FoldError("`folded` carries no fold record: pass a model returned by "
                        "modelfold.fold or modelfold.load.")
    inputs = "`example_inputs`"
    if example_inputs is None:
        device = next(folded.parameters()).device
        example_inputs = _recorded_inputs(record.input_spec, device)
        inputs = f"the example input recorded with it ({_describe(record.input_spec)})"
    if model is not None:
        macs_before = _count_macs(model, example_inputs, "the model", inputs)
    else:
        macs_before = record.extra.get("macs_before")
        if isinstance(macs_before, bool) or not isinstance(macs_before, int) or macs_before < 0:
            macs_before = None
    macs_after = _count_macs(folded, example_inputs, "the folded model", inputs)
    params_before = (sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
                     if model is not None else record.params_before)
    params_after = sum(p.numel() for p in {id(p): p for p in folded.parameters()}.values())
    result = FoldSummary(params_before, params_after, macs_before, macs_after, record.ratio,
                         record.groups)
    if latency:
        if runs < 1:
            raise FoldError(f"summary: `runs` must be at least 1, got {runs}.")
        result.latency_after_s = median_latency(folded, example_inputs, runs=runs)
        if model is not None:
            result.latency_before_s = median_latency(model, example_inputs, runs=runs)
    return result


MAX_EXAMPLE_ELEMENTS = 1 << 28  # zeros built from a fold record to count MACs on


def _recorded_inputs(spec: Any, device: torch.device) -> Any:
    """Zero inputs of the shapes a fold record holds, refusing absurd sizes."""
    elements = _elements(spec)
    if elements > MAX_EXAMPLE_ELEMENTS:
        raise FoldError(f"summary: the example input recorded with the model ({_describe(spec)}) "
                        f"has {elements:,} elements, too many to count MACs on; the fold record "
                        "is damaged.")
    return inputs_from_spec(spec, device)


def _elements(spec: Any) -> int:
    if "shape" in spec:
        return math.prod(spec["shape"])
    parts = spec["dict"].values() if "dict" in spec else spec["tuple"]
    return sum(_elements(p) for p in parts)


def _describe(spec: Any) -> str:
    text = json.dumps(spec, separators=(",", ":"))
    return text if len(text) <= 120 else text[:117] + "..."


def _count_macs(model: nn.Module, example_inputs: Any, which: str, inputs: str) -> int:
    """count_macs; a model that does not run on the inputs is a FoldError naming them."""
    if _empty(example_inputs):
        raise FoldError(f"summary: {inputs} holds no elements (an empty batch?), so MACs cannot "
                        "be counted on it.")
    try:
        return count_macs(model, example_inputs)
    except FoldError:
        raise
    except Exception as exc:  # the forward pass runs the user's model
        raise FoldError(f"summary: {which} does not run on {inputs} ({type(exc).__name__}: "
                        f"{exc}), so its MACs cannot be counted.") from exc


def _empty(x: Any) -> bool:
    """Inputs with a tensor of no elements (a forward pass on them does no work)."""
    if isinstance(x, torch.Tensor):
        return x.numel() == 0
    if isinstance(x, dict):
        return any(_empty(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_empty(v) for v in x)
    return False


def _llm_summary(record: LLMFoldRecord, folded: nn.Module) -> FoldSummary:
    """Per-layer MLP channels and attention heads n -> k of a folded LLM (MACs depend on the
    sequence length and are not counted)."""
    groups = []
    for i, (old, new) in enumerate(zip(record.layers_before, record.layers, strict=True)):
        for kind, key, part in (("channels", "intermediate_size", "mlp"),
                                ("heads", "num_attention_heads", "self_attn")):
            status = "folded" if new[key] != old[key] else "kept"
            groups.append(GroupInfo(f"layers.{i}.{part}", kind, old[key], new[key],
                                    [f"model.layers.{i}.{part}"], status))
    params_after = sum(p.numel() for p in {id(p): p for p in folded.parameters()}.values())
    return FoldSummary(record.params_before, params_after, None, None, float(record.ratio),
                       groups)
