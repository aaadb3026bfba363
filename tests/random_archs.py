"""Small random architectures built from JSON-serialisable specs (for tests/test_properties.py).

`build_model(**spec)` is importable as the factory "random_archs:build_model", so a spec drawn
by hypothesis doubles as `factory_kwargs` for `mf.save` / `mf.load`. Every model is seeded from
its spec (without touching the global RNG) and its norm layers get non-trivial statistics and
affine terms, as a trained model has.

Families: "mlp", "cnn", "resnet", "attention" (see the `_build_*` functions for the fields).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import modelfold as mf
from modelfold.zoo.vit import SelfAttention

BATCH = 2
MLP_IN, CNN_IN, TOKENS, TOKEN_IN, OUT = 8, (3, 8, 8), 5, 8, 5

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@mf.register_factory  # trusted by mf.load, like a user's own registered architecture
def build_model(family: str, seed: int, **arch: Any) -> nn.Module:
    """The (unfolded) model of a spec, deterministic in `seed`, in eval mode."""
    builders = {"mlp": _build_mlp, "cnn": _build_cnn, "resnet": _build_resnet,
                "attention": _build_attention}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builders[family](**arch)
        _randomize_norms(model, seed)
    return model.eval()


def example_inputs(spec: dict[str, Any]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 + spec["seed"])
    shape = {"mlp": (BATCH, MLP_IN), "cnn": (BATCH, *CNN_IN), "resnet": (BATCH, *CNN_IN),
             "attention": (BATCH, TOKENS, TOKEN_IN)}[spec["family"]]
    return torch.randn(*shape, generator=gen)


@torch.no_grad()
def _randomize_norms(model: nn.Module, seed: int) -> None:
    """Like conftest.randomize_norm_stats, plus LayerNorm affine terms."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def _build_mlp(widths: list[int], norm: str, act: str, dropout: bool) -> nn.Module:
    """Linear(widths[i-1] -> widths[i]) [-> BatchNorm1d | LayerNorm] -> act [-> Dropout]."""
    layers: list[nn.Module] = []
    prev = MLP_IN
    for w in widths:
        layers.append(nn.Linear(prev, w))
        if norm == "bn":
            layers.append(nn.BatchNorm1d(w))
        elif norm == "ln":
            layers.append(nn.LayerNorm(w))
        layers.append(_ACTS[act]())
        if dropout:
            layers.append(nn.Dropout(0.1))
        prev = w
    layers.append(nn.Linear(prev, OUT))
    return nn.Sequential(*layers)


def _build_cnn(layers: list[dict[str, Any]], head: str) -> nn.Module:
    """Per layer: Conv2d(channels, kernel, groups per `conv`) [-> BN2d] -> act [-> pool].

    `conv` is "full", "depthwise" (a groups=channels conv on the previous width, then a 1x1 conv
    to `channels`) or "grouped" (groups=2 with 1 < 2 < channels; modelfold cannot fold those).
    `head`: "flatten" (flatten -> Linear) or "gap" (global average pool -> Linear).
    """
    mods: list[nn.Module] = []
    prev, size = CNN_IN[0], CNN_IN[1]
    for layer in layers:
        c, k = layer["channels"], layer["kernel"]
        if layer["conv"] == "depthwise":
            mods.append(nn.Conv2d(prev, prev, k, padding=k // 2, groups=prev))
            mods.append(nn.Conv2d(prev, c, 1))
        elif layer["conv"] == "grouped" and prev % 2 == 0 and c % 2 == 0:
            mods.append(nn.Conv2d(prev, c, k, padding=k // 2, groups=2))
        else:
            mods.append(nn.Conv2d(prev, c, k, padding=k // 2))
        if layer["bn"]:
            mods.append(nn.BatchNorm2d(c))
        mods.append(_ACTS[layer["act"]]())
        if layer["pool"] != "none" and size >= 2:
            mods.append(nn.MaxPool2d(2) if layer["pool"] == "max" else nn.AvgPool2d(2))
            size //= 2
        prev = c
    if head == "gap":
        mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, OUT)]
    else:
        mods += [nn.Flatten(), nn.Linear(prev * size * size, OUT)]
    return nn.Sequential(*mods)


class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + (identity | 1x1 conv-BN) shortcut, add, ReLU."""

    def __init__(self, cin: int, mid: int, cout: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if shortcut == "identity" and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, stem: int, blocks: list[dict[str, Any]]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(CNN_IN[0], stem, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(stem), nn.ReLU())
        mods, prev = [], stem
        for b in blocks:
            mods.append(ResBlock(prev, b["mid"], b["out"], b["shortcut"]))
            prev = b["out"]
        self.blocks = nn.Sequential(*mods)
        self.head = nn.Linear(prev, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def _build_resnet(stem: int, blocks: list[dict[str, Any]]) -> nn.Module:
    """`blocks`: [{"mid": int, "out": int, "shortcut": "identity" | "conv"}, ...]; an identity
    shortcut between different widths becomes a 1x1 conv."""
    return ResNet(stem, blocks)


class TransformerBlock(nn.Module):
    """Pre-norm: x + attn(LN(x)); x + fc2(act(fc1(LN(x))))."""

    def __init__(self, dim: int, heads: int, hidden: int, attn: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn_kind = attn
        if attn == "mha":
            self.attn: nn.Module = nn.MultiheadAttention(dim, heads, batch_first=True)
        else:  # q/k/v/o projections + num_heads/head_dim: folded by modelfold's AttentionHandler
            self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.attn_kind == "mha":
            x = x + self.attn(h, h, h, need_weights=False)[0]
        else:
            x = x + self.attn(h)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Transformer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, depth: int, attn: str) -> None:
        super().__init__()
        self.embed = nn.Linear(TOKEN_IN, dim)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, hidden, attn)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(self.embed(x)))
        return self.head(x.mean(dim=1))


def _build_attention(dim: int, heads: int, hidden: int, depth: int, attn: str) -> nn.Module:
    """Tokens (BATCH, TOKENS, TOKEN_IN) -> Linear embed to `dim` -> `depth` transformer blocks
    (attn "qkvo": modelfold.zoo.vit.SelfAttention, "mha": nn.MultiheadAttention) -> LN -> mean
    over tokens -> Linear head."""
    return Transformer(dim, heads, hidden, depth, attn)
