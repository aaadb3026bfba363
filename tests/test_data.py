"""Tests for the Fashion-MNIST loader and the training recipe (real data)."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from experiments.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, resolve_root
from experiments.train import (
    augment_batch,
    evaluate_accuracy,
    pretrained_fashion_mnist,
    train_classifier,
)
from modelfold.zoo import create_model

DATA_ROOT = resolve_root()
needs_data = pytest.mark.skipif(
    not (DATA_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not found in {DATA_ROOT} (apt-get install dataset-fashion-mnist)",
)


def test_classes() -> None:
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top"
    assert FASHION_MNIST_CLASSES[9] == "Ankle boot"


@needs_data
@pytest.mark.parametrize(("split", "n"), [("train", 60000), ("test", 10000)])
def test_shapes_and_balance(split: str, n: int) -> None:
    x, y = load_fashion_mnist(split).tensors
    assert x.shape == (n, 3, 32, 32)
    assert x.dtype == torch.float32
    assert y.shape == (n,)
    assert y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [n // 10] * 10
    # 2-pixel zero border (padding after normalisation).
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, :, border] == 0).all()
    centre = x[:, :, 2:30, 2:30]
    assert abs(centre.mean().item()) < 0.05
    assert abs(centre.std().item() - 1.0) < 0.05
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


@needs_data
def test_cached_in_memory() -> None:
    a = load_fashion_mnist("test")
    b = load_fashion_mnist("test")
    assert a.tensors[0] is b.tensors[0]


def test_bad_split() -> None:
    with pytest.raises(ValueError, match="train"):
        load_fashion_mnist("validation")


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist("test", root=tmp_path / "nowhere")
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "nowhere" in str(err.value)


def test_env_var_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFOLD_FASHION_MNIST", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_fashion_mnist("test")


def _write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes) -> None:
    header = struct.pack(f">I{len(dims)}I", magic, *dims)
    with gzip.open(path, "wb") as fh:
        fh.write(header + payload)


def test_corrupt_files(tmp_path: Path) -> None:
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    _write_idx(labels, 0x801, (10000,), bytes(10000))
    _write_idx(images, 0x999, (10000, 28, 28), bytes(10000 * 784))  # bad magic
    with pytest.raises(ValueError, match="t10k-images"):
        load_fashion_mnist("test", root=tmp_path)
    _write_idx(images, 0x803, (10000, 28, 28), bytes(100))  # truncated payload
    with pytest.raises(ValueError, match="t10k-images"):
        load_fashion_mnist("test", root=tmp_path)
    images.write_bytes(b"not a gzip file")
    with pytest.raises(ValueError, match="t10k-images"):
        load_fashion_mnist("test", root=tmp_path)
    _write_idx(images, 0x803, (10000, 28, 28), bytes(range(256)) * 30625)
    raw = images.read_bytes()
    images.write_bytes(raw[:30] + bytes(b ^ 0xFF for b in raw[30:60]) + raw[60:])  # bad deflate
    with pytest.raises(ValueError, match="t10k-images"):
        load_fashion_mnist("test", root=tmp_path)


def test_augment_matches_reference() -> None:
    x = torch.randn(8, 3, 32, 32)
    out = augment_batch(x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    oy = torch.randint(0, 5, (8,), generator=g)
    ox = torch.randint(0, 5, (8,), generator=g)
    flip = torch.rand(8, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(8):
        ref = padded[i, :, oy[i] : oy[i] + 32, ox[i] : ox[i] + 32]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def _subsets() -> tuple[TensorDataset, TensorDataset]:
    xtr, ytr = load_fashion_mnist("train").tensors
    xte, yte = load_fashion_mnist("test").tensors
    return TensorDataset(xtr[:4096], ytr[:4096]), TensorDataset(xte[:1000], yte[:1000])


def _train_mlp(train: TensorDataset, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("bn_mlp", width=128)
    return train_classifier(model, train, epochs=1, batch_size=64, seed=seed, progress=False)


@needs_data
def test_tiny_training_run_is_accurate_and_deterministic() -> None:
    train, test = _subsets()
    a = _train_mlp(train)
    acc = evaluate_accuracy(a, test)
    assert acc > 0.70, f"accuracy {acc:.3f}"
    b = _train_mlp(train)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.training  # evaluate_accuracy restores the mode


@needs_data
def test_pretrained_cache_roundtrip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Shrink the "full" training set so the cache path is exercised quickly.
    from experiments import fashion_mnist as data

    small_train, small_test = _subsets()
    monkeypatch.setattr(
        data, "load_fashion_mnist", lambda split: small_train if split == "train" else small_test
    )
    model = pretrained_fashion_mnist(
        "lenet5", width=4, epochs=1, cache_dir=tmp_path, progress=False
    )
    files = sorted(p.name for p in tmp_path.iterdir())
    stem = "fashion_mnist-lenet5-w4-e1-s0"
    assert files == [f"{stem}.json", f"{stem}.safetensors"]
    again = pretrained_fashion_mnist(
        "lenet5", width=4, epochs=1, cache_dir=tmp_path, progress=False
    )
    for pa, pb in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert not again.training


@needs_data
def test_pretrained_with_pinned_threads_is_bit_reproducible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from experiments import fashion_mnist as data

    small_train, small_test = _subsets()
    small_train = TensorDataset(*(t[:1024] for t in small_train.tensors))
    monkeypatch.setattr(
        data, "load_fashion_mnist", lambda split: small_train if split == "train" else small_test
    )
    before = torch.get_num_threads()
    models = [
        pretrained_fashion_mnist(
            "lenet5", width=4, epochs=1, cache_dir=tmp_path / str(run), progress=False, threads=1
        )
        for run in range(2)
    ]
    assert torch.get_num_threads() == before  # restored after training
    for run in range(2):
        files = sorted(p.name for p in (tmp_path / str(run)).iterdir())
        stem = "fashion_mnist-lenet5-w4-e1-s0-t1"
        assert files == [f"{stem}.json", f"{stem}.safetensors"]
        meta = json.loads((tmp_path / str(run) / f"{stem}.json").read_text())
        assert meta["num_threads"] == 1
    for (name, pa), pb in zip(
        models[0].state_dict().items(), models[1].state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name


def test_demo_writes_to_an_ignored_folder(tmp_path: Path) -> None:
    import subprocess

    from experiments import demo

    root = Path(demo.__file__).resolve().parents[1]
    assert root / "out" / "demo" == demo.DEFAULT_OUT
    if (root / ".git").exists():
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(demo.DEFAULT_OUT / "x.csv")], cwd=root
        )
        assert ignored.returncode == 0, "out/demo/ must be git-ignored"
    calls: list[dict] = []
    demo.main([], run=lambda **kwargs: calls.append(kwargs) or [])
    demo.main(["--out", str(tmp_path), "--threads", "3"], run=lambda **kw: calls.append(kw) or [])
    assert calls[0]["out_dir"] == demo.DEFAULT_OUT
    assert calls[0]["threads"] == demo.DEMO_THREADS == 2
    assert calls[1]["out_dir"] == tmp_path and calls[1]["threads"] == 3
