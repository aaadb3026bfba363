"""Inference latency (`modelfold.latency`, re-exported for the evaluation helpers)."""

from modelfold.latency import median_latency

__all__ = ["median_latency"]
