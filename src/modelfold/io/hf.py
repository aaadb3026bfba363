"""Hugging Face folders for folded LLMs.

`save_hf` writes what `save_pretrained` writes (config.json + safetensors shards) plus the
tokenizer when given and a `modelfold.json` manifest (per-layer shapes, fold record, SHA-256 of
every other file in the folder, config included), atomically. When every layer has the same
shape the config describes the folded model and plain `AutoModelForCausalLM.from_pretrained(dir)`
loads it; with per-layer shapes `modelfold.load(dir)` builds the model from the config, resizes
each layer and loads the weights. Loading never runs remote code (`trust_remote_code=False`),
reads only plain file names inside the folder, and checks every shard's shapes and dtypes on a
meta-device model before allocating one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import jsonschema
import torch
from torch import nn

from modelfold.errors import FoldError
from modelfold.files import (
    HF_FORMAT,
    HF_FORMAT_VERSION,
    MANIFEST,
    PLAIN_NAME,
    atomic_folder,
    sha256_file,
    write_hf_manifest,
)
from modelfold.io import manifest as schema
from modelfold.llm import (
    LayerShape,
    architecture_of,
    layer_shape,
    resize_layers,
    saved_dtype,
    supported_model_types,
)
from modelfold.record import LLMFoldRecord, attach_llm_record, get_llm_record

_COUNT = {"type": "integer", "minimum": 1, "maximum": 1 << 24}
_LAYER = {"type": "object", "additionalProperties": False,
          "required": ["intermediate_size", "num_attention_heads", "num_key_value_heads"],
          "properties": {"intermediate_size": _COUNT, "num_attention_heads": _COUNT,
                         "num_key_value_heads": _COUNT}}
HF_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["format", "format_version", "modelfold_version", "torch_version", "layers",
                 "files_sha256", "record"],
    "properties": {
        "format": {"const": HF_FORMAT}, "format_version": {"const": HF_FORMAT_VERSION},
        "modelfold_version": {"type": "string"}, "torch_version": {"type": "string"},
        "layers": {"type": "array", "items": _LAYER, "maxItems": 10000},
        "files_sha256": {"type": "object", "minProperties": 1,
                         "propertyNames": {"pattern": PLAIN_NAME},
                         "additionalProperties": {"type": "string",
                                                  "pattern": "^[0-9a-f]{64}$"}},
        "record": {"anyOf": [{"type": "null"}, {
            "type": "object",
            "required": ["params_before", "params_after", "ratio", "layers_before", "layers"],
            "properties": {"params_before": {"type": "integer", "minimum": 1,
                                             "maximum": 1 << 53},
                           "params_after": {"type": "integer", "minimum": 0,
                                            "maximum": 1 << 53},
                           "ratio": {"type": "number", "minimum": 0, "maximum": 1},
                           "layers_before": {"type": "array", "items": _LAYER},
                           "layers": {"type": "array", "items": _LAYER}}}]},
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(HF_SCHEMA)


def is_hf_model(model: nn.Module) -> bool:
    """A Hugging Face LLM of a supported family (other Hugging Face models, e.g. a BertModel,
    are saved like any module, with a factory)."""
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        return False
    return getattr(model.config, "model_type", None) in supported_model_types()


def save_hf(model: nn.Module, path: Path, *, tokenizer: Any = None) -> Path:
    arch = architecture_of(model)
    shapes = [layer_shape(arch, layer).__dict__ for layer in arch.layers(model)]
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_hf_manifest(tmp, shapes, get_llm_record(model))
    return path


def load_hf(path: Path, manifest: dict[str, Any], *, device: str | torch.device | None = None
            ) -> nn.Module:
    from safetensors.torch import load_file

    where = path / MANIFEST
    if manifest.get("format_version") != HF_FORMAT_VERSION:
        raise FoldError(f"load: {where} has format version {manifest.get('format_version')!r}; "
                        f"this modelfold reads version {HF_FORMAT_VERSION}.")
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(manifest))
    if error is not None:
        field = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise FoldError(f"load: {where} is malformed at {field}: {error.message[:200]}.")
    files = manifest["files_sha256"]
    shards = sorted(name for name in files if name.endswith(".safetensors"))
    if "config.json" not in files or not shards:
        raise FoldError(f"load: {where} must list config.json and at least one .safetensors "
                        "file.")
    for name, digest in files.items():
        file = path / name
        if not file.is_file() or file.is_symlink():
            raise FoldError(f"load: {file} is missing.")
        if sha256_file(file) != digest:
            raise FoldError(f"load: {file} does not match the checksum in {where}; the file is "
                            "truncated or was modified.")
    stored: dict[str, dict[str, Any]] = {}
    for name in shards:
        stored.update(schema.file_tensors(path / name)[0])
    shapes = [LayerShape(**s) for s in manifest["layers"]]

    def build(meta: bool) -> nn.Module:
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = _from_config(path)
            resize_layers(model, shapes)
        return model

    expected = {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                for k, t in build(meta=True).state_dict().items()}
    tied = {k for k in set(expected) - set(stored) if k.endswith("lm_head.weight")}
    if set(expected) - tied != set(stored):
        raise FoldError(f"load: the weights in {path} do not fit its config: missing "
                        f"{sorted(set(expected) - tied - set(stored))[:5]}, unexpected "
                        f"{sorted(set(stored) - set(expected))[:5]}.")
    wrong = [k for k in stored if stored[k] != expected[k]]
    if wrong:
        k = wrong[0]
        raise FoldError(f"load: {path} holds {k!r} as {stored[k]['dtype']} {stored[k]['shape']}, "
                        f"but its config and manifest describe {expected[k]['dtype']} "
                        f"{expected[k]['shape']}.")
    model = build(meta=False)
    state: dict[str, torch.Tensor] = {}
    for name in shards:
        state.update(load_file(str(path / name)))
    model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()
    schema.check_finite(model, path)
    record = manifest["record"]
    if record is not None:
        params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        if record["params_after"] != params or len(record["layers"]) != len(shapes) or len(
                record["layers_before"]) != len(shapes):
            raise FoldError(f"load: the fold record in {where} does not describe the model in "
                            f"{path} ({params:,} parameters, {len(shapes)} layers).")
        attach_llm_record(model, LLMFoldRecord.from_dict(record))
    model.eval()
    return model.to(device) if device is not None else model


def _from_config(path: Path) -> nn.Module:
    """The config's architecture, never running code the folder names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False,
                                            local_files_only=True)
        return AutoModelForCausalLM.from_config(config, dtype=saved_dtype(config),
                                                trust_remote_code=False)
    except FoldError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FoldError(f"load: cannot build a causal LM from {path / 'config.json'} "
                        f"({type(exc).__name__}: {str(exc)[:300]}).") from exc
