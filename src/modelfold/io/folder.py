"""A saved model is a folder: `model.safetensors` + `modelfold.json`.

The manifest names a factory (a callable that builds the *unfolded* architecture), the shape
attributes folding changed on each module and every tensor's shape and dtype. Loading builds the
factory's model, shrinks its modules to the saved shapes and loads the weights, so no class is
ever unpickled (timm's pruned-model manifests work the same way).

What is trusted (see `modelfold.io.trust`): only modelfold's zoo and factories registered with
`register_factory` are built from a manifest, unless the caller passes `trust_factory=True`.
Integrity: the weights' SHA-256 is in the manifest and the manifest's SHA-256 in the weights'
safetensors header, so editing either file is caught; shapes and dtypes must match the file,
module attributes must fit the tensors, and non-finite weights are refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from modelfold.errors import FoldError
from modelfold.files import (
    FORMAT,
    HF_FORMAT,
    MANIFEST,
    WEIGHTS,
    atomic_folder,
    interrupted_copy,
    read_json,
    sha256_file,
)
from modelfold.io import manifest as schema
from modelfold.io.hf import is_hf_model, load_hf, save_hf
from modelfold.io.trust import (
    FACTORY_FN_ATTR,
    call_factory,
    is_importable_target,
    is_trusted,
    resolve_factory,
    target_of,
)
from modelfold.record import (
    FACTORY_ATTR,
    RECORD_ATTR,
    FoldRecord,
    GroupInfo,
    changed_attrs,
    get_record,
    simple_attrs,
)
from modelfold.version import __version__

FORMAT_VERSION = 2
DIGEST_KEY = "modelfold_manifest_sha256"  # safetensors header metadata


def factory_spec(factory: str | Callable[..., nn.Module], kwargs: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """{"target": "pkg.module:callable", "kwargs": {...}} for a callable or its dotted path."""
    if callable(factory):
        target = target_of(factory)
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
    the model was created by `modelfold.zoo` (or loaded, or folded from such a model), else the
    model's class called without arguments. Before writing, the factory is run once to check
    that the saved folder can be loaded back. Hugging Face LLMs are written as a Hugging Face
    folder (with `tokenizer` when given) that `from_pretrained` loads; see `modelfold.io.hf`.

    An existing folder at `path` is replaced only if it is a modelfold folder holding nothing
    else; a symbolic link is followed. See `modelfold.files` for the guarantees.
    """
    if not isinstance(model, nn.Module):
        raise FoldError(f"save: expected an nn.Module, got {type(model).__name__}.")
    path = Path(path)
    if is_hf_model(model):
        return save_hf(model, path, tokenizer=tokenizer)
    record = get_record(model)
    spec, build = _save_factory(model, record, factory, factory_kwargs)
    try:
        json.dumps(spec, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise FoldError(f"save: factory arguments must be JSON-serialisable ({exc}).") from exc
    state = model.state_dict(keep_vars=True)
    tensors = {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
               for name, t in state.items()}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "modelfold_version": __version__,
        "torch_version": torch.__version__,
        "factory": spec,
        "tensors": tensors,
        "record": _record_to_dict(record) if record is not None else None,
    }
    _check_loadable(model, build(), manifest)
    with atomic_folder(path) as tmp:
        weights = tmp / WEIGHTS
        try:
            save_model(model, str(weights),
                       metadata={DIGEST_KEY: schema.canonical_sha256(manifest)})
        except SafetensorError as exc:
            raise FoldError(f"save: writing {path / WEIGHTS} failed ({exc}); is the disk full? "
                            "The previous contents are unchanged.") from exc
        manifest["weights_sha256"] = sha256_file(weights)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if not is_trusted(spec["target"]):
        warnings.warn(
            f"save: {path} names the factory {spec['target']!r}; modelfold.load will build it "
            "only where it is registered (@modelfold.register_factory) or with "
            "trust_factory=True.", stacklevel=2)
    return path


def build_from_factory(spec: dict[str, Any], where: str | Path, *, trust: bool = False
                       ) -> nn.Module:
    """Build the architecture `spec` names (see `modelfold.io.trust`); the model remembers its
    factory so that `save` can rebuild it. `trust=True` for a factory the user named."""
    fn = resolve_factory(spec, str(where), trust=trust)
    model = call_factory(fn, spec, str(where))
    setattr(model, FACTORY_ATTR, spec)
    setattr(model, FACTORY_FN_ATTR, fn)
    return model


