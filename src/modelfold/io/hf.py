"""Hugging Face folders for folded LLMs.

`save_hf` writes what `save_pretrained` writes (config.json + safetensors shards) plus the
tokenizer when given and a `modelfold.json` manifest (per-layer shapes, fold record, SHA-256 of
every weight file), atomically. When every layer has the same shape the config describes the
folded model and plain `AutoModelForCausalLM.from_pretrained(dir)` loads it; with per-layer
shapes `modelfold.load(dir)` builds the model from the config, resizes each layer and loads the
weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelfold.errors import FoldError

HF_FORMAT = "modelfold-hf"
HF_FORMAT_VERSION = 1
MANIFEST = "modelfold.json"


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(model, "config")


def save_hf(model: nn.Module, path: Path, *, tokenizer: Any = None) -> Path:
    from modelfold.io.folder import atomic_folder
    from modelfold.llm.architectures import architecture_of
    from modelfold.llm.fold import LLM_RECORD_ATTR, layer_shape

    arch = architecture_of(model)
    shapes = [layer_shape(arch, layer).__dict__ for layer in arch.layers(model)]
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_hf_manifest(tmp, shapes, getattr(model, LLM_RECORD_ATTR, None))
    return path


def write_hf_manifest(folder: Path, shapes: list[dict], record: dict | None) -> None:
    """modelfold.json beside the weights: per-layer shapes, record, SHA-256 of every shard."""
    from modelfold.io.folder import _sha256, _version

    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    manifest = {
        "format": HF_FORMAT,
        "format_version": HF_FORMAT_VERSION,
        "modelfold_version": _version(),
        "torch_version": torch.__version__,
        "layers": shapes,
        "weights_sha256": {name: _sha256(folder / name) for name in weights},
        "record": record,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def saved_dtype(config: Any) -> torch.dtype:
    """The dtype a Hugging Face config records (bf16 stays bf16); float32 when it has none."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_hf(path: Path, manifest: dict[str, Any], *, device: str | torch.device | None = None
            ) -> nn.Module:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from modelfold.io.folder import _sha256
    from modelfold.llm.fold import LLM_RECORD_ATTR, LayerShape, resize_layers

    if manifest.get("format_version") != HF_FORMAT_VERSION:
        raise FoldError(f"load: {path / MANIFEST} has format version "
                        f"{manifest.get('format_version')}; this modelfold reads version "
                        f"{HF_FORMAT_VERSION}.")
    sums = manifest.get("weights_sha256")
    if not isinstance(sums, dict) or not sums:
        raise FoldError(f"load: {path / MANIFEST} lists no weight files.")
    for name, digest in sums.items():
        file = path / name
        if not file.is_file():
            raise FoldError(f"load: {file} is missing.")
        if _sha256(file) != digest:
            raise FoldError(f"load: {file} does not match the checksum in {path / MANIFEST}; "
                            "the file is truncated or was modified.")
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype(config))
    try:
        resize_layers(model, [LayerShape(**s) for s in manifest["layers"]])
    except (TypeError, KeyError) as exc:
        raise FoldError(f"load: {path / MANIFEST} has malformed layer shapes ({exc}).") from exc
    state: dict[str, torch.Tensor] = {}
    for name in sums:
        state.update(load_file(str(path / name)))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise FoldError(f"load: the weights in {path} do not fit its config ({exc}).") from exc
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise FoldError(f"load: weights in {path} do not fit the model: missing "
                        f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}.")
    if tied:
        model.tie_weights()
    if manifest.get("record") is not None:
        setattr(model, LLM_RECORD_ATTR, manifest["record"])
    model.eval()
    return model.to(device) if device is not None else model
