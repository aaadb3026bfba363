"""Convolutional (and MLP) classifiers for 32x32 inputs, written for model folding.

All models take ``num_classes``, ``in_channels`` and a width argument, use only standard
layers, avoid in-place ops and data-dependent control flow, and expose every op in the
forward pass (residual adds as ``out + shortcut``, ``torch.cat`` concatenation,
``torch.flatten(x, 1)``) so they can be traced through autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "DenseLayer",
    "InvertedResidual",
    "ResNet",
    "bn_mlp",
    "densenet_small",
    "lenet5",
    "mobilenet_v2",
    "resnet18",
    "resnet50",
    "vgg11_bn",
]


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with identity or 1x1-conv shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1, 3x3, 1x1 convs; expansion 4)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + self.shortcut(x)
        return F.relu(out)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class ResNet(nn.Module):
    """CIFAR-style ResNet (kuangliu layout): 3x3 stem, no max-pool, four stages."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        num_blocks: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], stride=2)
        self.linear = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, n: int, stride: int
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = F.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.linear(out)


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """CIFAR-style ResNet-18 (BasicBlock x [2, 2, 2, 2], widths w, 2w, 4w, 8w)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width)


def resnet50(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """CIFAR-style ResNet-50 (Bottleneck x [3, 4, 6, 3], expansion 4)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, width)


# --------------------------------------------------------------------------- VGG


class VGG(nn.Module):
    """VGG with BatchNorm: ``features`` -> global avg pool -> flatten -> ``classifier``."""

    def __init__(self, cfg: list[int | str], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(v, int)
                layers += [
                    nn.Conv2d(c, v, 3, padding=1, bias=True),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=False),
                ]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.pool(self.features(x))
        out = torch.flatten(out, 1)
        return self.classifier(out)


def vgg11_bn(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> VGG:
    """VGG-11 with BatchNorm, cfg [w, M, 2w, M, 4w, 4w, M, 8w, 8w, M, 8w, 8w, M]."""
    w = width
    cfg: list[int | str] = [w, "M", 2 * w, "M", 4 * w, 4 * w, "M", 8 * w, 8 * w, "M"]
    cfg += [8 * w, 8 * w, "M"]
    return VGG(cfg, num_classes, in_channels)


# --------------------------------------------------------------------------- LeNet-5


class LeNet5(nn.Module):
    """LeNet-5 for 32x32 inputs; ``fc1`` consumes the flattened ``C x 5 x 5`` feature map."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 6) -> None:
        super().__init__()
        c2 = max(1, round(16 * width / 6))
        self.conv1 = nn.Conv2d(in_channels, width, 5)
        self.conv2 = nn.Conv2d(width, c2, 5)
        self.fc1 = nn.Linear(c2 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        out = torch.flatten(out, 1)
        out = F.relu(self.fc1(out))
        out = F.relu(self.fc2(out))
        return self.fc3(out)


def lenet5(num_classes: int = 10, in_channels: int = 3, width: int = 6) -> LeNet5:
    """LeNet-5: conv(w, 5) -> conv(round(16w/6), 5) -> fc 120 -> fc 84 -> fc classes."""
    return LeNet5(num_classes, in_channels, width)


# --------------------------------------------------------------------------- MLP


class BNMLP(nn.Module):
    """MLP: flatten -> [Linear -> BatchNorm1d -> ReLU] x depth -> Linear."""

    def __init__(self, num_classes: int, in_features: int, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_features
        for i in range(depth):
            h = max(1, width // (2**i))
            layers += [nn.Linear(c, h), nn.BatchNorm1d(h), nn.ReLU(inplace=False)]
            c = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(torch.flatten(x, 1)))


def bn_mlp(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 128,
    in_features: int | None = None,
    depth: int = 3,
) -> BNMLP:
    """BatchNorm MLP with hidden widths ``width, width//2, width//4, ...`` (``depth`` layers).

    ``in_features`` defaults to ``in_channels * 32 * 32``.
    """
    if in_features is None:
        in_features = in_channels * 32 * 32
    return BNMLP(num_classes, in_features, width, depth)


# --------------------------------------------------------------------------- MobileNetV2


def _conv_bn(
    c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=False))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 project (+ residual add)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_residual = stride == 1 and c_in == c_out
        self.expand = _conv_bn(c_in, hidden, 1)
        self.depthwise = _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden)
        self.project = _conv_bn(hidden, c_out, 1, act=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if self.use_residual:  # structural (fixed at construction), not data-dependent
            out = out + x
        return out


class MobileNetV2(nn.Module):
    """Small MobileNetV2: stride-1 stem, 7 inverted-residual blocks (3 with residual adds)."""

    # (expand ratio, output channels as a multiple of width, repeats, first stride).
    # The first stage already downsamples (32 -> 16 -> 8 -> 4): depthwise convs at full
    # 32x32 resolution make CPU training ~5x slower for little accuracy gain.
    CFG: tuple[tuple[int, float, int, int], ...] = (
        (6, 0.75, 2, 2),
        (6, 1.0, 2, 2),
        (6, 2.0, 2, 2),
        (6, 3.0, 1, 1),
    )

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, width, 3)
        blocks: list[nn.Module] = []
        c = width
        for t, mult, n, s in self.CFG:
            c_out = max(1, round(width * mult))
            for i in range(n):
                blocks.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(c, 8 * width, 1)
        self.classifier = nn.Linear(8 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.blocks(self.stem(x)))
        out = F.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.classifier(out)


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width: int = 32) -> MobileNetV2:
    """Small MobileNetV2 (ReLU6, expand ratio 6, 3 residual blocks; head has 8w channels)."""
    return MobileNetV2(num_classes, in_channels, width)


# --------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """BN -> ReLU -> conv3x3(growth); output is ``torch.cat([x, new], 1)``."""

    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        new = self.conv(F.relu(self.bn(x)))
        return torch.cat([x, new], 1)


class Transition(nn.Module):
    """BN -> ReLU -> conv1x1 -> 2x2 average pool."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetSmall(nn.Module):
    """Two dense blocks joined by a compressing transition, then BN-ReLU-GAP-Linear."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        growth: int = 12,
        width: int = 24,
        layers_per_block: int = 4,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        c = width
        self.block1, c = self._block(c, growth, layers_per_block)
        c_trans = max(1, c // 2)
        self.trans1 = Transition(c, c_trans)
        self.block2, c = self._block(c_trans, growth, layers_per_block)
        self.bn = nn.BatchNorm2d(c)
        self.linear = nn.Linear(c, num_classes)

    @staticmethod
    def _block(c: int, growth: int, n: int) -> tuple[nn.Sequential, int]:
        layers = []
        for _ in range(n):
            layers.append(DenseLayer(c, growth))
            c += growth
        return nn.Sequential(*layers), c

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.trans1(self.block1(out))
        out = self.block2(out)
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.linear(out)


def densenet_small(
    num_classes: int = 10,
    in_channels: int = 3,
    growth: int = 12,
    width: int = 24,
    layers_per_block: int = 4,
) -> DenseNetSmall:
    """Small DenseNet: stem conv(width), 2 dense blocks of ``layers_per_block`` layers."""
    return DenseNetSmall(num_classes, in_channels, growth, width, layers_per_block)
