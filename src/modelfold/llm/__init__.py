"""Folding Hugging Face LLaMA-family causal LMs (MLP channels and attention heads, GQA-aware)."""

from modelfold.llm.architectures import (
    DecoderArchitecture,
    architecture_of,
    register_architecture,
    saved_dtype,
    supported_model_types,
)
from modelfold.llm.config import LLMFoldConfig
from modelfold.llm.fold import (
    PARTS,
    RECIPES,
    LayerShape,
    fold_llm,
    layer_shape,
    register_llm_allocation,
    register_llm_clusterer,
    register_llm_repair,
    resize_layers,
    transform_llm,
)

__all__ = [
    "PARTS",
    "RECIPES",
    "DecoderArchitecture",
    "LLMFoldConfig",
    "LayerShape",
    "architecture_of",
    "fold_llm",
    "layer_shape",
    "register_architecture",
    "register_llm_allocation",
    "register_llm_clusterer",
    "register_llm_repair",
    "resize_layers",
    "saved_dtype",
    "supported_model_types",
    "transform_llm",
]
