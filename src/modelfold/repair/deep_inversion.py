"""Fold-DIR data: DeepInversion images synthesised from the original model's BN statistics.

Yin et al., "Dreaming to Distill" (CVPR 2020), as configured by the folding paper's code:
inputs start as N(0, 1) noise and are optimised with Adam against random labels, with
cross-entropy + w_bn * sum over BN layers of (|var_batch - var_run|_2 + |mean_batch - mean_run|_2)
measured on each BN's input + w_tv * total variation (L2 norms of horizontal, vertical and both
diagonal differences) + w_l2 * |x|_2, each step on a randomly jittered (rolled) copy. The batch
with the lowest loss is kept. Results are cached by a hash of the model weights and the settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelfold.cache import cache_subdir
from modelfold.errors import FoldError


@dataclass
class DeepInversionConfig:
    """Defaults are the reference's; `DeepInversionConfig.preset("cpu")` is a fast variant."""

    num_images: int = 256
    steps: int = 4000
    lr: float = 1.5e-3
    bn_weight: float = 1e4
    tv_weight: float = 2.5e-6
    l2_weight: float = 0.2
    jitter: int = 2
    batch_size: int = 256  # images optimised together (memory bound)
    seed: int = 0
    cache: bool = True

    @classmethod
    def preset(cls, name: str) -> DeepInversionConfig:
        presets = {
            "paper": cls(),
            "cpu": cls(num_images=128, steps=200, lr=0.05, batch_size=128),
        }
        if name not in presets:
            raise FoldError(f"unknown DeepInversion preset {name!r}; known: {sorted(presets)}.")
        return presets[name]

    def validate(self) -> None:
        for key in ("num_images", "steps", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FoldError(f"deep_inversion.{key} must be a positive integer, got {value!r}.")
        if self.lr <= 0:
            raise FoldError(f"deep_inversion.lr must be positive, got {self.lr}.")


def total_variation(x: torch.Tensor) -> torch.Tensor:
    dh = x[..., :, 1:] - x[..., :, :-1]
    dv = x[..., 1:, :] - x[..., :-1, :]
    d1 = x[..., 1:, 1:] - x[..., :-1, :-1]
    d2 = x[..., 1:, :-1] - x[..., :-1, 1:]
    return sum(torch.linalg.vector_norm(d) for d in (dh, dv, d1, d2))


def bn_input_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x.ndim) if d != 1]
    return x.mean(dims), x.var(dims, unbiased=False)


def bn_statistics_gap(model: nn.Module, images: torch.Tensor) -> float:
    """Sum over BN layers of |mean - running_mean| + |var - running_var| on the BN inputs."""
    losses: list[torch.Tensor] = []
    handles = [m.register_forward_hook(_bn_hook(losses)) for m in _bns(model)]
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for h in handles:
            h.remove()
    return float(sum(losses))


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is not None]


def _bn_hook(losses: list[torch.Tensor]):
    def fn(module, inputs, output):
        mean, var = bn_input_statistics(inputs[0])
        losses.append(torch.linalg.vector_norm(var - module.running_var)
                      + torch.linalg.vector_norm(mean - module.running_mean))
    return fn


def _weights_hash(model: nn.Module, cfg: DeepInversionConfig, shape: tuple[int, ...]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache"}
    digest.update(json.dumps([settings, list(shape)], sort_keys=True).encode())
    return digest.hexdigest()[:32]


def cache_dir() -> Path:
    """Where synthesised images are cached: ``$MODELFOLD_CACHE/deep_inversion``."""
    return cache_subdir("deep_inversion")


def synthesize(model: nn.Module, input_shape: tuple[int, ...], num_classes: int,
               cfg: DeepInversionConfig, *, progress: bool = True) -> torch.Tensor:
    """`cfg.num_images` synthetic inputs of shape `input_shape` (C, H, W) for `model`."""
    cfg.validate()
    if not _bns(model):
        raise FoldError("deep_inversion needs BatchNorm layers with running statistics to "
                        "invert; this model has none. Use repair='data' or 'approx'.")
    device = next(model.parameters()).device
    key = _weights_hash(model, cfg, input_shape)
    path = cache_dir() / f"{key}.pt"
    if cfg.cache and path.is_file():
        return torch.load(path, map_location=device, weights_only=True)
    probe = _clone_frozen(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    chunks = []
    for start in range(0, cfg.num_images, cfg.batch_size):
        n = min(cfg.batch_size, cfg.num_images - start)
        chunks.append(_invert_batch(probe, (n, *input_shape), num_classes, cfg, gen, device,
                                    progress, f"DeepInversion {start + n}/{cfg.num_images}"))
    images = torch.cat(chunks)
    if cfg.cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        torch.save(images.cpu(), tmp)
        os.replace(tmp, path)
    return images


class _NoBar:
    """Stands in for a rich progress bar where rich is not installed (a core-only install)."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None) -> int:
        return 0

    def advance(self, task: int, advance: float = 1) -> None:
        return None


def _progress_bar(show: bool) -> Any:
    """A transient rich bar with elapsed and remaining time, or a silent stand-in."""
    if not show:
        return _NoBar()
    try:
        from rich.progress import Progress, TimeElapsedColumn
    except ImportError:
        return _NoBar()
    return Progress(*Progress.get_default_columns(), TimeElapsedColumn(), transient=True)


def _clone_frozen(model: nn.Module) -> nn.Module:
    import copy

    probe = copy.deepcopy(model).eval()
    for p in probe.parameters():
        p.requires_grad_(False)
    return probe


def _invert_batch(model: nn.Module, shape: tuple[int, ...], num_classes: int,
                  cfg: DeepInversionConfig, gen: torch.Generator, device: torch.device,
                  progress: bool, label: str) -> torch.Tensor:
    x = torch.randn(shape, generator=gen).to(device).requires_grad_(True)
    targets = torch.randint(num_classes, (shape[0],), generator=gen).to(device)
    shifts = torch.randint(-cfg.jitter, cfg.jitter + 1, (cfg.steps, 2), generator=gen).tolist()
    optimizer = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
    losses: list[torch.Tensor] = []
    handles = [m.register_forward_hook(_bn_hook(losses)) for m in _bns(model)]
    best, best_loss = x.detach().clone(), float("inf")
    try:
        with torch.enable_grad(), _progress_bar(progress) as bar:
            task = bar.add_task(label, total=cfg.steps)
            for step in range(cfg.steps):
                dx, dy = shifts[step]
                optimizer.zero_grad()
                losses.clear()
                jittered = torch.roll(x, shifts=(dx, dy), dims=(-2, -1)) if x.ndim >= 3 else x
                logits = model(jittered)
                loss = (F.cross_entropy(logits, targets) + cfg.bn_weight * sum(losses)
                        + cfg.tv_weight * total_variation(jittered)
                        + cfg.l2_weight * torch.linalg.vector_norm(jittered))
                value = float(loss.detach())
                if value < best_loss:
                    best_loss, best = value, x.detach().clone()
                loss.backward()
                optimizer.step()
                bar.advance(task)
    finally:
        for h in handles:
            h.remove()
    return best
