"""Fold a Hugging Face LLM checkpoint folder without ever holding the whole model in memory.

`fold_checkpoint(src, out, ratio=...)` reads the config, builds the model on the meta device (a
skeleton: module tree and shapes, no storage), plans every layer's new shape from shapes alone,
then for each decoder layer: reads that layer's tensors from the safetensors shards
(`safe_open`, tensor by tensor), folds it (optionally on a GPU), writes it to its own output
shard and drops it. The other tensors (embeddings, final norm, untied head) are copied through
one at a time into one shard. Peak memory is therefore about one decoder layer plus the largest
non-layer tensor group, whatever the model size (`benchmarks/llm_streaming.py` measures it).

Folds that run the model (the self-calibrated recipe: self-generated text, activation
clustering, sensitivity allocation, refit) or read every layer first (inertia allocation) stream
too. The model is then built with real embeddings, norm, head and rotary tables and meta decoder
layers; a layer's weights are read in only while it runs: during generation of the calibration
text every layer call reads the layer and drops it after, and the calibration passes keep the
hidden states of the text, one layer at a time. The result equals the in-memory fold exactly.

The output folder is what `modelfold.save` writes for an in-memory fold: config (uniform shapes
in the config, per-layer ones in `modelfold_layers` and `block_configs`), a
`model.safetensors.index.json`, the tokenizer files of `src`, and `modelfold.json` with
per-layer shapes and per-shard SHA-256, so
`modelfold.load(out)` (any shapes) or `AutoModelForCausalLM.from_pretrained(out)` (uniform
shapes) loads it, with outputs identical to folding the loaded model in memory. Written
atomically: an interrupted run leaves no partial folder.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from modelfold.config import FoldConfig, resolve_config
from modelfold.errors import FoldError
from modelfold.files import atomic_folder, write_hf_manifest
from modelfold.llm.architectures import architecture_of, saved_dtype
from modelfold.llm.config import LLM_ALLOCATIONS, LLMFoldConfig
from modelfold.llm.fold import (
    LLMFoldContext,
    plan_layers,
    selector_from_context,
    self_calibrated,
    set_config_shapes,
    shrink_layer,
)
from modelfold.record import LLMFoldRecord

INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                    "generation_config.json", "chat_template.jinja")


def checkpoint_index(src: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index or the single `model.safetensors`."""
    from safetensors import safe_open

    index = src / INDEX
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FoldError(f"{index} is not a safetensors index ({exc}).") from exc
    single = src / "model.safetensors"
    if not single.is_file():
        raise FoldError(f"{src} holds neither {INDEX} nor model.safetensors; save the model "
                        "with save_pretrained(..., safe_serialization=True).")
    with safe_open(str(single), framework="pt") as fh:
        return dict.fromkeys(fh.keys(), single.name)


class _ShardReader:
    """Reads tensors by name, keeping one shard open at a time."""

    def __init__(self, src: Path, index: dict[str, str]) -> None:
        self.src, self.index = src, index
        self._name: str | None = None
        self._handle: Any = None

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        shard = self.index[name]
        if shard != self._name:
            self.close()
            self._handle = safe_open(str(self.src / shard), framework="pt").__enter__()
            self._name = shard
        return self._handle.get_tensor(name)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle, self._name = None, None


