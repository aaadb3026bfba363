"""Inference latency, measured as a median over repeated timed runs."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def median_latency(model: nn.Module, inputs: torch.Tensor, *, runs: int = 5, warmup: int = 1
                   ) -> float:
    """Median wall time (s) of one forward pass in eval mode."""
    was = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(inputs)
        times = []
        for _ in range(runs):
            if inputs.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(inputs)
            if inputs.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    finally:
        model.train(was)
    return statistics.median(times)
