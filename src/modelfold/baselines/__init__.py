"""Baselines folding is compared with; they share folding's channel groups and `ratio`."""

from modelfold.baselines.magnitude import magnitude_prune

__all__ = ["magnitude_prune"]