def fold_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    ratio: float | None = None,
    target_sparsity: float | None = None,
    recipe: str | Mapping[str, Mapping[Any, float]] | None = None,
    parts: Iterable[str] | None = None,
    config: LLMFoldConfig | FoldConfig | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
) -> LLMFoldRecord:
    """Fold the checkpoint folder `src` into the folder `out`, one decoder layer at a time.

    Same arguments and result as `modelfold.fold` on the loaded model followed by
    `modelfold.save` (the keywords override the fields of `config`); `device` is where each
    layer is folded (e.g. "cuda"). Returns the fold record (shapes, ratios, parameter counts).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise FoldError(f"{src} is not a Hugging Face model folder (no config.json).")
    if src.resolve() == out.resolve():
        raise FoldError("`out` must differ from `src`: the source shards are read while the "
                        "folded ones are written.")
    if isinstance(config, FoldConfig):
        config = LLMFoldConfig.from_fold_config(config)
    config = resolve_config(LLMFoldConfig, config, ratio=ratio, target_sparsity=target_sparsity,
                            recipe=recipe, seed=seed, parts=parts)
    index = checkpoint_index(src)
    hf_config = AutoConfig.from_pretrained(src)
    reader = _ShardReader(src, index)
    weight_map: dict[str, str] = {}
    sizes = [0, 0]  # elements, bytes written
    try:
        if self_calibrated(config):  # the model runs: real embeddings, head, rotary tables
            skeleton = _runnable_skeleton(src, hf_config, reader, device)
        else:
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(hf_config,
                                                            dtype=saved_dtype(hf_config))
        arch = architecture_of(skeleton)
        layers = _StreamedLayers(skeleton, arch, reader, device)
        context = LLMFoldContext(skeleton, config, resident=layers.resident)
        if self_calibrated(config):
            with layers.loaded_on_call():  # generation runs the whole model, layer by layer
                context.tokens  # noqa: B018
        selector = selector_from_context(context)
        plan = plan_layers(skeleton, arch, ratio=config.ratio,
                           target_sparsity=config.target_sparsity, parts=config.parts,
                           recipe=config.recipe, tolerance=config.sparsity_tolerance,
                           round_to=config.round_to)
        plan = LLM_ALLOCATIONS.get(config.allocation).fn(context, plan)
        stepper = getattr(selector, "stepper", None)  # calibrated: hidden states layer by layer
        with atomic_folder(out) as tmp:
            for i, layer in enumerate(layers.modules):
                prefix = f"{arch.layers_path}.{i}."
                with layers.resident(i):
                    with torch.no_grad():
                        shrink_layer(arch, layer, i, selector, plan.shapes[i],
                                     plan.new_shapes[i], device)
                        if stepper is not None:
                            stepper.advance_past(i)
                    tensors = {prefix + k: v.detach().to("cpu").contiguous()
                               for k, v in layer.state_dict().items()}
                    shard = f"model-layer-{i:05d}.safetensors"
                    _write_shard(tmp / shard, tensors, weight_map, sizes)
                    del tensors
            rest = [n for n in index if not n.startswith(f"{arch.layers_path}.")]
            _write_shard(tmp / "model-rest.safetensors",
                         {n: reader.get(n).contiguous() for n in rest}, weight_map, sizes)
            written, total_bytes = sizes
            if written != plan.params_after:
                raise FoldError(f"fold_checkpoint: {written} parameters written, "
                                f"{plan.params_after} expected from the config; the checkpoint "
                                "does not match its config.")
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total_bytes},
                                                 "weight_map": weight_map}, indent=1))
            set_config_shapes(skeleton, plan.new_shapes)
            skeleton.config.save_pretrained(tmp)
            for name in _TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
            record = plan.record("fold", arch, {**config.to_dict(), "streamed": True})
            write_hf_manifest(tmp, [s.__dict__ for s in plan.new_shapes], record)
    finally:
        reader.close()
    return record


class _StreamedLayers:
    """The decoder layers of a skeleton whose weights live in the checkpoint: `resident(i)`
    reads layer i's tensors in (unless it already holds them) and drops them afterwards;
    `loaded_on_call()` does the same around every call of a layer (for generation)."""

    def __init__(self, model: torch.nn.Module, arch, reader: _ShardReader,
                 device: str | torch.device | None) -> None:
        self.arch, self.reader, self.device = arch, reader, device
        self.modules = arch.layers(model)

    def _load(self, i: int) -> bool:
        layer = self.modules[i]
        if not any(t.device.type == "meta" for t in layer.parameters()):
            return False
        prefix = f"{self.arch.layers_path}.{i}."
        state = {n[len(prefix):]: self.reader.get(n) for n in self.reader.index
                 if n.startswith(prefix)}
        layer.load_state_dict(state, strict=True, assign=True)
        del state
        _check_materialised(layer, prefix)
        if self.device is not None:
            layer.to(self.device)
        return True

    def _drop(self, i: int, trim: bool = True) -> None:
        self.modules[i].to("meta")
        if trim:
            release_freed_memory()

    @contextlib.contextmanager
    def resident(self, i: int):
        loaded = self._load(i)
        try:
            yield self.modules[i]
        finally:
            if loaded:
                self._drop(i)

    @contextlib.contextmanager
    def loaded_on_call(self):
        handles, layer_loaded = [], {}
        for i, layer in enumerate(self.modules):
            def before(_module, _args, i=i):
                layer_loaded[i] = self._load(i)

            def after(_module, _args, _out, i=i):
                if layer_loaded.pop(i, False):
                    # no trim per call: the next layer reuses the freed pages right away
                    self._drop(i, trim=False)

            handles += [layer.register_forward_pre_hook(before),
                        layer.register_forward_hook(after)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            release_freed_memory()


def _runnable_skeleton(src: Path, hf_config: Any, reader: _ShardReader,
                       device: str | torch.device | None) -> torch.nn.Module:
    """The model of `src` with real embeddings, final norm, head and rotary tables (read from
    the checkpoint, or computed by the model's own constructor) and decoder layers on the meta
    device: a model that runs once each layer is read in."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    dtype = saved_dtype(hf_config)
    outer_config = copy.deepcopy(hf_config)
    outer_config.num_hidden_layers = 0  # everything but the decoder layers, built for real
    if isinstance(getattr(outer_config, "layer_types", None), list):
        # one of each kind: per-kind tables (Gemma 3's sliding / full rotary) are still built
        outer_config.layer_types = list(dict.fromkeys(outer_config.layer_types))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(outer_config, dtype=dtype)
        skeleton = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    arch = architecture_of(skeleton)
    layer_prefix = f"{arch.layers_path}."
    rest = {n: reader.get(n) for n in reader.index if not n.startswith(layer_prefix)}
    _, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    del rest
    if unexpected:
        raise FoldError(f"fold_checkpoint: {src} holds tensors the model does not have: "
                        f"{unexpected[:5]}.")
    model.tie_weights()
    absent = [n for n, t in model.named_parameters() if t.device.type == "meta"]
    if absent:
        raise FoldError(f"fold_checkpoint: {absent[:5]} are not in the checkpoint {src}.")
    # buffers that are not in the checkpoint (rotary tables): from the model's own constructor,
    # run on a copy with a one-token vocabulary so that no real embedding is allocated
    tiny_config = copy.deepcopy(outer_config)
    tiny_config.vocab_size, tiny_config.pad_token_id = 1, None
    tiny = AutoModelForCausalLM.from_config(tiny_config, dtype=dtype)
    computed = dict(tiny.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.device.type == "meta":
            if name not in computed:
                raise FoldError(f"fold_checkpoint: buffer {name} is neither in {src} nor "
                                "computed by the model's constructor.")
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = computed[name]
    if device is not None:
        model.to(device)
    parent, _, name = arch.layers_path.rpartition(".")
    setattr(model.get_submodule(parent), name, arch.layers(skeleton))
    for module in model.modules():  # the full config from now on (layer count, layer types)
        if getattr(module, "config", None) is outer_config:
            module.config = skeleton.config
    if (src / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(src)
    return model.eval()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Written by hand (ctypes, a few lines) because no maintained package exposes it: without
    it glibc keeps the fragments of every folded layer's temporaries and the RSS of a streamed
    fold creeps up by tens of MB per layer (measured: 0.78 -> 1.05 GB over 12 layers of a
    0.15 B model; flat at 0.43 GB with it)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (e.g. musl)
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], weight_map: dict[str, str],
                 sizes: list[int]) -> None:
    """Write `tensors` as one safetensors shard, index them and add their element and byte
    counts to `sizes`."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, path.name))
    sizes[0] += sum(t.numel() for t in tensors.values())
    sizes[1] += sum(t.numel() * t.element_size() for t in tensors.values())


def _check_materialised(layer: torch.nn.Module, prefix: str) -> None:
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        if t.device.type == "meta":
            raise FoldError(f"fold_checkpoint: {prefix}{name} is not in the checkpoint; this "
                            "layer layout is not supported for streaming. Load the model and "
                            "use modelfold.fold instead.")
