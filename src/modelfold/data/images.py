"""Loaders for users who have CIFAR-10 or an ImageNet-style image folder (torchvision layouts).

Hand-written rather than taken from torchvision: torchvision pins a torch build (a multi-GB CUDA
wheel here), and these two readers need only Pillow and NumPy.

- `load_cifar10(root, split)` reads the official "python version" batches that
  `torchvision.datasets.CIFAR10` downloads: `root/cifar-10-batches-py/{data_batch_1..5,
  test_batch}`. The batches are pickles; they are read with an unpickler that only admits the
  NumPy types they consist of, so a tampered batch cannot run code.
- `ImageFolder(root)` follows `torchvision.datasets.ImageFolder`: one sub-folder per class,
  classes indexed in sorted order, images decoded lazily (ImageNet val has 50,000 of them), with
  the standard ImageNet evaluation transform (resize the short side to 256, centre-crop 224,
  normalise with the ImageNet mean and std).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from modelfold._optional import require

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "imagenet_transform",
    "load_cifar10",
]

CIFAR10_CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                    "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only the globals a CIFAR batch (a dict of NumPy arrays and lists) refers to."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 batch not found: {path}. Expected the official python-version layout "
            f"<root>/{_CIFAR_DIR}/{{data_batch_1..5,test_batch}} (as torchvision downloads it).")
    try:
        with open(path, "rb") as fh:
            batch = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"corrupt CIFAR-10 batch {path}: {exc}") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"corrupt CIFAR-10 batch {path}: data {data.shape}, "
                         f"{len(labels)} labels; expected (N, 3072) and N labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise ValueError(f"corrupt CIFAR-10 batch {path}: label out of range 0-9")
    return data, labels


def load_cifar10(root: str | Path, split: str = "test", *, normalize: bool = True
                 ) -> TensorDataset:
    """CIFAR-10 `split` ("train" or "test") as a `TensorDataset` of float32 (N, 3, 32, 32)
    images in [0, 1] (normalised with the CIFAR-10 mean and std when `normalize`) and int64
    labels. `root` is the folder holding `cifar-10-batches-py/` (or that folder itself)."""
    if split not in _CIFAR_SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = Path(root).expanduser()
    if base.name != _CIFAR_DIR:
        base = base / _CIFAR_DIR
    parts = [_read_cifar_batch(base / name) for name in _CIFAR_SPLITS[split]]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    if normalize:
        x = _normalize(x, CIFAR10_MEAN, CIFAR10_STD)
    return TensorDataset(x, torch.from_numpy(labels))


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    shape = (1,) * (x.dim() - 3) + (-1, 1, 1)
    return (x - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


class ImageFolder(Dataset):
    """Images in `root/<class>/<file>`, classes indexed in sorted order (torchvision layout).

    Items are `(image, label)`: the image resized so its short side is `resize`, centre-cropped
    to `crop` x `crop`, scaled to [0, 1] and normalised with `mean`/`std` (ImageNet's by
    default), as a float32 (3, crop, crop) tensor.
    """

    def __init__(self, root: str | Path, *, resize: int = 256, crop: int = 224,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if crop > resize:
            raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(path, self.class_to_idx[c]) for c in self.classes
                        for path in sorted((self.root / c).rglob("*"))
                        if path.suffix.lower() in extensions and path.is_file()]
        if not self.samples:
            raise FileNotFoundError(
                f"no images in {self.root}: expected <root>/<class>/<image> with an extension "
                f"in {extensions}")
        self.resize, self.crop, self.mean, self.std = resize, crop, mean, std

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return imagenet_transform(path, resize=self.resize, crop=self.crop, mean=self.mean,
                                  std=self.std), label


def imagenet_transform(path: str | Path, *, resize: int = 256, crop: int = 224,
                       mean: tuple[float, ...] | None = IMAGENET_MEAN,
                       std: tuple[float, ...] | None = IMAGENET_STD) -> torch.Tensor:
    """The standard ImageNet evaluation transform of one image file: resize the short side to
    `resize` (bilinear, antialiased), centre-crop `crop` x `crop`, scale to [0, 1], normalise
    with `mean`/`std` (skipped when None). A float32 (3, crop, crop) tensor."""
    require("PIL.Image", "data", "decoding image files")
    from PIL import Image, UnidentifiedImageError

    if crop > resize:
        raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = resize / min(w, h)
            size = (max(crop, round(w * scale)), max(crop, round(h * scale)))
            img = img.resize(size, Image.BILINEAR)
            left = (size[0] - crop) // 2
            top = (size[1] - crop) // 2
            img = img.crop((left, top, left + crop, top + crop))
            pixels = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    x = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    return x if mean is None or std is None else _normalize(x, mean, std)
