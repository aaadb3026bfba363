"""FoldConfig: validation and JSON round trip; argument errors of fold()."""

from __future__ import annotations

import pytest
import torch

import modelfold as mf
from conftest import make_model
from modelfold.budget import kept_channels


def test_json_round_trip():
    cfg = mf.FoldConfig(ratio=0.3, module_ratios={"features.0": 0.1}, clusterer="ward",
                        features="producer", normalize_blocks=True, n_init=5, seed=7)
    again = mf.FoldConfig.from_json(cfg.to_json())
    assert again == cfg


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"ratio": 0.5, "target_sparsity": 0.5}, "exactly one"),
    ({"ratio": 1.0}, r"\[0, 1\)"),
    ({"ratio": -0.1}, r"\[0, 1\)"),
    ({"ratio": float("nan")}, r"\[0, 1\)"),
    ({"ratio": "0.5"}, "must be a number"),
    ({"ratio": True}, "must be a number"),
    ({"ratio": 0.5, "clusterer": "dbscan"}, "clusterer"),
    ({"ratio": 0.5, "features": "all"}, "features"),
    ({"ratio": 0.5, "n_init": 0}, "n_init"),
    ({"ratio": 0.5, "module_ratios": {"fc": 2.0}}, "module_ratios"),
])
def test_invalid_configs_name_the_field(kwargs, match):
    with pytest.raises(mf.FoldError, match=match):
        mf.FoldConfig(**kwargs)


def test_unknown_json_keys_are_refused():
    with pytest.raises(mf.FoldError, match="unknown keys"):
        mf.FoldConfig.from_json('{"ratio": 0.5, "ratoi": 1}')


@pytest.mark.parametrize("n, ratio, k", [(64, 0.5, 32), (10, 0.25, 8), (3, 0.5, 2),
                                         (5, 0.99, 1), (7, 0.0, 7)])
def test_kept_channels_follows_the_papers_rounding(n, ratio, k):
    assert kept_channels(n, ratio) == k


@pytest.mark.parametrize("n, ratio, multiple, k", [
    (8192, 0.2, 64, 6528),   # 6553.6 -> 6554 -> nearest multiple of 64
    (8192, 0.0, 64, 8192),   # ratio 0 stays the identity
    (100, 0.95, 8, 8),       # at least one multiple
    (120, 0.01, 64, 120),    # never more than n (119 -> 128 -> 120)
    (1536, 0.3, 8, 1072),
])
def test_kept_channels_rounds_to_a_multiple(n, ratio, multiple, k):
    assert kept_channels(n, ratio, multiple) == k


def test_fold_argument_errors(example):
    model = make_model("lenet5")
    with pytest.raises(mf.FoldError, match="ratio"):
        mf.fold(model, example, ratio=1.5)
    with pytest.raises(mf.FoldError, match=r"exactly one.*\(got `ratio` and `target_sparsity`\)"):
        mf.fold(model, example, ratio=0.5, target_sparsity=0.5)
    with pytest.raises(mf.FoldError, match="example_inputs"):
        mf.fold(model, None, ratio=0.5)
    with pytest.raises(mf.FoldError, match="does not run"):
        mf.fold(model, torch.randn(2, 5), ratio=0.5)
    with pytest.raises(mf.FoldError, match="not a module"):
        mf.fold(model, example, ratio=0.5, module_ratios={"nope": 0.5})
    with pytest.raises(mf.FoldError, match="not part of the model"):
        mf.fold(model, example, ratio=0.5, ignored=[torch.nn.Linear(2, 2)])
    with pytest.raises(mf.FoldError, match=r"torch\.nn\.Module"):
        mf.fold("model", example, ratio=0.5)


def test_nan_weights_are_refused(example):
    model = make_model("lenet5")
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(mf.FoldError, match=r"conv1\.weight"):
        mf.fold(model, example, ratio=0.5)


def test_unsupported_layers_are_named_with_the_fix():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, groups=2), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(mf.FoldError, match=r"ignored="):
        mf.fold(model, x, ratio=0.5)
    folded = mf.fold(model, x, ratio=0.5, ignored=[model[2]])
    assert folded(x).shape == model(x).shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_missing_gpu_is_a_clear_error(example):
    with pytest.raises(mf.FoldError, match="no CUDA GPU"):
        mf.fold(make_model("lenet5"), example, ratio=0.5, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fold_matches_cpu(example):
    model = make_model("resnet18")
    cpu = mf.fold(model, example, ratio=0.5)
    gpu = mf.fold(model, example, ratio=0.5, device="cuda")
    assert next(gpu.parameters()).device.type == "cuda"
    assert (gpu(example.cuda()).cpu() - cpu(example)).abs().max() <= 1e-3
