"""Calibration inputs the model synthesises itself (no external data).

* Networks with BatchNorm (`invert_batchnorm`): DeepInversion-style images whose per-layer
  batch statistics match the BN running statistics, made fast enough for a CPU: a lower
  resolution than the example (statistics are per channel, so they transfer across sizes),
  a scale-free loss (each layer's mean and standard deviation gaps in units of its running
  standard deviation, so no layer or input range dominates), an input scale found first by a
  grid search on the BN loss (a model trained on 0-255 pixels and one trained on standardised
  inputs both start in range) and a few hundred Adam steps with jitter and flips.
* Models fed token ids (`sample_tokens`): sequences of ids drawn from the word-embedding table
  the model indexes, restricted to rows whose norm looks trained (reserved / unused vocabulary
  rows keep small initial norms), with the example's first and last token (e.g. [CLS] / [SEP])
  kept in place and every other integer input (attention mask, token types) taken from the
  example's first row.
* Anything else: standard-normal inputs shaped like the example, rescaled to its mean and
  standard deviation.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelfold.errors import FoldError

SAMPLES = 32  # calibration images (or Gaussian inputs) per fold
TOKEN_SAMPLES = 128  # calibration sequences per fold for token models (cheap to run)
IMAGE_SIDE = 96  # images are synthesised at most this large (per side)
STEPS = 150
LR = 0.1
TV_WEIGHT = 1e-4
TOKENS = 32  # sequence length for token models when the example is shorter


def synthetic_inputs(model: nn.Module, example: Any, *, samples: int | None = None,
                     seed: int = 0, steps: int = STEPS) -> Any:
    """`samples` calibration inputs shaped like `example` (batch dimension first), chosen by
    what the model is: BN statistics inversion, sampled tokens, or Gaussian noise (default:
    TOKEN_SAMPLES sequences or SAMPLES inputs)."""
    token_key, ids = _token_ids(example)
    if ids is not None:
        return sample_tokens(model, example, token_key, samples=samples or TOKEN_SAMPLES,
                             seed=seed)
    samples = samples or SAMPLES
    x = example if isinstance(example, torch.Tensor) else None
    if x is None:
        raise FoldError("self_calibrate: `example_inputs` must be one tensor (images, "
                        "features) or token ids (a tensor of integers or a dict holding "
                        "`input_ids`) to synthesise calibration inputs from.")
    if _batchnorms(model) and x.ndim >= 3:
        return invert_batchnorm(model, tuple(x.shape[1:]), samples=samples, seed=seed,
                                steps=steps)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, *x.shape[1:]), generator=gen).to(x.device, x.dtype)
    std = float(x.float().std()) if x.numel() > 1 else 1.0
    return noise * (std if std > 0 else 1.0) + float(x.float().mean())


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is not None and m.running_var is not None]


def _bn_loss_hook(losses: list[torch.Tensor]):
    def hook(module, inputs, _output):
        x = inputs[0]
        dims = [d for d in range(x.ndim) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        std_run = (module.running_var + module.eps).sqrt()
        gap = ((mean - module.running_mean) / std_run).pow(2) \
            + ((var + module.eps).sqrt() / std_run - 1).pow(2)
        losses.append(gap.mean())
    return hook


def invert_batchnorm(model: nn.Module, input_shape: tuple[int, ...], *, samples: int = SAMPLES,
                     seed: int = 0, steps: int = STEPS, side: int = IMAGE_SIDE) -> torch.Tensor:
    """`samples` inputs of shape `input_shape` (C, H, ...) whose BN batch statistics match the
    model's running statistics (optimised at a side of at most `side`, then resized)."""
    probe = copy.deepcopy(model).eval()
    for p in probe.parameters():
        p.requires_grad_(False)
    device = next(probe.parameters()).device
    spatial = input_shape[1:]
    scale_down = min(1.0, side / max(spatial))
    small = tuple(max(8, round(s * scale_down)) for s in spatial)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, input_shape[0], *small), generator=gen).to(device)
    losses: list[torch.Tensor] = []
    handles = [m.register_forward_hook(_bn_loss_hook(losses)) for m in _batchnorms(probe)]

    def bn_loss(x: torch.Tensor) -> torch.Tensor:
        losses.clear()
        out = probe(x)
        return sum(losses) / len(losses), out

    try:
        with torch.no_grad():  # input range: the scale whose noise best fits the BN statistics
            scales = [10.0 ** e for e in torch.linspace(-2, 3, 11).tolist()]
            scale = min(scales, key=lambda s: float(bn_loss(noise * s)[0]))
        u = noise.clone().requires_grad_(True)
        shift = torch.zeros((1, input_shape[0], *([1] * len(small))), device=device,
                            requires_grad=True)
        optimizer = torch.optim.Adam([u, shift], lr=LR, betas=(0.5, 0.9))
        targets = torch.randint(_classes(probe, noise[:1] * scale), (samples,),
                                generator=gen).to(device)
        moves = torch.randint(-2, 3, (steps, 2), generator=gen).tolist()
        flips = torch.rand(steps, generator=gen).lt(0.5).tolist()
        best, best_loss = (u.detach() + shift.detach()) * scale, math.inf
        with torch.enable_grad():
            for step in range(steps):
                x = (u + shift) * scale
                view = torch.roll(x, shifts=tuple(moves[step][:len(small)]),
                                  dims=tuple(range(2, 2 + min(2, len(small)))))
                if flips[step]:
                    view = view.flip(-1)
                loss, out = bn_loss(view)
                logits = out if isinstance(out, torch.Tensor) and out.ndim == 2 else None
                total = loss + TV_WEIGHT * _tv(u)
                if logits is not None:
                    total = total + 0.1 * F.cross_entropy(logits, targets)
                value = float(loss.detach())
                if value < best_loss:
                    best_loss, best = value, x.detach().clone()
                optimizer.zero_grad()
                total.backward()
                optimizer.step()
    finally:
        for h in handles:
            h.remove()
    if tuple(best.shape[2:]) != tuple(spatial):
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}.get(len(spatial), "nearest")
        best = F.interpolate(best, size=tuple(spatial), mode=mode, align_corners=False)
    return best


