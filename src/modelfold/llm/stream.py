"""Fold a Hugging Face LLM checkpoint folder without ever holding the whole model in memory.

`fold_checkpoint(src, out, ratio=...)` reads the config, builds the model on the meta device (a
skeleton: module tree and shapes, no storage), plans every layer's new shape from shapes alone,
then for each decoder layer: reads that layer's tensors from the safetensors shards
(`safe_open`, tensor by tensor), folds it (optionally on a GPU), writes it to its own output
shard and drops it. The other tensors (embeddings, final norm, untied head) are copied through
one at a time into one shard. Peak memory is therefore about one decoder layer plus the largest
non-layer tensor group, whatever the model size (`benchmarks/llm_streaming.py` measures it).

The output folder is what `modelfold.save` writes for an in-memory fold: config (uniform shapes
in the config, per-layer ones in `modelfold_layers`), a `model.safetensors.index.json`, the
tokenizer files of `src`, and `modelfold.json` with per-layer shapes and per-shard SHA-256, so
`modelfold.load(out)` (any shapes) or `AutoModelForCausalLM.from_pretrained(out)` (uniform
shapes) loads it, with outputs identical to folding the loaded model in memory. Written
atomically: an interrupted run leaves no partial folder.
"""

from __future__ import annotations

import contextlib
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
from modelfold.llm.config import LLMFoldConfig
from modelfold.llm.fold import (
    calibrated_options,
    fold_selector_from_config,
    plan_layers,
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
    if config.repair != "none" or self_calibrated(config):
        options = calibrated_options(config) or f"repair={config.repair!r}"
        raise FoldError(f"fold_checkpoint: {options} run(s) the whole model; load the model "
                        "and use modelfold.fold instead.")
    if config.allocation != "uniform":
        raise FoldError(f"fold_checkpoint: allocation={config.allocation!r} reads every "
                        "layer before folding; load the model and use modelfold.fold instead.")
    index = checkpoint_index(src)
    hf_config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config, dtype=saved_dtype(hf_config))
    arch = architecture_of(skeleton)
    plan = plan_layers(skeleton, arch, ratio=config.ratio,
                       target_sparsity=config.target_sparsity, parts=config.parts,
                       recipe=config.recipe, tolerance=config.sparsity_tolerance,
                       round_to=config.round_to)
    selector = fold_selector_from_config(config)
    layers = arch.layers(skeleton)
    reader = _ShardReader(src, index)
    weight_map: dict[str, str] = {}
    sizes = [0, 0]  # elements, bytes written
    try:
        with atomic_folder(out) as tmp:
            for i, layer in enumerate(layers):
                prefix = f"{arch.layers_path}.{i}."
                names = [n for n in index if n.startswith(prefix)]
                state = {n[len(prefix):]: reader.get(n) for n in names}
                layer.load_state_dict(state, strict=True, assign=True)
                del state
                _check_materialised(layer, prefix)
                if device is not None:
                    layer.to(device)
                with torch.no_grad():
                    shrink_layer(arch, layer, i, selector, plan.shapes[i], plan.new_shapes[i],
                                 device)
                tensors = {prefix + k: v.detach().to("cpu").contiguous()
                           for k, v in layer.state_dict().items()}
                shard = f"model-layer-{i:05d}.safetensors"
                _write_shard(tmp / shard, tensors, weight_map, sizes)
                del tensors
                layers[i] = layer.to("meta")  # drop the weights
                release_freed_memory()
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
