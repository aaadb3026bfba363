"""Registry of decoder-only LLM architectures that `fold` knows how to compress.

An architecture says where the decoder layers are and which projections form a layer's MLP
(gated: gate/up producers, down consumer; the activation is the MLP's `act_fn`, SiLU for
SwiGLU, GELU-tanh for Gemma's GeGLU) and attention (q/k/v producers, o consumer), and which
norms surround the MLP: `pre_mlp_norm` receives the residual stream and produces the MLP input
(Llama's `post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`); `post_mlp_norm`, when
set (Gemma's `post_feedforward_layernorm`), normalises the MLP output before the residual add:
    Llama: h = r + mlp(norm(r))       Gemma: h = r + post_norm(mlp(pre_norm(r)))
`post_attention_norm`, when set (Gemma's `post_attention_layernorm`), does the same to the
attention output (on Llama that name is the pre-MLP norm: there is no post-attention norm).
Head folding keeps whole `head_dim` blocks, so per-head norms shared by all heads (Gemma's
q_norm / k_norm, of size head_dim) stay valid.
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
    pre_mlp_norm: str = "post_attention_layernorm"
    post_mlp_norm: str | None = None
    post_attention_norm: str | None = None

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def mlp_linears(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        mlp = layer.get_submodule(self.mlp)
        return getattr(mlp, self.gate), getattr(mlp, self.up), getattr(mlp, self.down)

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attention)

    def mlp_norms(self, layer: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        """(the norm whose input is the residual stream and output the MLP input, the norm
        applied to the MLP output before the residual add, or None)."""
        post = layer.get_submodule(self.post_mlp_norm) if self.post_mlp_norm else None
        return layer.get_submodule(self.pre_mlp_norm), post

    def attention_post_norm(self, layer: nn.Module) -> nn.Module | None:
        """The norm applied to the attention output before the residual add, or None."""
        return layer.get_submodule(self.post_attention_norm) if self.post_attention_norm else None


_REGISTRY: list[DecoderArchitecture] = [
    DecoderArchitecture("llama", ("llama",)),
    DecoderArchitecture("qwen2", ("qwen2",)),  # q/k/v biases
    DecoderArchitecture("mistral", ("mistral",)),
    # GeGLU MLP, QK-norm, sliding-window layers; sandwich norms around attention and MLP
    DecoderArchitecture("gemma3", ("gemma3_text",), pre_mlp_norm="pre_feedforward_layernorm",
                        post_mlp_norm="post_feedforward_layernorm",
                        post_attention_norm="post_attention_layernorm"),
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
