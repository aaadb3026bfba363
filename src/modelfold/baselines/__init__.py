"""Baselines folding is compared with; they share folding's channel groups and `ratio`."""

from modelfold.baselines.llm import LLM_PRUNING_METHODS, prune_llm
from modelfold.baselines.magnitude import magnitude_prune

__all__ = ["LLM_PRUNING_METHODS", "magnitude_prune", "prune_llm"]