def _save_factory(model: nn.Module, record: FoldRecord | None,
                  factory: str | Callable[..., nn.Module] | None,
                  kwargs: dict[str, Any] | None) -> tuple[dict[str, Any], Callable[[], nn.Module]]:
    """The factory spec to write and a builder for the unfolded architecture.

    A factory the caller names here is trusted (it is their code); one remembered on the model
    is re-used as the callable it came from, or resolved only if zoo/registered."""
    if factory is not None:
        spec = factory_spec(factory, kwargs)
        fn = factory if callable(factory) else resolve_factory(spec, "save", trust=True)
    else:
        remembered = (record.factory if record is not None and record.factory is not None
                      else getattr(model, FACTORY_ATTR, None))
        if remembered is not None:
            spec = remembered
            fn = getattr(model, FACTORY_FN_ATTR, None)
            if fn is None or target_of(fn) != spec["target"]:
                fn = resolve_factory(spec, "save: the model's recorded factory")
        else:
            fn = type(model)
            spec = factory_spec(fn, kwargs)
    if not is_importable_target(spec["target"]) and not is_trusted(spec["target"]):
        raise FoldError(
            f"save: the architecture would be rebuilt by {spec['target']!r}, which `load` in "
            "another process cannot import (defined in a script's __main__ or inside a "
            "function). Pass factory= a function in an importable module that builds the "
            "unfolded model (and factory_kwargs=), or register it with "
            "@modelfold.register_factory.")
    return spec, lambda: call_factory(fn, spec, "save")


def _check_loadable(model: nn.Module, fresh: nn.Module, manifest: dict[str, Any]) -> None:
    """Record the attributes folding changed, then shape a fresh factory model as load will:
    a folder that cannot be loaded back is never written."""
    where = Path("<save>")
    try:
        manifest["module_attrs"] = _attrs_against(fresh, model)
        _shape_like_manifest(fresh, manifest, where)
    except FoldError as exc:
        raise FoldError(
            f"save: the factory {manifest['factory']['target']!r} does not rebuild this model "
            f"({exc}). Pass factory= a callable that builds the unfolded architecture (an "
            "nn.Sequential or a class needing constructor arguments cannot be rebuilt from its "
            "class alone) and factory_kwargs= its arguments.") from None


def load(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
    trust_factory: bool = False,
) -> nn.Module:
    """Load a folder written by `save`; outputs are bit-identical to the saved model.

    The manifest's factory is built only if it is modelfold's zoo or registered with
    `register_factory`; `trust_factory=True` imports and runs any factory the manifest names
    (only for folders you trust). `model`: an unfolded instance of the architecture to load
    into instead (it is modified). The weights and the manifest are verified against each
    other's checksums, shapes, dtypes and attributes before anything is built.
    """
    path = Path(path)
    if not path.exists() and (copy := interrupted_copy(path)) is not None:
        warnings.warn(f"load: {path} is missing after an interrupted save; loading the previous "
                      f"version from {copy} (the next save to {path} restores it).",
                      stacklevel=2)
        path = copy
    manifest = read_manifest(path)
    if manifest["format"] == HF_FORMAT:
        return load_hf(path, manifest, device=device)
    weights = path / WEIGHTS
    _verify_checksums(path, manifest)
    stored, _ = schema.file_tensors(weights)
    schema.check_tensors_match_file(manifest["tensors"], stored, weights)
    spec = manifest["factory"]
    where = str(path / MANIFEST)
    fn = None if model is not None else resolve_factory(spec, where, trust=trust_factory)
    if fn is not None:  # shape a meta-device model first: nothing is allocated for bad sizes
        try:
            with torch.device("meta"):
                skeleton = fn(**spec["kwargs"])
        except Exception:  # factories that cannot build on meta are checked below
            skeleton = None
        if isinstance(skeleton, nn.Module):
            _shape_like_manifest(skeleton, manifest, path)
    base = model if model is not None else call_factory(fn, spec, where)
    _shape_like_manifest(base, manifest, path)
    try:
        missing, unexpected = load_model(base, str(weights), strict=False)
    except (SafetensorError, RuntimeError) as exc:
        raise FoldError(f"load: {weights} does not fit the model ({exc}).") from exc
    if missing or unexpected:
        raise FoldError(f"load: {weights} does not fit the model built by {spec['target']}: "
                        f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}.")
    schema.check_finite(base, weights)
    record = _record_from_dict(manifest["record"], base, path)
    trusted = fn is not None or is_trusted(spec["target"])
    if record is not None:
        if not trusted:
            record.factory = None  # never re-used by save unless the user trusts it
        setattr(base, RECORD_ATTR, record)
    if trusted:
        setattr(base, FACTORY_ATTR, spec)
        if fn is not None:
            setattr(base, FACTORY_FN_ATTR, fn)
    base.eval()
    return base.to(device) if device is not None else base


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise FoldError(f"load: {path} is not a folder written by modelfold.save.")
    if not manifest_path.is_file():
        raise FoldError(f"load: {manifest_path} is missing; {path} is not a modelfold folder.")
    manifest = read_json(manifest_path)
    if isinstance(manifest, dict) and manifest.get("format") == HF_FORMAT:
        return manifest
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FoldError(f"load: {manifest_path} is not a modelfold manifest.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FoldError(f"load: {manifest_path} has format version "
                        f"{manifest.get('format_version')!r}; this modelfold reads version "
                        f"{FORMAT_VERSION} (load it with the modelfold that wrote it and save "
                        "again).")
    schema.validate(manifest, manifest_path)
    return manifest


