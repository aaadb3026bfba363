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
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import torch
from torch import nn

from modelfold.errors import FoldError

HF_FORMAT = "modelfold-hf"
HF_FORMAT_VERSION = 2
MANIFEST = "modelfold.json"
_PLAIN_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$"

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
                         "propertyNames": {"pattern": _PLAIN_NAME},
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
    from modelfold.llm.architectures import supported_model_types

    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        return False
    return getattr(model.config, "model_type", None) in supported_model_types()


def hf_files(manifest: dict[str, Any]) -> set[str]:
    """Plain file names a Hugging Face manifest accounts for (see `our_files`)."""
    files = manifest.get("files_sha256")
    if not isinstance(files, dict):
        raise FoldError("the manifest lists no files")
    return {name for name in files if isinstance(name, str) and re.match(_PLAIN_NAME, name)}


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
    """modelfold.json beside the weights: per-layer shapes, record, SHA-256 of every file."""
    from modelfold.io.folder import _sha256, _version

    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format": HF_FORMAT,
        "format_version": HF_FORMAT_VERSION,
        "modelfold_version": _version(),
        "torch_version": torch.__version__,
        "layers": shapes,
        "files_sha256": {name: _sha256(folder / name) for name in files},
        "record": record,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def saved_dtype(config: Any) -> torch.dtype:
    """The dtype a Hugging Face config records (bf16 stays bf16); float32 when it has none."""
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype):
        raise FoldError(f"the config records dtype {getattr(config, 'dtype', None)!r}, which is "
                        "not a torch dtype.")
    return dtype


def load_hf(path: Path, manifest: dict[str, Any], *, device: str | torch.device | None = None
            ) -> nn.Module:
    from safetensors.torch import load_file

    from modelfold.io import manifest as schema
    from modelfold.io.folder import _sha256
    from modelfold.llm.fold import LLM_RECORD_ATTR, LayerShape, resize_layers

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
        if _sha256(file) != digest:
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
        setattr(model, LLM_RECORD_ATTR, record)
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
