"""Shared fixtures: a zoo of small models (timm's test_models.py pattern)."""

from __future__ import annotations

import pytest
import torch

from modelfold.zoo import create_model

# name -> constructor kwargs; small widths keep the suite fast on 2 CPU cores.
ZOO = {
    "bn_mlp": {"width": 32},
    "lenet5": {"width": 6},
    "resnet18": {"width": 8},
    "resnet50": {"width": 8},
    "vgg11_bn": {"width": 8},
    "mobilenet_v2": {"width": 16},
    "densenet_small": {},
    "vit_tiny": {"width": 32, "depth": 2, "num_heads": 4},
}


def make_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, **ZOO[name])
    randomize_norm_stats(model, seed)
    return model.eval()


def randomize_norm_stats(model: torch.nn.Module, seed: int = 0) -> None:
    """Give BN layers non-trivial statistics and affine terms, as a trained model has."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


@pytest.fixture
def example() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
