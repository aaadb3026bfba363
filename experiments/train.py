"""Fashion-MNIST training recipe, evaluation and a cached "pretrained" model store.

An experiment of the source checkout, not part of the installed package: users fold their own
trained models. Checkpoints go to ``$MODELFOLD_CACHE/checkpoints`` (default
``~/.cache/modelfold/checkpoints``).

Recipe (the project's reference protocol): cross-entropy, SGD (Nesterov, momentum 0.9,
weight decay on all parameters), ``OneCycleLR`` stepped per batch without momentum cycling,
augmentation by zero-padding 2 px + random 32x32 crop and horizontal flip (p = 0.5),
vectorised over the batch. A ``torch.Generator`` seeded with ``seed`` drives shuffling and
augmentation, so a run is reproducible given the initial weights.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from modelfold.cache import CACHE_ENV_VAR, cache_subdir
from modelfold.zoo import create_model

__all__ = [
    "CACHE_ENV_VAR",
    "augment_batch",
    "checkpoint_path",
    "default_cache_dir",
    "evaluate_accuracy",
    "pretrained_fashion_mnist",
    "train_classifier",
]

_PAD = 2


def _as_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """Return ``(x, y)`` tensors for a (possibly ``Subset``-wrapped) dataset."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, Subset):
        x, y = _as_tensors(dataset.dataset)
        idx = torch.as_tensor(dataset.indices, dtype=torch.long)
        return x[idx], y[idx]
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    xs = torch.stack([torch.as_tensor(a) for a, _ in items])
    ys = torch.as_tensor([int(b) for _, b in items], dtype=torch.long)
    return xs, ys


