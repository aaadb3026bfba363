"""Couplings modelfold cannot fold exactly are refused or left unfolded, never folded wrongly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modelfold as mf
from conftest import make_model
from helpers import plant_duplicates


class ChannelsLastFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).permute(0, 2, 3, 1).flatten(1))


class PlainAttention(nn.Module):
    """Attention written with matmuls and layer names modelfold does not recognise."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape

        def split(t):
            return t.view(b, n, self.heads, -1).transpose(1, 2)

        a = (split(self.q(x)) @ split(self.k(x)).transpose(-2, -1)).softmax(-1)
        return self.o((a @ split(self.v(x))).transpose(1, 2).reshape(b, n, -1))


def test_flatten_after_permute_is_not_folded():
    model = ChannelsLastFlatten().eval()
    x = torch.randn(2, 3, 3, 3)
    folded = mf.fold(model, x, ratio=0.5)
    assert folded.conv.out_channels == 6
    assert torch.equal(folded(x), model(x))
    status = {g.name: g.status for g in mf.summary(model, folded, x).groups}
    assert status["conv"] == "unsafe"


def test_unrecognised_attention_is_never_folded_across_heads():
    model = nn.Sequential(nn.Linear(8, 16), PlainAttention(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 5, 8)
    plant_duplicates(model, x)  # only in the groups modelfold considers foldable
    folded = mf.fold(model, x, ratio=0.5)
    attn = folded[1]
    assert attn.q.out_features == attn.k.out_features == attn.v.out_features == 16
    assert folded[0].out_features == 8  # the model-width stream is folded...
    assert (folded(x) - model(x)).abs().max() < 1e-5  # ...and exactly


def test_tied_weights_are_a_clear_error():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 8)
            self.b.weight = self.a.weight
            self.out = nn.Linear(16, 2)

        def forward(self, x):
            return self.out(torch.cat([self.a(x), self.b(x)], 1))

    with pytest.raises(mf.FoldError, match="tied weights"):
        mf.fold(Tied().eval(), torch.randn(2, 4), ratio=0.5)


def test_features_returned_as_outputs_are_not_folded():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            feat = self.conv(x)
            return {"logits": self.head(feat.mean((2, 3))), "feat": feat}

    model = TwoHeads().eval()
    folded = mf.fold(model, torch.randn(2, 3, 8, 8), ratio=0.5)
    assert folded.conv.out_channels == 8


def test_module_ratios_apply_to_the_groups_a_module_writes():
    model = make_model("vgg11_bn")
    x = torch.randn(2, 3, 32, 32)
    folded = mf.fold(model, x, ratio=0.5, module_ratios={"features.4": 0.0})
    assert folded.features[4].out_channels == 16  # its own group: untouched
    assert folded.features[0].out_channels == 4  # the group it consumes: folded at 0.5
    with pytest.raises(mf.FoldError, match="classifier"):
        mf.fold(model, x, ratio=0.5, module_ratios={"classifier": 0.2})  # writes the output


def test_fold_twice_save_and_load(tmp_path, example):
    model = make_model("vit_tiny")
    once = mf.fold(model, example, ratio=0.5)
    mf.save(once, tmp_path / "once")
    twice = mf.fold(mf.load(tmp_path / "once"), example, ratio=0.5)
    mf.save(twice, tmp_path / "twice")
    again = mf.load(tmp_path / "twice")
    assert again.blocks[0].attn.num_heads == 1
    assert torch.equal(again(example), twice(example))


def test_half_precision_round_trip(tmp_path, example):
    model = make_model("resnet18").double()
    folded = mf.fold(model, example.double(), ratio=0.5)
    mf.save(folded, tmp_path / "f")
    again = mf.load(tmp_path / "f")
    assert next(again.parameters()).dtype == torch.float64
    assert torch.equal(again(example.double()), folded(example.double()))
