"""Folding Hugging Face LLaMA-family causal LMs (MLP channels and attention heads, GQA-aware)."""

from modelfold.llm.architectures import (
    DecoderArchitecture,
    architecture_of,
    register_architecture,
    supported_model_types,
)
from modelfold.llm.fold import PARTS, RECIPES, LayerShape, fold_llm, transform_llm

__all__ = [
    "PARTS",
    "RECIPES",
    "DecoderArchitecture",
    "LayerShape",
    "architecture_of",
    "fold_llm",
    "register_architecture",
    "supported_model_types",
    "transform_llm",
]
