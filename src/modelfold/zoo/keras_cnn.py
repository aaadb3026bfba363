"""The CIFAR-10 Keras CNN of the `cifar-10-model` wheel, ported to a plain PyTorch CNN.

Architecture (read from the HDF5 file's `model_config`; Keras 2.9, `Sequential`): three stages
of [Conv3x3 'valid' + ReLU -> BatchNorm] x 2 with 64, 128, 64 filters, 2x2/2 max-pools after
the first two stages (the third stage's 1x1/1 pool is an identity and is left out), then Dense
1024 -> Dense 512 -> Dense 10, every Dense followed by ReLU (the last one too: the Keras model
was trained on ReLU'd "logits", so its scores are non-negative), dropout 0.2 between them.
At 32x32 the feature map before the flatten is 64 x 1 x 1 (0.97 M parameters).

Inputs are raw RGB pixels in 0-255 (the Keras model has no rescaling), NCHW; the port
converts the weights (HWIO kernels to OIHW, Dense kernels transposed, the first Dense's rows
from Keras' NHWC flatten order to PyTorch's NCHW order) so the torch model is an ordinary CNN.
Keras BatchNormalization uses epsilon 1e-3 and momentum 0.15 (the weight kept on the running
statistics), i.e. PyTorch eps=1e-3, momentum=0.85.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from modelfold.errors import FoldError
from modelfold.zoo import register_model, register_pretrained

__all__ = ["KerasCIFAR10CNN", "cifar10_keras_cnn", "load_keras_h5"]

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.85  # PyTorch's convention for Keras' momentum=0.15


class KerasCIFAR10CNN(nn.Module):
    """`features` (6 conv + ReLU + BN, 2 max-pools) -> flatten -> `classifier` (3 dense)."""

    def __init__(self, num_classes: int = 10, filters: tuple[int, int, int] = (64, 128, 64),
                 hidden: tuple[int, int] = (1024, 512), dropout: float = 0.2,
                 image_size: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, size = 3, image_size
        for stage, f in enumerate(filters):
            for _ in range(2):
                layers += [nn.Conv2d(c, f, 3), nn.ReLU(inplace=False),
                           nn.BatchNorm2d(f, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM)]
                c, size = f, size - 2
            if stage < len(filters) - 1:
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
        if size < 1:
            raise FoldError(f"cifar10_keras_cnn: image_size={image_size} is too small for "
                            "six 3x3 'valid' convs and two 2x2 pools.")
        self.features = nn.Sequential(*layers)
        self.feature_shape = (c, size, size)
        self.classifier = nn.Sequential(
            nn.Linear(c * size * size, hidden[0]), nn.ReLU(inplace=False), nn.Dropout(dropout),
            nn.Linear(hidden[0], hidden[1]), nn.ReLU(inplace=False), nn.Dropout(dropout),
            nn.Linear(hidden[1], num_classes), nn.ReLU(inplace=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("cifar10_keras_cnn")
def cifar10_keras_cnn(num_classes: int = 10, image_size: int = 32) -> KerasCIFAR10CNN:
    """The `cifar-10-model` wheel's VGG-style CNN (raw 0-255 RGB inputs, ReLU'd scores)."""
    return KerasCIFAR10CNN(num_classes=num_classes, image_size=image_size)


def _keras_layers(h5) -> list[dict]:
    raw = h5.attrs.get("model_config")
    if raw is None:
        raise FoldError("the file has no Keras model_config attribute")
    config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    return [layer for layer in config["config"]["layers"]
            if layer["class_name"] in ("Conv2D", "BatchNormalization", "Dense")]


def _weights_of(h5, name: str) -> dict[str, np.ndarray]:
    group = h5["model_weights"][name]
    out: dict[str, np.ndarray] = {}

    def visit(key: str, obj) -> None:
        if hasattr(obj, "shape"):
            out[key.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(obj, dtype=np.float32)

    group.visititems(visit)
    return out


def load_keras_h5(model: nn.Module, path: Path) -> None:
    """Copy the Keras HDF5 weights at `path` into a `KerasCIFAR10CNN` (needs h5py)."""
    try:
        import h5py
    except ImportError:
        raise FoldError("reading Keras .h5 weights needs h5py: pip install 'modelfold[zoo]' "
                        "(or pip install h5py).") from None
    if not isinstance(model, KerasCIFAR10CNN):
        raise FoldError(f"cannot load Keras CNN weights into {type(model).__name__}")
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    denses = [m for m in model.classifier if isinstance(m, nn.Linear)]
    try:
        with h5py.File(path, "r") as h5:
            layers = _keras_layers(h5)
            kinds = [layer["class_name"] for layer in layers]
            expected = ["Conv2D", "BatchNormalization"] * len(convs) + ["Dense"] * len(denses)
            if kinds != expected:
                raise FoldError(f"layers {kinds} do not match this architecture")
            it_conv, it_bn, it_dense = iter(convs), iter(bns), iter(denses)
            for i, layer in enumerate(layers):
                cfg = layer["config"]
                w = _weights_of(h5, cfg["name"])
                if layer["class_name"] == "Conv2D":
                    m = next(it_conv)
                    _set(m.weight, w["kernel"].transpose(3, 2, 0, 1))  # HWIO -> OIHW
                    _set(m.bias, w["bias"])
                elif layer["class_name"] == "BatchNormalization":
                    m = next(it_bn)
                    if abs(float(cfg.get("epsilon", 1e-3)) - m.eps) > 1e-12:
                        raise FoldError(f"{cfg['name']} has epsilon {cfg.get('epsilon')}, "
                                        f"the port uses {m.eps}")
                    _set(m.weight, w["gamma"])
                    _set(m.bias, w["beta"])
                    _set(m.running_mean, w["moving_mean"])
                    _set(m.running_var, w["moving_variance"])
                else:
                    m = next(it_dense)
                    kernel = w["kernel"]  # (in, out)
                    if i == len(layers) - len(denses):  # first Dense: NHWC -> NCHW flatten
                        c, h, wd = model.feature_shape
                        kernel = kernel.reshape(h, wd, c, -1).transpose(2, 0, 1, 3)
                        kernel = kernel.reshape(c * h * wd, -1)
                    _set(m.weight, kernel.T)
                    _set(m.bias, w["bias"])
    except FoldError as exc:
        raise FoldError(f"cifar10_keras_cnn: {path}: {exc}") from None
    except (OSError, KeyError, ValueError) as exc:
        raise FoldError(f"cifar10_keras_cnn: cannot read {path} as the Keras CNN "
                        f"({type(exc).__name__}: {exc}).") from exc


def _set(target: Tensor, value: np.ndarray) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise FoldError(f"a weight of shape {tuple(value.shape)} does not fit "
                        f"{tuple(target.shape)} (the wheel's model needs num_classes=10, "
                        "image_size=32)")
    with torch.no_grad():
        target.copy_(torch.from_numpy(np.ascontiguousarray(value)))


register_pretrained("cifar10_keras_cnn", load_keras_h5)