def _verify_checksums(path: Path, manifest: dict[str, Any]) -> None:
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FoldError(f"load: {weights} is missing.")
    if sha256_file(weights) != manifest["weights_sha256"]:
        raise FoldError(f"load: {weights} does not match the checksum in {path / MANIFEST}; the "
                        "file is truncated or was modified.")
    _, metadata = schema.file_tensors(weights)
    if metadata.get(DIGEST_KEY) != schema.canonical_sha256(manifest):
        raise FoldError(f"load: {path / MANIFEST} does not match the checksum stored with the "
                        "weights; the manifest was modified.")


def _shape_like_manifest(model: nn.Module, manifest: dict[str, Any], where: Path) -> None:
    """Set the recorded attributes, give every tensor its recorded shape, check both agree."""
    attrs = manifest["module_attrs"]
    _apply_attrs(model, attrs, where)
    _resize_tensors(model, manifest["tensors"], where)
    own = model.state_dict(keep_vars=True)
    missing = sorted(set(own) - set(manifest["tensors"]))
    if missing:
        raise FoldError(f"load: {where} lacks tensors the model has: {missing[:5]}.")
    schema.check_module_attrs(model, attrs, where)


def _apply_attrs(model: nn.Module, attrs: dict[str, dict[str, Any]], where: Path) -> None:
    modules = dict(model.named_modules())
    for name, changes in attrs.items():
        if name not in modules:
            raise FoldError(f"load: the manifest in {where} names module {name!r}, which the "
                            "factory's model does not have.")
        module = modules[name]
        for key, value in changes.items():
            old = getattr(module, key, None)
            if old is None or isinstance(old, bool) or not isinstance(old, (int, tuple, list)):
                raise FoldError(f"load: the manifest in {where} sets {name}.{key}, which is not "
                                "a shape attribute of that module.")
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


def _attrs_against(fresh: nn.Module, model: nn.Module) -> dict[str, dict[str, Any]]:
    """Shape attributes that differ from the factory's fresh model (all folds so far)."""
    before = {name: simple_attrs(m) for name, m in fresh.named_modules()}
    missing = [name for name, _ in model.named_modules() if name not in before]
    if missing:
        raise FoldError(f"its model has no module {missing[0]!r}")
    changed = changed_attrs(before, model)
    outside = {f"{name}.{key}" for name, diff in changed.items() for key in diff
               if key not in schema.SHAPE_ATTRS}
    if outside:
        raise FoldError(f"attributes {sorted(outside)[:5]} differ from the factory's model, "
                        "and a manifest records only shape attributes")
    return changed


def _record_to_dict(record: FoldRecord) -> dict[str, Any]:
    return dataclasses.asdict(record)


def _record_from_dict(data: dict[str, Any] | None, model: nn.Module, where: Path
                      ) -> FoldRecord | None:
    if data is None:
        return None
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if data["params_after"] != params or data["params_before"] < params:
        raise FoldError(f"load: the fold record in {where / MANIFEST} claims "
                        f"{data['params_before']:,} -> {data['params_after']:,} parameters, but "
                        f"the model has {params:,}.")
    data = dict(data)
    data["groups"] = [GroupInfo(**g) for g in data["groups"]]
    return FoldRecord(**data)
