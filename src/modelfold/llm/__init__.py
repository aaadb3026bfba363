"""Folding Hugging Face LLaMA-family causal LMs (MLP channels and attention heads, GQA-aware)."""

from modelfold.llm.architectures import (
    DecoderArchitecture,
    architecture_of,
    register_architecture,
    saved_dtype,
    supported_model_types,
)
from modelfold.llm.fold import (
    PARTS,
    RECIPES,
    LayerShape,
    fold_llm,
    layer_shape,
    resize_layers,
    transform_llm,
)

__all__ = [
    "PARTS",
    "RECIPES",
    "DecoderArchitecture",
    "LayerShape",
    "architecture_of",
    "fold_llm",
    "layer_shape",
    "register_architecture",
    "resize_layers",
    "saved_dtype",
    "supported_model_types",
    "transform_llm",
]