def _classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        out = model(x)
    return int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.ndim == 2 else 1


def _tv(x: torch.Tensor) -> torch.Tensor:
    if x.ndim < 4:
        return x.new_zeros(())
    return ((x[..., 1:, :] - x[..., :-1, :]).pow(2).mean()
            + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean())


def _token_ids(example: Any) -> tuple[str | None, torch.Tensor | None]:
    if isinstance(example, torch.Tensor):
        return (None, example) if not example.is_floating_point() and example.ndim == 2 \
            else (None, None)
    if isinstance(example, dict) and isinstance(example.get("input_ids"), torch.Tensor):
        return "input_ids", example["input_ids"]
    return None, None


def _word_embedding(model: nn.Module, ids: torch.Tensor) -> nn.Embedding:
    top = int(ids.max()) if ids.numel() else 0
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)
              and m.num_embeddings > top]
    if not tables:
        raise FoldError("self_calibrate: the model has no nn.Embedding that the example's "
                        "token ids index; cannot sample calibration tokens.")
    return max(tables, key=lambda m: m.num_embeddings)


def _position_limit(model: nn.Module, table: nn.Embedding) -> int | None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is None:
        for name, m in model.named_modules():
            if isinstance(m, nn.Embedding) and m is not table and "position" in name:
                limit = m.num_embeddings
    return int(limit) if limit else None


def sample_tokens(model: nn.Module, example: Any, key: str | None, *, samples: int = SAMPLES,
                  seed: int = 0) -> Any:
    """Token sequences for a model fed ids (see the module docstring)."""
    ids = example[key] if key is not None else example
    table = _word_embedding(model, ids)
    norms = table.weight.detach().float().norm(dim=1)
    usable = (norms >= 0.5 * norms.median()).nonzero().flatten()
    if table.padding_idx is not None:
        usable = usable[usable != table.padding_idx]
    length = max(int(ids.shape[1]), TOKENS)
    limit = _position_limit(model, table)
    if limit is not None:
        length = min(length, limit)
    first, last = ids[0, 0], ids[0, -1]
    special = {int(first), int(last)}
    usable = usable[~torch.isin(usable, torch.tensor(sorted(special), device=usable.device))]
    gen = torch.Generator().manual_seed(seed)
    picks = usable.cpu()[torch.randint(usable.numel(), (samples, length), generator=gen)]
    picks[:, 0], picks[:, -1] = int(first), int(last)
    picks = picks.to(ids.device, ids.dtype)
    if key is None:
        return picks
    out = {}
    for name, value in example.items():
        if name == key:
            out[name] = picks
        elif isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape == ids.shape:
            fill = torch.mode(value[0].flatten()).values
            out[name] = torch.full((samples, length), int(fill), dtype=value.dtype,
                                   device=value.device)
        elif isinstance(value, torch.Tensor) and value.ndim >= 1:
            out[name] = value[:1].expand(samples, *value.shape[1:]).clone()
        else:
            out[name] = value
    return out
