"""IFM, INN, Neuron Merging, Intra-Fusion: real smaller models over the zoo, and the property
each paper claims (planted duplicates / scaled copies reproduced, smooth channel axes resampled
accurately)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import modelfold as mf
from conftest import ZOO, make_model
from helpers import n_params, plant_duplicates
from modelfold.baselines import ifm, inn, intra_fusion, magnitude_prune, neuron_merging
from modelfold.baselines.ifm import ifm_clusters
from modelfold.baselines.inn import (
    cubic_resample_matrix,
    path_length,
    smooth_order,
    trapezoid_weights,
)
from modelfold.budget import kept_channels
from modelfold.errors import FoldError

METHODS = {"ifm": ifm, "inn": inn, "neuron-merging": neuron_merging,
           "intra-fusion": intra_fusion}
NAMES = sorted(ZOO)


def close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> bool:
    out, ref = out.detach(), ref.detach()
    return float((out - ref).abs().max()) <= tol * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", NAMES)
def test_smaller_working_model_same_size_as_folding(method, name, example):
    model = make_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = METHODS[method](model, example, ratio=0.5)
    folded = mf.fold(model, example, ratio=0.5)
    assert n_params(out) == n_params(folded) < n_params(model)  # same groups, same k
    assert out(example).shape == model(example).shape
    assert torch.isfinite(out(example)).all()
    s = mf.summary(model, out, example)
    assert s.params_after == n_params(out)
    assert all(g.k == kept_channels(g.n, 0.5) for g in s.groups if g.status == "folded")
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_ratio_zero_is_identity(method, name, example):
    model = make_model(name)
    out = METHODS[method](model, example, ratio=0.0)
    assert n_params(out) == n_params(model)
    assert close(out(example), model(example), 1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_ifm_merges_planted_duplicates_exactly(name, example):
    model = make_model(name)
    assert plant_duplicates(model, example) > 0
    out = ifm(model, example, ratio=0.5)
    assert n_params(out) < n_params(model)
    assert close(out(example), model(example))


def test_ifm_merges_closest_pairs_with_sum_and_count_weighted_mean():
    producer = torch.tensor([[0.0], [0.1], [5.0], [9.0]], dtype=torch.float64)
    consumer = torch.zeros(4, 0, dtype=torch.float64)
    # 0+1 merge first (distance 0.01); the merged row is their SUM 0.1, so it is still far from 5
    assert ifm_clusters(producer, consumer, 3) == [[0, 1], [2], [3]]
    # next: 5 and 9 (16) are closer than 0.1 and 5 (24.01)
    assert ifm_clusters(producer, consumer, 2) == [[0, 1], [2, 3]]


class ScaledTwins(nn.Module):
    """conv -> BN -> ReLU -> conv; channels 4..7 are positive multiples of channels 0..3 after
    BN (raw filters scaled by s, BN mean by s, variance by s^2: the BN output is identical), and
    their consumer columns differ."""

    def __init__(self, with_bn: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=not with_bn)
        self.bn = nn.BatchNorm2d(8, eps=1e-12) if with_bn else nn.Identity()
        self.conv2 = nn.Conv2d(8, 5, 3, padding=1)
        scale = torch.tensor([0.5, 0.3, 0.7, 0.4], dtype=torch.float64)
        with torch.no_grad():
            w = self.conv1.weight
            w[4:] = (w[:4].double() * scale.view(-1, 1, 1, 1)).float()
            if with_bn:
                self.bn.running_mean.copy_(torch.randn(8) * 0.1)
                self.bn.running_var.copy_(torch.rand(8) + 0.5)
                self.bn.weight.copy_(torch.rand(8) + 0.5)
                self.bn.bias.copy_(torch.randn(8) * 0.1)
                self.bn.running_mean[4:] = self.bn.running_mean[:4] * scale.float()
                self.bn.running_var[4:] = self.bn.running_var[:4] * scale.float() ** 2
                self.bn.weight[4:] = self.bn.weight[:4]
                self.bn.bias[4:] = self.bn.bias[:4]
            else:
                self.conv1.bias[4:] = self.conv1.bias[:4] * scale.float()

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


@pytest.mark.parametrize("with_bn", [False, True])
def test_neuron_merging_reproduces_scaled_copies_exactly(with_bn, example):
    model = ScaledTwins(with_bn).eval()
    out = neuron_merging(model, example, ratio=0.5)
    assert out.conv1.out_channels == 4
    assert close(out(example), model(example))
    pruned = magnitude_prune(model, example, ratio=0.5)  # the same kept set, no compensation
    assert not close(pruned(example), model(example), 1e-2)


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "bn_mlp"])
def test_neuron_merging_without_matches_is_sp_l1(name, example):
    model = make_model(name)
    merged = neuron_merging(model, example, ratio=0.5, threshold=1.0)  # nothing is that similar
    pruned = magnitude_prune(model, example, ratio=0.5, p=1)
    assert close(merged(example), pruned(example), 1e-5)


def test_neuron_merging_threshold_is_checked(example):
    with pytest.raises(FoldError, match="threshold"):
        neuron_merging(make_model("resnet18"), example, ratio=0.5, threshold=2.0)


class WeakTwins(nn.Module):
    """Linear -> ReLU -> Linear; hidden 4..7 copy the producer rows of 0..3 with consumer
    columns scaled by 0.3. Rows share one L1 norm and so do the columns of 0..3, so the twins
    are the less important channels by any magnitude criterion."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)
        with torch.no_grad():
            w = self.fc1.weight
            w.copy_(2 * w / w.abs().sum(1, keepdim=True))
            w[4:] = w[:4]
            self.fc1.bias[4:] = self.fc1.bias[:4]
            c = self.fc2.weight
            c.copy_(0.5 * c / c.abs().sum(0, keepdim=True))
            c[:, 4:] = 0.3 * c[:, :4]

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_intra_fusion_fuses_twins_exactly():
    model = WeakTwins().eval()
    x = torch.randn(16, 6)
    out = intra_fusion(model, x, ratio=0.5)
    assert out.fc1.out_features == 4
    assert close(out(x), model(x))
    pruned = magnitude_prune(model, x, ratio=0.5)
    assert not close(pruned(x), model(x), 1e-2)


