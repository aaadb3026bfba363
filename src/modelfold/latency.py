"""Inference latency, measured as a median over repeated timed runs."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from modelfold.macs import run_model


@torch.no_grad()
def median_latency(model: nn.Module, inputs: Any, *, runs: int = 5, warmup: int = 1) -> float:
    """Median wall time (s) of one forward pass in eval mode on `inputs` (a tensor, a tuple of
    positional arguments or a dict of keyword arguments); CUDA work is synchronised."""
    cuda = any(t.is_cuda for t in _tensors(inputs)) and torch.cuda.is_available()
    was = model.training
    model.eval()
    try:
        for _ in range(warmup):
            run_model(model, inputs)
        times = []
        for _ in range(runs):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            run_model(model, inputs)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    finally:
        model.train(was)
    return statistics.median(times)


def fastest_in_turn(models: list[nn.Module], inputs: Any, *, rounds: int = 3,
                    runs: int = 3) -> list[float]:
    """Seconds per forward pass of every model on `inputs`: the models are timed in turn
    (`median_latency` of `runs` passes), `rounds` times, and each keeps its fastest round, so
    that a drift in the machine's speed (other jobs on a shared host) slows them all alike
    instead of the ones timed last."""
    best = [float("inf")] * len(models)
    for _ in range(rounds):
        for i, model in enumerate(models):
            best[i] = min(best[i], median_latency(model, inputs, runs=runs))
    return best


def _tensors(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    values = inputs.values() if isinstance(inputs, dict) else (
        inputs if isinstance(inputs, (list, tuple)) else [])
    return [t for v in values for t in _tensors(v)]
