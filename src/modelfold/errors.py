"""The one exception type of the public API, and the input check every fold path shares."""

from __future__ import annotations

import torch
from torch import nn


class FoldError(ValueError):
    """Raised for any input modelfold cannot fold, save or load.

    The message always names the module, parameter, argument or file at fault and, where one
    exists, the fix.
    """


class UntrustedFactoryError(FoldError):
    """A saved folder names an architecture factory that may not be run without trust."""

    def __init__(self, message: str, *, target: str, where: str) -> None:
        super().__init__(message)
        self.target, self.where = target, where


def check_parameters(model: nn.Module) -> None:
    """Refuse meta-device, non-float (quantized) and non-finite parameters and buffers."""
    params = dict(model.named_parameters())
    for name, p in [*params.items(), *model.named_buffers()]:
        if p.device.type == "meta":
            raise FoldError(f"tensor {name!r} is on the meta device; load real weights first.")
        if name in params and not p.is_floating_point():
            raise FoldError(
                f"tensor {name!r} has dtype {p.dtype}; quantized or integer weights cannot be "
                "folded. Fold the float model, then quantize."
            )
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise FoldError(f"tensor {name!r} contains NaN or Inf values.")
