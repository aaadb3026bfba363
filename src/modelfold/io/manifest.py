"""What a `modelfold.json` may contain, checked before anything is built from it.

Structure is declared as JSON Schema (checked with `jsonschema`); what a schema cannot say is
checked here too: the manifest's digest, tensor names/shapes/dtypes against the safetensors
header, and module attributes against the tensors they describe.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import torch
from torch import nn

from modelfold.errors import FoldError

MAX_DIM = 1 << 40  # no real tensor dimension comes close; bounds arithmetic on shapes

# Attributes folding changes; a manifest may set nothing else on a module.
SHAPE_ATTRS = frozenset({
    "in_channels", "out_channels", "in_features", "out_features", "num_features",
    "normalized_shape", "groups", "num_heads", "head_dim", "embed_dim", "num_parameters",
    "num_embeddings", "embedding_dim", "num_channels", "num_groups",
    "num_attention_heads", "all_head_size",
})

# safetensors header dtype codes -> torch dtype names a manifest may record
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}

_DIM = {"type": "integer", "minimum": 0, "maximum": MAX_DIM}
_NAME = {"type": "string", "maxLength": 1000}
_FACTORY = {
    "type": "object", "required": ["target", "kwargs"], "additionalProperties": False,
    "properties": {"target": {"type": "string", "pattern": r"^[\w.]+:[\w.<>]+$",
                              "maxLength": 1000},
                   "kwargs": {"type": "object"}},
}
_GROUP = {
    "type": "object", "additionalProperties": False,
    "required": ["name", "kind", "n", "k", "modules", "status"],
    "properties": {"name": _NAME, "kind": {"enum": ["channels", "heads"]}, "n": _DIM, "k": _DIM,
                   "modules": {"type": "array", "items": _NAME},
                   "status": {"enum": ["folded", "kept", "output", "ignored", "unsafe"]},
                   "reason": {"anyOf": [{"type": "null"},
                                        {"type": "string", "maxLength": 2000}]}},
}
_ATTRS = {
    "type": "object",
    "additionalProperties": {
        "type": "object",
        "propertyNames": {"enum": sorted(SHAPE_ATTRS)},
        "properties": {name: ({"type": "array", "items": _DIM, "maxItems": 8}
                              if name == "normalized_shape" else _DIM)
                       for name in sorted(SHAPE_ATTRS)},
    },
}
_INPUT_SPEC = {
    "anyOf": [
        {"type": "object", "required": ["shape", "dtype"], "additionalProperties": False,
         "properties": {"shape": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                             "maximum": 1 << 20},
                                  "maxItems": 8},
                        "dtype": {"enum": sorted(SAFETENSORS_DTYPES.values())}}},
        {"type": "object", "required": ["dict"], "additionalProperties": False,
         "properties": {"dict": {"type": "object",
                                 "additionalProperties": {"$ref": "#/$defs/in"}}}},
        {"type": "object", "required": ["tuple"], "additionalProperties": False,
         "properties": {"tuple": {"type": "array", "items": {"$ref": "#/$defs/in"}}}},
    ],
}
_RECORD = {
    "type": "object", "additionalProperties": False,
    "required": ["config", "ratio", "plan", "groups", "module_attrs", "input_spec",
                 "params_before", "params_after", "factory", "extra"],
    "properties": {
        "config": {"type": "object"}, "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "plan": {"type": "object"}, "groups": {"type": "array", "items": _GROUP},
        "module_attrs": _ATTRS, "input_spec": {"$ref": "#/$defs/in"},
        "params_before": {"type": "integer", "minimum": 1, "maximum": 1 << 53},
        "params_after": {"type": "integer", "minimum": 0, "maximum": 1 << 53},
        "factory": {"anyOf": [{"type": "null"}, _FACTORY]},
        "extra": {"type": "object"},
    },
}
MANIFEST_SCHEMA = {
    "$defs": {"in": _INPUT_SPEC},
    "type": "object", "additionalProperties": False,
    "required": ["format", "format_version", "modelfold_version", "torch_version", "factory",
                 "tensors", "weights_sha256", "record", "module_attrs"],
    "properties": {
        "format": {"const": "modelfold"}, "format_version": {"type": "integer"},
        "modelfold_version": {"type": "string"}, "torch_version": {"type": "string"},
        "factory": _FACTORY,
        "tensors": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["shape", "dtype"], "additionalProperties": False,
            "properties": {"shape": {"type": "array", "items": _DIM, "maxItems": 8},
                           "dtype": {"enum": sorted(SAFETENSORS_DTYPES.values())}}}},
        "weights_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "record": {"anyOf": [{"type": "null"}, _RECORD]},
        "module_attrs": _ATTRS,
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)


def validate(manifest: Any, where: Path) -> None:
    """Raise FoldError naming the first field of `manifest` that breaks the schema."""
    try:
        error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(manifest))
    except RecursionError:
        raise FoldError(f"load: {where} is nested too deeply to be a manifest.") from None
    if error is not None:
        field = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        message = error.message if len(error.message) < 200 else error.message[:200] + "..."
        raise FoldError(f"load: {where} is malformed at {field}: {message}.")


def canonical_sha256(manifest: dict[str, Any]) -> str:
    """Digest of the manifest without its weights checksum (stored in the weights' header,
    which the weights checksum covers: an edited manifest or weights file is caught)."""
    core = {k: v for k, v in manifest.items() if k != "weights_sha256"}
    text = json.dumps(core, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def file_tensors(file: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """({name: {"shape", "dtype"}}, metadata) from a safetensors header, without the data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {}
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                piece = fh.get_slice(name)
                code = piece.get_dtype()
                if code not in SAFETENSORS_DTYPES:
                    raise FoldError(f"load: {file} holds {name!r} as {code}, which modelfold "
                                    "does not load.")
                tensors[name] = {"shape": list(piece.get_shape()),
                                 "dtype": SAFETENSORS_DTYPES[code]}
    except SafetensorError as exc:
        raise FoldError(f"load: {file} is not a readable safetensors file ({exc}).") from exc
    return tensors, metadata