def augment_batch(x: Tensor, generator: torch.Generator) -> Tensor:
    """Zero-pad by 2, random crop back to the input size and random horizontal flip.

    Per-sample crop offsets are uniform in ``0..4`` and flips have p = 0.5; random numbers
    come from ``generator`` (CPU) and the crop is a single vectorised gather.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (_PAD, _PAD, _PAD, _PAD))
    oy = torch.randint(0, 2 * _PAD + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * _PAD + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    ar_h = torch.arange(h)
    ar_w = torch.arange(w)
    rows = oy[:, None] + ar_h  # (n, h)
    cols = ox[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (n, w)
    dev = x.device
    b = torch.arange(n, device=dev)[:, None, None]
    out = padded[b, :, rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def train_classifier(
    model: nn.Module,
    train_set: Dataset,
    *,
    epochs: int,
    batch_size: int = 256,
    max_lr: float = 0.1,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` in place with the reference recipe and return it (on ``device``).

    A final batch of a single sample is dropped (BatchNorm cannot train on it).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    x_all, y_all = _as_tensors(train_set)
    n = len(x_all)
    if n < 2:
        raise ValueError("need at least 2 training samples")
    n_batches = math.ceil(n / batch_size)
    drop_tail = n % batch_size == 1
    steps_per_epoch = n_batches - int(drop_tail)

    device = torch.device(device)
    model.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=max_lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=max_lr,
        total_steps=epochs * steps_per_epoch,
        cycle_momentum=False,
    )
    gen = torch.Generator().manual_seed(seed)

    bar = None
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        bar.start()
        task = bar.add_task(f"train {type(model).__name__}", total=epochs * steps_per_epoch)

    model.train()
    begin = time.perf_counter()
    try:
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            loss_sum = torch.zeros((), device=device)
            for step in range(steps_per_epoch):
                idx = perm[step * batch_size : (step + 1) * batch_size]
                xb = x_all[idx].to(device, non_blocking=True)
                yb = y_all[idx].to(device, non_blocking=True)
                xb = augment_batch(xb, gen)
                loss = F.cross_entropy(model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach()
                if bar is not None:
                    bar.advance(task)
            if bar is not None:
                mean_loss = loss_sum.item() / steps_per_epoch
                description = (f"train {type(model).__name__} "
                               f"epoch {epoch + 1}/{epochs} loss {mean_loss:.3f}")
                bar.update(task, description=description)
                if not bar.console.is_terminal:  # no live bar in a log: one line per epoch
                    bar.console.print(f"{description} ({time.perf_counter() - begin:.0f} s)")
    finally:
        if bar is not None:
            bar.stop()
    return model


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
) -> float:
    """Top-1 accuracy in ``[0, 1]`` of ``model`` (eval mode, no grad) on ``dataset``.

    ``device`` defaults to the device of the model's parameters (CPU if it has none). The
    model's train/eval mode is restored afterwards.
    """
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = 0
    total = 0
    try:
        if isinstance(dataset, (TensorDataset, Subset)):
            x_all, y_all = _as_tensors(dataset)
            batches = (
                (x_all[i : i + batch_size], y_all[i : i + batch_size])
                for i in range(0, len(x_all), batch_size)
            )
        else:
            batches = iter(DataLoader(dataset, batch_size=batch_size, shuffle=False))
        for xb, yb in batches:
            pred = model(xb.to(device)).argmax(1)
            correct += int((pred == yb.to(device)).sum())
            total += len(yb)
    finally:
        model.train(was_training)
    return correct / max(total, 1)


def default_cache_dir() -> Path:
    """Checkpoint directory: ``$MODELFOLD_CACHE/checkpoints`` (``~/.cache/modelfold/...``)."""
    return cache_subdir("checkpoints")


def checkpoint_path(
    name: str, *, width: int, epochs: int, seed: int = 0, cache_dir: str | Path | None = None,
    threads: int | None = None,
) -> Path:
    """Path of the cached safetensors checkpoint for a Fashion-MNIST zoo model.

    ``threads`` (a model trained with a pinned torch thread count) is part of the name: CPU
    training is bit-reproducible only for a given thread count.
    """
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    pinned = f"-t{threads}" if threads is not None else ""
    return base / f"fashion_mnist-{name}-w{width}-e{epochs}-s{seed}{pinned}.safetensors"


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` on a temp file in ``path``'s directory, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pretrained_fashion_mnist(
    name: str,
    *,
    width: int,
    epochs: int,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> nn.Module:
    """Return zoo model ``name`` trained on Fashion-MNIST, from cache or trained now.

    On a cache miss: ``torch.manual_seed(seed)``, ``create_model(name, width=width)``, train
    with :func:`train_classifier` (on ``device``), save the weights as safetensors plus a
    JSON sidecar (test accuracy, training time), both written atomically. The returned model
    is on CPU in eval mode and loaded from / identical to the cached weights. ``threads``
    trains with that many torch threads (restored afterwards) and keys the checkpoint by it,
    so the weights are the same bits on every run on the same machine.
    """
    from safetensors.torch import load_file, save_file

    from experiments.fashion_mnist import load_fashion_mnist

    path = checkpoint_path(name, width=width, epochs=epochs, seed=seed, cache_dir=cache_dir,
                           threads=threads)
    if path.is_file():
        model = create_model(name, width=width)
        model.load_state_dict(load_file(str(path)), strict=True)
        return model.eval()

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = create_model(name, width=width)
        train_set = load_fashion_mnist("train")
        start = time.perf_counter()
        train_classifier(model, train_set, epochs=epochs, seed=seed, device=device,
                         progress=progress)
        train_seconds = time.perf_counter() - start
        num_threads = torch.get_num_threads()
        accuracy = evaluate_accuracy(model, load_fashion_mnist("test"))
    finally:
        torch.set_num_threads(before)
    model.to("cpu").eval()

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "dataset": "fashion_mnist",
        "model": name,
        "width": width,
        "epochs": epochs,
        "seed": seed,
        "test_accuracy": accuracy,
        "train_seconds": round(train_seconds, 2),
        "device": str(device),
        "num_threads": num_threads,
        "torch_version": torch.__version__,
        "recipe": {
            "batch_size": 256,
            "max_lr": 0.1,
            "weight_decay": 5e-4,
            "optimizer": "sgd_nesterov_0.9",
            "schedule": "onecycle",
            "augment": "pad2_crop32_hflip",
        },
    }
    _atomic_write(
        path,
        lambda tmp: save_file(state, tmp, metadata={k: str(v) for k, v in meta.items()}),
    )
    _atomic_write(
        path.with_suffix(".json"),
        lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"),
    )
    return model
