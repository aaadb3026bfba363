"""Tests for the model zoo: shapes, registry and traceability."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelfold.zoo import MODEL_ZOO, create_model, register_model

EXPECTED = {
    "resnet18",
    "resnet50",
    "vgg11_bn",
    "lenet5",
    "bn_mlp",
    "mobilenet_v2",
    "densenet_small",
}
# Small widths keep the test fast; defaults are checked separately for the cheap models.
SMALL = {
    "resnet18": {"width": 8},
    "resnet50": {"width": 8},
    "vgg11_bn": {"width": 8},
    "lenet5": {"width": 6},
    "bn_mlp": {"width": 32},
    "mobilenet_v2": {"width": 16},
    "densenet_small": {"growth": 6, "width": 12},
}


def test_registry_has_expected_models() -> None:
    assert EXPECTED.issubset(MODEL_ZOO)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_shape_default_width(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_backward_small(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=1, **SMALL[name])
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_no_inplace_activations(name: str) -> None:
    model = create_model(name, **SMALL[name])
    for mod in model.modules():
        assert not getattr(mod, "inplace", False), f"{type(mod).__name__} is in-place"


def test_resnet18_layout() -> None:
    model = create_model("resnet18", width=16)
    names = dict(model.named_modules())
    assert isinstance(names["conv1"], nn.Conv2d) and names["conv1"].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert len(names["layer1.0.shortcut"]) == 0  # identity
    assert isinstance(names["layer2.0.shortcut.0"], nn.Conv2d)
    assert names["layer4.1.conv2"].out_channels == 128
    assert names["linear"].in_features == 128
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_resnet50_bottleneck_counts() -> None:
    model = create_model("resnet50", width=8)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert model.linear.in_features == 8 * 8 * 4


def test_lenet5_uses_spatial_features() -> None:
    model = create_model("lenet5")
    assert model.conv2.out_channels == 16
    assert model.fc1.in_features == 16 * 5 * 5
    assert create_model("lenet5", width=12).conv2.out_channels == 32


def test_bn_mlp_widths() -> None:
    model = create_model("bn_mlp", width=64, depth=3)
    widths = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    assert widths == [64, 32, 16, 10]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 3


def test_mobilenet_v2_blocks() -> None:
    from modelfold.zoo.cnn import InvertedResidual

    model = create_model("mobilenet_v2", width=16)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) >= 5
    assert sum(b.use_residual for b in blocks) >= 2
    assert all(b.depthwise[0].groups == b.depthwise[0].in_channels for b in blocks)


def test_densenet_concatenates() -> None:
    model = create_model("densenet_small", growth=12, width=24)
    assert model.linear.in_features == (24 + 4 * 12) // 2 + 4 * 12
    grad_fns: set[str] = set()
    out = model(torch.randn(2, 3, 32, 32))
    stack = [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or type(fn).__name__ in grad_fns:
            continue
        grad_fns.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    assert "CatBackward0" in grad_fns


def test_create_model_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError) as err:
        create_model("no_such_net")
    msg = str(err.value)
    assert "no_such_net" in msg
    for name in EXPECTED:
        assert name in msg


def test_register_model_decorator() -> None:
    @register_model("_test_tiny")
    def tiny(num_classes: int = 10, in_channels: int = 3, width: int = 4) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 32 * 32, num_classes))

    try:
        assert MODEL_ZOO["_test_tiny"] is tiny
        model = create_model("_test_tiny", num_classes=5)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
        with pytest.raises(ValueError, match="already registered"):
            register_model("_test_tiny")(lambda: nn.Identity())
    finally:
        MODEL_ZOO.pop("_test_tiny", None)
