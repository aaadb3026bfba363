"""`fold()`: one entry point; the config's type picks the pipeline (`register_pipeline`).

`fold(model, example_inputs, FoldConfig(...))` runs the graph path (`modelfold.graph_fold`),
`fold(model, None, LLMFoldConfig(...))` folds a Hugging Face causal LM layer by layer
(`modelfold.llm.fold`). The keyword form (`fold(model, x, ratio=0.5, repair="approx")`) builds
the config of the model's pipeline from the keywords.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

import modelfold.graph_fold
import modelfold.llm.fold  # noqa: F401 - registers the LLM pipeline
from modelfold.config import FoldConfig, PipelineConfig, pipeline_for, resolve_config
from modelfold.errors import FoldError
from modelfold.llm.config import LLMFoldConfig

# keyword -> default: run-time options, each taken by the pipelines that list it
_RUN_OPTIONS: dict[str, Any] = {"ignored": (), "inplace": False, "device": None,
                                "calibration": None}


def fold(
    model: nn.Module,
    example_inputs: Any = None,
    config: PipelineConfig | None = None,
    *,
    ratio: float | None = None,
    target_sparsity: float | None = None,
    target_macs: float | None = None,
    target_memory: int | None = None,
    target_latency: float | None = None,
    seed: int | None = None,
    module_ratios: dict[str, float] | None = None,
    repair: str | None = None,
    self_calibrate: bool | None = None,
    parts: Iterable[str] | None = None,
    recipe: str | dict | None = None,
    ignored: Iterable[nn.Module] = (),
    inplace: bool = False,
    device: str | torch.device | None = None,
    calibration: Any = None,
) -> nn.Module:
    """Fold `model`: cluster similar channels (or heads) and merge every cluster.

    Args:
        model: any traceable PyTorch model, or a Hugging Face LLaMA / Qwen2 / Mistral causal LM
            (folded layer by layer; no `example_inputs` needed). Not modified unless `inplace`.
        example_inputs: a tensor, a tuple of tensors or a dict of tensors fitting `model`.
        config: a `FoldConfig` (graph path) or `LLMFoldConfig` (causal LMs); its type picks
            the pipeline. Without one, the keywords below build the config of the model's
            pipeline; with one, they override its fields.
        ratio, target_sparsity, target_macs, target_memory, target_latency, seed, module_ratios,
            repair,
            self_calibrate, parts, recipe: config fields (see `FoldConfig` and `LLMFoldConfig`;
            a keyword the config does not have is refused, naming the config that has it).
            `target_macs` is the fraction of the multiply-accumulates on `example_inputs` to
            remove, `target_memory` the bytes of parameters and buffers to keep at most,
            `target_latency` the fraction of the measured latency on `example_inputs` to remove
            (graph path).
        ignored: modules whose channel groups are left as they are (graph path).
        inplace: fold `model` itself instead of a copy (saves memory; if folding fails part way
            the model may be left partly folded, so keep a copy of anything you cannot rebuild).
        device: where to fold (the folded model stays there); defaults to the model's device.
        calibration: input batches for repair="data" (graph path; a tensor, DataLoader or
            iterable).

    Returns:
        The folded model: a real, smaller `nn.Module` of the same classes.
    """
    overrides = {"ratio": ratio, "target_sparsity": target_sparsity,
                 "target_macs": target_macs, "target_memory": target_memory,
                 "target_latency": target_latency, "seed": seed,
                 "module_ratios": None if module_ratios is None else dict(module_ratios),
                 "repair": repair, "self_calibrate": self_calibrate,
                 "parts": parts, "recipe": recipe}
    llm = (config is None or isinstance(config, FoldConfig)) and _is_llm(model, example_inputs)
    if isinstance(config, FoldConfig) and llm:
        config = LLMFoldConfig.from_fold_config(config)
    if config is None or any(v is not None for v in overrides.values()):
        cls = type(config) if config is not None else LLMFoldConfig if llm else FoldConfig
        config = resolve_config(cls, config, **overrides)
    pipeline = pipeline_for(config)
    given = {"ignored": tuple(ignored), "inplace": inplace, "device": device,
             "calibration": calibration}
    for name, value in given.items():
        if name not in pipeline.options and not _is_default(value, _RUN_OPTIONS[name]):
            raise FoldError(f"`{name}` does not apply to {pipeline.config_cls.applies_to}; it "
                            f"takes {', '.join(f'`{o}`' for o in pipeline.options)}.")
    options = {k: v for k, v in given.items() if k in pipeline.options}
    return pipeline.fn(model, example_inputs, config, **options)


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


def _is_default(value: Any, default: Any) -> bool:
    if isinstance(default, tuple):
        return len(value) == 0
    return value is default or value == default
