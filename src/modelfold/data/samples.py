"""The 20 real CIFAR-10 and 20 real ImageNet validation images of the foolbox wheel.

`pip install --no-deps foolbox==3.3.4`: its `foolbox/data/` folder holds the first 20 CIFAR-10
test images (`cifar10_XX_<label>.png`, 32x32) and 20 ImageNet validation images
(`imagenet_XX_<label>.jpg`), labels in the file names. Only the files are read; foolbox is never
imported. Too few for an accuracy benchmark; enough for smoke tests of pretrained models and as
label-free inputs for checking that a folded model agrees with the original.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from modelfold._optional import require
from modelfold.data.images import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    _normalize,
    imagenet_transform,
)
from modelfold.errors import FoldError

__all__ = ["FOOLBOX_PIP", "foolbox_data_dir", "foolbox_samples", "load_foolbox_cifar10",
           "load_foolbox_imagenet"]

FOOLBOX_PIP = "pip install --no-deps foolbox==3.3.4"


def foolbox_data_dir() -> Path:
    """The installed `foolbox/data` folder; FoldError naming the pip command if missing."""
    spec = importlib.util.find_spec("foolbox")
    folder = (Path(spec.submodule_search_locations[0]) / "data"
              if spec is not None and spec.submodule_search_locations else None)
    if folder is None or not folder.is_dir():
        raise FoldError(f"the foolbox sample images are not installed: {FOOLBOX_PIP}")
    return folder


def foolbox_samples(prefix: str) -> list[tuple[Path, int]]:
    """(file, label) of the foolbox images named `<prefix>_<index>_<label>`, in file order."""
    pattern = re.compile(rf"^{prefix}_\d+_(\d+)\.(png|jpg)$")
    found = sorted((f, int(m[1])) for f in foolbox_data_dir().iterdir()
                   if (m := pattern.match(f.name)))
    if not found:
        raise FoldError(f"no {prefix}_*_<label> images in {foolbox_data_dir()}; reinstall "
                        f"with {FOOLBOX_PIP} --force-reinstall")
    return found


def load_foolbox_imagenet(*, resize: int = 256, crop: int = 224, normalize: bool = True
                          ) -> TensorDataset:
    """The 20 ImageNet images as float32 (20, 3, crop, crop) tensors and int64 labels, with the
    standard evaluation transform (short side to `resize`, centre crop, [0, 1], ImageNet
    mean/std when `normalize`): the input torchvision's ImageNet models expect."""
    samples = foolbox_samples("imagenet")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalize else (None, None)
    x = torch.stack([imagenet_transform(f, resize=resize, crop=crop, mean=mean, std=std)
                     for f, _ in samples])
    return TensorDataset(x, torch.tensor([label for _, label in samples]))


def load_foolbox_cifar10(*, raw: bool = False, normalize: bool = False) -> TensorDataset:
    """The 20 CIFAR-10 test images as float32 (20, 3, 32, 32) and int64 labels: pixels in
    [0, 1], or 0-255 when `raw` (the Keras CNN's input), or normalised with the CIFAR-10
    mean/std when `normalize`."""
    require("PIL.Image", "data", "decoding the sample images")
    from PIL import Image

    if raw and normalize:
        raise ValueError("raw and normalize exclude each other")
    samples = foolbox_samples("cifar10")
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in samples])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().contiguous()
    if not raw:
        x = x / 255.0
    if normalize:
        x = _normalize(x, CIFAR10_MEAN, CIFAR10_STD)
    return TensorDataset(x, torch.tensor([label for _, label in samples]))