def check_tensors_match_file(declared: dict[str, Any], stored: dict[str, Any], where: Path
                             ) -> None:
    """Every tensor in the file is declared with exactly its shape and dtype. Declared names
    missing from the file must be tied aliases (checked when the weights are loaded)."""
    unknown = sorted(set(stored) - set(declared))
    if unknown:
        raise FoldError(f"load: {where} holds tensors its manifest does not list: {unknown[:5]}.")
    for name, info in stored.items():
        if declared[name] != info:
            raise FoldError(f"load: the manifest records {name!r} as {declared[name]['dtype']} "
                            f"{declared[name]['shape']}, but {where} holds {info['dtype']} "
                            f"{info['shape']}.")


def check_module_attrs(model: nn.Module, attrs: dict[str, dict[str, Any]], where: Path) -> None:
    """The shape attributes a manifest set agree with the tensors they describe."""
    modules = dict(model.named_modules())
    for name in attrs:
        problem = _inconsistency(modules[name])
        if problem:
            raise FoldError(f"load: the manifest in {where} sets attributes of {name!r} that do "
                            f"not fit its tensors ({problem}).")


def _inconsistency(m: nn.Module) -> str | None:
    from modelfold.graph.handlers import find_attention_handler, head_count_attrs

    if isinstance(m, nn.modules.conv._ConvNd):
        w = m.weight.shape
        if m.groups < 1 or m.in_channels % m.groups or m.out_channels % m.groups:
            return f"groups={m.groups} does not divide the channels"
        expect = ((m.in_channels, m.out_channels // m.groups) if m.transposed
                  else (m.out_channels, m.in_channels // m.groups))
        return None if tuple(w[:2]) == expect else f"weight {list(w)} vs channels {expect}"
    if isinstance(m, nn.Linear):
        expect = (m.out_features, m.in_features)
        return None if tuple(m.weight.shape) == expect else f"weight {list(m.weight.shape)}"
    if isinstance(m, nn.modules.batchnorm._NormBase):
        sizes = {t.shape[0] for t in (m.weight, m.running_mean) if t is not None}
        return None if sizes <= {m.num_features} else f"num_features={m.num_features}"
    if isinstance(m, nn.LayerNorm):
        ok = m.weight is None or tuple(m.weight.shape) == tuple(m.normalized_shape)
        return None if ok else f"normalized_shape={list(m.normalized_shape)}"
    if isinstance(m, nn.GroupNorm):
        ok = m.num_groups >= 1 and m.num_channels % m.num_groups == 0 and (
            m.weight is None or m.weight.shape[0] == m.num_channels)
        return None if ok else f"num_channels={m.num_channels}, num_groups={m.num_groups}"
    if isinstance(m, nn.Embedding):
        expect = (m.num_embeddings, m.embedding_dim)
        return None if tuple(m.weight.shape) == expect else f"weight {list(m.weight.shape)}"
    if isinstance(m, nn.PReLU):
        ok = m.num_parameters == m.weight.numel()
        return None if ok else f"num_parameters={m.num_parameters}"
    heads = sorted(a for a in head_count_attrs() if hasattr(m, a))
    if heads and find_attention_handler(m) is None:
        return f"{heads[0]} x head size does not match the projections"
    return None


def check_finite(model: nn.Module, where: Path) -> None:
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FoldError(f"load: {where} holds non-finite values (NaN or inf) in {name!r}; "
                            "modelfold refuses such weights, as `fold` does.")
