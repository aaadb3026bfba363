"""Registry of decoder-only LLM architectures that `fold` knows how to compress.

An architecture says where the decoder layers are and which projections form a layer's MLP
(SwiGLU: gate/up producers, down consumer) and attention (q/k/v producers, o consumer).
Dispatch is first-match-wins on the Hugging Face `config.model_type`; unknown models get an
error listing the supported ones. Register more with `register_architecture`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelfold.errors import FoldError


@dataclass(frozen=True)
class DecoderArchitecture:
    name: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    attention: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def mlp_linears(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        mlp = layer.get_submodule(self.mlp)
        return getattr(mlp, self.gate), getattr(mlp, self.up), getattr(mlp, self.down)

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attention)


_REGISTRY: list[DecoderArchitecture] = [
    DecoderArchitecture("llama", ("llama",)),
    DecoderArchitecture("qwen2", ("qwen2",)),  # q/k/v biases
    DecoderArchitecture("mistral", ("mistral",)),
]


def register_architecture(arch: DecoderArchitecture) -> None:
    """Add an architecture; registered ones are tried before the built-in ones."""
    _REGISTRY.insert(0, arch)


def supported_model_types() -> list[str]:
    return sorted({t for a in _REGISTRY for t in a.model_types})


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face model (it has a `config` with a `model_type`)."""
    return getattr(getattr(model, "config", None), "model_type", None) is not None


def architecture_of(model: nn.Module) -> DecoderArchitecture:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in _REGISTRY:
        if model_type in arch.model_types:
            try:
                arch.layers(model)
            except AttributeError as exc:
                raise FoldError(f"{type(model).__name__} (model_type {model_type!r}) has no "
                                f"`{arch.layers_path}`; pass the *ForCausalLM model.") from exc
            return arch
    raise FoldError(f"no LLM handler for {type(model).__name__} (model_type {model_type!r}); "
                    f"supported model types: {supported_model_types()}.")


def saved_dtype(config: Any) -> torch.dtype:
    """The dtype a Hugging Face config records (bf16 stays bf16); float32 when it has none."""
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype):
        raise FoldError(f"the config records dtype {getattr(config, 'dtype', None)!r}, which is "
                        "not a torch dtype.")
    return dtype
