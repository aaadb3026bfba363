"""Folding over the model zoo: shapes, sizes, identity, exactness, determinism, no mutation."""

from __future__ import annotations

import copy

import pytest
import torch

import modelfold as mf
from conftest import ZOO, make_model
from helpers import n_params, plant_duplicates
from modelfold.budget import kept_channels

NAMES = sorted(ZOO)


@pytest.mark.parametrize("name", NAMES)
def test_fold_half_gives_smaller_working_model(name, example):
    model = make_model(name)
    folded = mf.fold(model, example, ratio=0.5)
    out = folded(example)
    assert out.shape == model(example).shape == (2, 10)
    assert torch.isfinite(out).all()
    s = mf.summary(model, folded, example)
    assert s.params_after == n_params(folded) < n_params(model) == s.params_before
    assert s.macs_after < s.macs_before
    folded_groups = [g for g in s.groups if g.status == "folded"]
    assert folded_groups, "at least one group must be folded"
    for g in folded_groups:
        assert g.k == kept_channels(g.n, 0.5)
    # module metadata follows the weights: the model is really smaller, not zero-padded
    for m in folded.modules():
        if isinstance(m, torch.nn.Conv2d):
            assert m.weight.shape[0] == m.out_channels
            assert m.weight.shape[1] * m.groups == m.in_channels
        if isinstance(m, torch.nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features)
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean.shape == (m.num_features,)


@pytest.mark.parametrize("name", NAMES)
def test_ratio_zero_is_identity(name, example):
    model = make_model(name)
    folded = mf.fold(model, example, ratio=0.0)
    assert n_params(folded) == n_params(model)
    assert (folded(example) - model(example)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_planted_duplicates_fold_losslessly(name, example):
    model = make_model(name)
    assert plant_duplicates(model, example) > 0
    folded = mf.fold(model, example, ratio=0.5)
    assert n_params(folded) < n_params(model)
    ref, out = model(example), folded(example)
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("name", NAMES)
def test_input_model_is_untouched(name, example):
    model = make_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = repr(model)
    model.train()
    mf.fold(model, example, ratio=0.5)
    assert model.training
    assert repr(model) == structure
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_inplace_folds_the_model_itself(example):
    model = make_model("resnet18")
    folded = mf.fold(model, example, ratio=0.5, inplace=True)
    assert folded is model
    assert model.linear.in_features == 32  # 8 * width 8 -> 64 channels, half kept


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_same_seed_same_weights(name, example):
    model = make_model(name)
    a = mf.fold(model, example, ratio=0.5, seed=3).state_dict()
    b = mf.fold(copy.deepcopy(model), example, ratio=0.5, seed=3).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_target_sparsity_is_reached_within_one_point(target, example):
    model = make_model("resnet18")
    folded = mf.fold(model, example, target_sparsity=target)
    s = mf.summary(model, folded, example)
    assert abs(s.sparsity - target) <= 0.01
    assert 0 < s.ratio < 1


def test_round_to_gives_multiples_and_keeps_planted_duplicates_lossless(example):
    model = make_model("vgg11_bn")  # zoo width 16: every group keeps 8 or 16 channels
    plant_duplicates(model, example)
    folded = mf.fold(model, example, config=mf.FoldConfig(ratio=0.4, round_to=8))
    widths = [m.out_channels for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths and all(w % 8 == 0 for w in widths)
    assert n_params(folded) < n_params(model)
    assert (folded(example) - model(example)).abs().max() <= 1e-4


def test_unreachable_target_sparsity_is_a_clear_error(example):
    model = make_model("bn_mlp")  # the 3072-wide input layer is never folded
    with pytest.raises(mf.FoldError, match="unreachable"):
        mf.fold(model, example, target_sparsity=0.99)


def test_residual_stream_is_folded_as_one_group(example):
    model = make_model("resnet18")
    folded = mf.fold(model, example, ratio=0.5)
    groups = mf.summary(model, folded, example).groups
    stream = [g for g in groups if "layer1.1.bn2" in g.modules]  # bn2 only produces
    assert len(stream) == 1
    # the stem, both layer1 blocks' outputs and the next stage's inputs share the clustering
    assert {"conv1", "bn1", "layer1.0.bn2", "layer1.1.bn2", "layer2.0.conv1"} <= set(
        stream[0].modules)
    assert folded.layer1[0].conv2.out_channels == folded.conv1.out_channels == 4


def test_output_and_input_dimensions_are_never_folded(example):
    model = make_model("vgg11_bn")
    folded = mf.fold(model, example, ratio=0.9)
    assert folded.features[0].in_channels == 3
    assert folded.classifier.out_features == 10


def test_module_ratios_override_the_global_ratio(example):
    model = make_model("vgg11_bn")
    folded = mf.fold(model, example, ratio=0.0, module_ratios={"features.0": 0.5})
    assert folded.features[0].out_channels == 4
    assert folded.features[4].out_channels == 16  # untouched


def test_ignored_modules_keep_their_groups(example):
    model = make_model("vgg11_bn")
    folded = mf.fold(model, example, ratio=0.5, ignored=[model.features[0]])
    assert folded.features[0].out_channels == 8
    assert folded.features[4].out_channels == 8


def test_attention_heads_are_folded_as_units(example):
    model = make_model("vit_tiny")
    folded = mf.fold(model, example, ratio=0.5)
    attn = folded.blocks[0].attn
    assert attn.num_heads == 2
    assert attn.q_proj.out_features == attn.o_proj.in_features == 2 * attn.head_dim
    assert attn.q_proj.in_features == folded.patch_embed.out_channels == 16


@pytest.mark.parametrize("clusterer", ["ward", "hartigan"])
def test_other_clusterers_fold_planted_duplicates_losslessly(clusterer, example):
    model = make_model("resnet18")
    plant_duplicates(model, example)
    folded = mf.fold(model, example, config=mf.FoldConfig(ratio=0.5, clusterer=clusterer))
    assert (folded(example) - model(example)).abs().max() <= 1e-4


@pytest.mark.parametrize("features", ["producer", "full"])
def test_feature_sets_and_block_normalisation(features, example):
    model = make_model("mobilenet_v2")
    plant_duplicates(model, example)
    cfg = mf.FoldConfig(ratio=0.5, features=features, normalize_blocks=True)
    folded = mf.fold(model, example, config=cfg)
    assert (folded(example) - model(example)).abs().max() <= 1e-4


def test_dict_and_tuple_example_inputs():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 8)
            self.b = torch.nn.Linear(8, 3)

        def forward(self, x, scale):
            return self.b(torch.relu(self.a(x))) * scale

    model = TwoInputs().eval()
    x, scale = torch.randn(2, 4), torch.ones(2, 1)
    for inputs in [(x, scale), {"x": x, "scale": scale}]:
        folded = mf.fold(model, inputs, ratio=0.5)
        assert folded.a.out_features == 4
        assert folded(x, scale).shape == (2, 3)
