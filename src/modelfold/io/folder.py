"""A saved model is a folder: `model.safetensors` + `modelfold.json`.

The manifest names a factory (an importable callable that builds the *unfolded* architecture),
the attributes folding changed on each module, every tensor's shape and the weights' SHA-256.
Loading builds the factory's model, shrinks its modules to the saved shapes and loads the
weights, so no class is ever unpickled (timm's pruned-model manifests work the same way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from modelfold.errors import FoldError
from modelfold.io.hf import HF_FORMAT, is_hf_model, load_hf, save_hf
from modelfold.record import (
    FACTORY_ATTR,
    RECORD_ATTR,
    FoldRecord,
    GroupInfo,
    changed_attrs,
    get_record,
    simple_attrs,
)

FORMAT = "modelfold"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "modelfold.json"


def factory_spec(factory: str | Callable[..., nn.Module], kwargs: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """{"target": "pkg.module:callable", "kwargs": {...}} for a callable or its dotted path."""
    if callable(factory):
        target = f"{factory.__module__}:{factory.__qualname__}"
    elif isinstance(factory, str) and ":" in factory:
        target = factory
    else:
        raise FoldError(f"factory {factory!r} must be a callable or 'package.module:callable'.")
    return {"target": target, "kwargs": dict(kwargs or {})}


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    factory_kwargs: dict[str, Any] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write `model` (folded or not) to the folder `path`, atomically.

    `factory` builds the unfolded architecture at load time; by default the one recorded when
    the model was created by `modelfold.zoo` or folded from such a model, else the model's class
    called without arguments. Hugging Face LLMs are written as a Hugging Face folder (with
    `tokenizer` when given) that `from_pretrained` loads; see `modelfold.io.hf`.
    """
    if not isinstance(model, nn.Module):
        raise FoldError(f"save: expected an nn.Module, got {type(model).__name__}.")
    path = Path(path)
    if is_hf_model(model):
        return save_hf(model, path, tokenizer=tokenizer)
    record = get_record(model)
    if factory is not None:
        spec = factory_spec(factory, factory_kwargs)
    elif record is not None and record.factory is not None:
        spec = record.factory
    elif getattr(model, FACTORY_ATTR, None) is not None:
        spec = getattr(model, FACTORY_ATTR)
    else:
        spec = factory_spec(type(model), factory_kwargs)
    try:
        json.dumps(spec)
    except TypeError as exc:
        raise FoldError(f"save: factory arguments must be JSON-serialisable ({exc}).") from exc
    tensors = {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
               for name, t in model.state_dict(keep_vars=True).items()}
    with atomic_folder(path) as tmp:
        weights = tmp / WEIGHTS
        save_model(model, str(weights))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "modelfold_version": _version(),
            "torch_version": torch.__version__,
            "factory": spec,
            "tensors": tensors,
            "weights_sha256": _sha256(weights),
            "record": _record_to_dict(record) if record is not None else None,
            "module_attrs": _attrs_against_factory(model, spec, record),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path` to write into; when the block succeeds it replaces
    `path` in one rename (see `_replace_dir`), when it fails it is removed."""
    parent = path.parent
    if path.exists() and not path.is_dir():
        raise FoldError(f"save: {path} is a file; give a folder path.")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise FoldError(f"save: cannot write to {parent} ({exc.strerror}).") from exc
    try:
        yield tmp
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Load a folder written by `save`; outputs are bit-identical to the saved model.

    `model`: an instance of the unfolded architecture to load into (it is modified), for models
    whose factory cannot be imported. Weights are verified against the manifest's checksum.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest["format"] == HF_FORMAT:
        return load_hf(path, manifest, device=device)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FoldError(f"load: {weights} is missing.")
    if _sha256(weights) != manifest["weights_sha256"]:
        raise FoldError(f"load: {weights} does not match the checksum in {path / MANIFEST}; the "
                        "file is truncated or was modified.")
    base = model if model is not None else build_from_factory(manifest["factory"], path)
    try:
        record = _record_from_dict(manifest["record"]) if manifest["record"] else None
        _apply_attrs(base, manifest["module_attrs"], path)
        _resize_tensors(base, manifest["tensors"], path)
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        if isinstance(exc, FoldError):
            raise
        raise FoldError(f"load: {path / MANIFEST} is malformed ({type(exc).__name__}: "
                        f"{exc}).") from exc
    try:
        missing, unexpected = load_model(base, str(weights), strict=False)
    except (SafetensorError, RuntimeError) as exc:
        raise FoldError(f"load: {weights} does not fit the model ({exc}).") from exc
    if missing or unexpected:
        raise FoldError(f"load: {weights} does not fit the model built by "
                        f"{manifest['factory']['target']}: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}.")
    if record is not None:
        setattr(base, RECORD_ATTR, record)
    setattr(base, FACTORY_ATTR, manifest["factory"])
    base.eval()
    return base.to(device) if device is not None else base


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise FoldError(f"load: {path} is not a folder written by modelfold.save.")
    if not manifest_path.is_file():
        raise FoldError(f"load: {manifest_path} is missing; {path} is not a modelfold folder.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FoldError(f"load: {manifest_path} is not valid JSON ({exc}).") from exc
    if isinstance(manifest, dict) and manifest.get("format") == HF_FORMAT:
        return manifest
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FoldError(f"load: {manifest_path} is not a modelfold manifest.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FoldError(f"load: {manifest_path} has format version "
                        f"{manifest.get('format_version')}; this modelfold reads version "
                        f"{FORMAT_VERSION}.")
    for key, kind in (("factory", dict), ("tensors", dict), ("weights_sha256", str),
                      ("record", (dict, type(None))), ("module_attrs", dict)):
        if not isinstance(manifest.get(key), kind):
            raise FoldError(f"load: {manifest_path} lacks the field {key!r} or it is malformed.")
    if not isinstance(manifest["factory"].get("target"), str):
        raise FoldError(f"load: {manifest_path} names no factory target.")
    return manifest


def build_from_factory(spec: dict[str, Any], where: Path) -> nn.Module:
    target = spec.get("target", "")
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        model = obj(**spec.get("kwargs", {}))
    except Exception as exc:
        raise FoldError(
            f"load: cannot build the architecture with factory {target!r} from {where} "
            f"({type(exc).__name__}: {exc}). Pass `model=` an unfolded instance instead."
        ) from exc
    if not isinstance(model, nn.Module):
        raise FoldError(f"load: factory {target!r} returned {type(model).__name__}, not a model.")
    return model


def _apply_attrs(model: nn.Module, attrs: dict[str, dict[str, Any]], where: Path) -> None:
    modules = dict(model.named_modules())
    for name, changes in attrs.items():
        if name not in modules:
            raise FoldError(f"load: the manifest in {where} names module {name!r}, which the "
                            "factory's model does not have.")
        module = modules[name]
        for key, value in changes.items():
            old = getattr(module, key, None)
            setattr(module, key, tuple(value) if isinstance(old, tuple) else value)


def _resize_tensors(model: nn.Module, tensors: dict[str, Any], where: Path) -> None:
    """Give every parameter and buffer the saved shape (values are loaded afterwards)."""
    own = model.state_dict(keep_vars=True)
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise FoldError(f"load: {where} holds tensors the model does not have: {unknown[:5]}.")
    resized: dict[int, torch.Tensor] = {}
    for name, info in tensors.items():
        current = own[name]
        shape = tuple(info["shape"])
        dtype = getattr(torch, info["dtype"])
        if tuple(current.shape) == shape and current.dtype == dtype:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if id(current) in resized:  # tied weights stay tied
            setattr(owner, leaf, resized[id(current)])
            continue
        fresh = torch.empty(shape, dtype=dtype, device=current.device)
        if isinstance(current, nn.Parameter):
            new: torch.Tensor = nn.Parameter(fresh, requires_grad=current.requires_grad)
            setattr(owner, leaf, new)
        else:
            owner._buffers[leaf] = fresh
            new = fresh
        resized[id(current)] = new


def _attrs_against_factory(model: nn.Module, spec: dict[str, Any],
                           record: FoldRecord | None) -> dict[str, dict[str, Any]]:
    """Attributes that differ from the factory's fresh model (all folds so far, not just one)."""
    try:
        fresh = build_from_factory(spec, Path("<save>"))
    except FoldError:
        return dict(record.module_attrs) if record is not None else {}
    before = {name: simple_attrs(m) for name, m in fresh.named_modules()}
    return changed_attrs(before, model)


def _record_to_dict(record: FoldRecord) -> dict[str, Any]:
    return dataclasses.asdict(record)


def _record_from_dict(data: dict[str, Any]) -> FoldRecord:
    data = dict(data)
    data["groups"] = [GroupInfo(**g) for g in data["groups"]]
    return FoldRecord(**data)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move a finished folder into place; an existing folder is swapped out, not overwritten."""
    if path.exists():
        if not (path / MANIFEST).is_file() and any(path.iterdir()):
            raise FoldError(f"save: {path} exists and is not a modelfold folder; refusing to "
                            "replace it.")
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version() -> str:
    from modelfold import __version__

    return __version__
