"""Calibration data: any iterable of batches, cut to a fixed sample budget."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from modelfold.errors import FoldError


def _inputs_of(batch: Any) -> Any:
    """The model input of a batch: a tensor, a dict, or the first item of (inputs, labels)."""
    if isinstance(batch, (torch.Tensor, dict)):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], (torch.Tensor, dict)):
        return batch[0]
    raise FoldError(
        f"calibration: a batch must be a tensor, a dict of tensors or an (inputs, labels) pair, "
        f"got {type(batch).__name__}."
    )


def _size(x: Any) -> int:
    return int(next(iter(x.values())).shape[0]) if isinstance(x, dict) else int(x.shape[0])


def _take(x: Any, n: int) -> Any:
    return {k: v[:n] for k, v in x.items()} if isinstance(x, dict) else x[:n]


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def to_device(x: Any, device: torch.device) -> Any:
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def collect(calibration: Any, budget: int) -> Any:
    """Up to `budget` samples of `calibration` as one batch (a tensor or a dict of tensors).

    `calibration` may be a tensor (its first dimension indexes samples), a DataLoader, or any
    iterable of batches. Using one batch makes BN statistics exact, not an average of batches.
    """
    if calibration is None:
        raise FoldError("this repair needs `calibration=` data: a tensor, a DataLoader or an "
                        "iterable of input batches.")
    if budget < 1:
        raise FoldError(f"calibration_samples must be positive, got {budget}.")
    if isinstance(calibration, torch.Tensor):
        if calibration.ndim == 0 or calibration.shape[0] == 0:
            raise FoldError("calibration: the tensor holds no samples.")
        return calibration[:budget]
    if not isinstance(calibration, Iterable):
        raise FoldError(f"calibration must be a tensor or an iterable of batches, got "
                        f"{type(calibration).__name__}.")
    parts, seen = [], 0
    for batch in calibration:
        x = _inputs_of(batch)
        parts.append(_take(x, budget - seen))
        seen += _size(parts[-1])
        if seen >= budget:
            break
    if not parts or seen == 0:
        raise FoldError("calibration: the iterable yielded no samples.")
    return _cat(parts)


def run(model: torch.nn.Module, x: Any) -> Any:
    try:
        return model(**x) if isinstance(x, dict) else model(x)
    except Exception as exc:
        raise FoldError(
            f"calibration data does not fit the model ({type(exc).__name__}: {exc}); it must "
            "look like `example_inputs` with any batch size."
        ) from exc
