"""Fashion-MNIST loader reading the original IDX ``.gz`` files (no torchvision).

The files are provided by the Debian package ``dataset-fashion-mnist`` under
``/usr/share/datasets/fashion-mnist/``. The directory can be overridden with the ``root``
argument or the ``MODELFOLD_FASHION_MNIST`` environment variable.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "DEFAULT_ROOT",
    "ENV_VAR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "load_fashion_mnist",
    "resolve_root",
]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "MODELFOLD_FASHION_MNIST"
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
_IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dims
_LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dim
_PAD = 2


def resolve_root(root: str | Path | None = None) -> Path:
    """Return the data directory: ``root`` argument, else env var, else the Debian default."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return DEFAULT_ROOT


def _read_gz(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file not found: {path}. Install the data with "
            f"`apt-get install dataset-fashion-mnist` or point {ENV_VAR} at a directory "
            "holding the original IDX .gz files."
        )
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"corrupt Fashion-MNIST file {path}: {exc}") from exc


def _parse_idx(path: Path, magic: int, ndim: int, count: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file, validating magic number, count and size."""
    raw = _read_gz(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"corrupt Fashion-MNIST file {path}: truncated header")
    (got_magic,) = struct.unpack(">I", raw[:4])
    if got_magic != magic:
        raise ValueError(
            f"corrupt Fashion-MNIST file {path}: magic number {got_magic:#010x}, "
            f"expected {magic:#010x}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if dims[0] != count or (ndim == 3 and dims[1:] != (28, 28)):
        raise ValueError(
            f"corrupt Fashion-MNIST file {path}: shape {dims}, expected "
            f"{(count, 28, 28) if ndim == 3 else (count,)}"
        )
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise ValueError(
            f"corrupt Fashion-MNIST file {path}: {len(raw) - header} data bytes, "
            f"expected {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=4)
def _load_tensors(split: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    image_file, label_file, count = _FILES[split]
    base = Path(root)
    images = _parse_idx(base / image_file, _IMAGE_MAGIC, 3, count)
    labels = _parse_idx(base / label_file, _LABEL_MAGIC, 1, count)
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"corrupt Fashion-MNIST file {base / label_file}: label out of range")

    x = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    x = torch.nn.functional.pad(x, (_PAD, _PAD, _PAD, _PAD), value=0.0)  # (N, 32, 32)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, 32, 32)
    y = torch.from_numpy(labels.astype(np.int64))
    # Shared across calls: mark read-only in spirit; callers must not modify in place.
    return x, y


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> TensorDataset:
    """Load a Fashion-MNIST split as a ``TensorDataset`` of ``(x, y)``.

    ``x`` is float32 ``(N, 3, 32, 32)``: pixels scaled to [0, 1], normalised with
    mean 0.2860 / std 0.3530, zero-padded 2 px per side (after normalisation) and the grey
    channel repeated three times. ``y`` is int64 ``(N,)``. Decoded tensors are cached in
    memory, so repeated calls are cheap (the returned tensors are shared: do not modify
    them in place).
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = resolve_root(root).resolve()
    x, y = _load_tensors(split, str(base))
    return TensorDataset(x, y)