def test_ifm_merges_twins_whatever_their_consumer_columns():
    model = WeakTwins().eval()
    x = torch.randn(16, 6)
    assert close(ifm(model, x, ratio=0.5)(x), model(x))


def test_cubic_resampling_is_identity_at_full_width_and_accurate_on_smooth_axes():
    assert torch.allclose(cubic_resample_matrix(9, 9), torch.eye(9, dtype=torch.float64))
    m = cubic_resample_matrix(64, 23)
    assert torch.allclose(m.sum(1), torch.ones(23, dtype=torch.float64))  # constants kept
    t, s = (torch.linspace(-1, 1, n, dtype=torch.float64) for n in (64, 23))
    assert float((m @ torch.sin(3 * t) - torch.sin(3 * s)).abs().max()) < 5e-3
    for n in (2, 5, 64):
        assert float(trapezoid_weights(n).sum()) == pytest.approx(2.0)


def test_two_opt_recovers_a_shuffled_smooth_order():
    x = torch.linspace(0, 1, 120, dtype=torch.float64)
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(0))
    points = torch.stack([x, x**2], dim=1)[perm]
    dist = torch.cdist(points, points, p=1)
    order = smooth_order(dist, restarts=2)
    assert sorted(order) == list(range(120))
    assert path_length(dist, order) == pytest.approx(path_length(dist, torch.argsort(perm)))


class IntegralMLP(nn.Module):
    """Hidden channels sample a continuous layer: y = int c(t) relu(a(t) x + b(t)) dt on [-1, 1]
    at n points (trapezoid weights), in shuffled order."""

    def __init__(self, n: int = 64) -> None:
        super().__init__()
        t = torch.linspace(-1, 1, n, dtype=torch.float64)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        self.fc1 = nn.Linear(1, n)
        self.fc2 = nn.Linear(n, 1)
        with torch.no_grad():
            self.fc1.weight.copy_((1 + 0.5 * torch.sin(2 * t)).view(n, 1)[perm])
            self.fc1.bias.copy_((0.3 * torch.cos(3 * t))[perm])
            self.fc2.weight.copy_((torch.cos(t) * trapezoid_weights(n)).view(1, n)[:, perm])
            self.fc2.bias.zero_()

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_inn_resamples_a_smooth_channel_axis_accurately():
    model = IntegralMLP().eval()
    x = torch.linspace(-2, 2, 41).view(-1, 1)
    out = inn(model, x, ratio=0.5)
    pruned = magnitude_prune(model, x, ratio=0.5)
    assert out.fc1.out_features == 32
    with torch.no_grad():
        ref = model(x)
        err = float((out(x) - ref).abs().max() / ref.abs().max())
        assert err < 0.01
        assert float((pruned(x) - ref).abs().max() / ref.abs().max()) > 10 * err


@pytest.mark.parametrize("method", sorted(METHODS))
def test_module_ratios_and_deterministic(method, example):
    model = make_model("resnet18")
    ratios = {"layer4.0.conv1": 0.5}
    a = METHODS[method](model, example, ratio=0.0, module_ratios=ratios)
    b = METHODS[method](copy.deepcopy(model), example, ratio=0.0, module_ratios=ratios)
    assert a.layer4[0].conv1.out_channels == kept_channels(model.layer4[0].conv1.out_channels,
                                                          0.5)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("method", sorted(METHODS))
def test_save_load_round_trip(method, example, tmp_path):
    from modelfold.zoo import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", width=8).eval()  # remembers its factory
    out = METHODS[method](model, example, ratio=0.4)
    mf.save(out, tmp_path / "m")
    again = mf.load(tmp_path / "m")
    assert torch.equal(again(example), out.eval()(example))
    assert mf.summary(None, again).params_after == n_params(out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_matches_cpu(method, example):
    model = make_model("resnet18")
    cpu = METHODS[method](model, example, ratio=0.5)
    gpu = METHODS[method](copy.deepcopy(model).cuda(), example.cuda(), ratio=0.5)
    assert next(gpu.parameters()).device.type == "cuda"
    with torch.no_grad():
        assert (gpu(example.cuda()).cpu() - cpu(example)).abs().max() <= 1e-3
