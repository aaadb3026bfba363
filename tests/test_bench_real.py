"""The helpers of benchmarks/real_models.py: views, KL, sentence pairs, SP target ratio."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import modelfold as mf
from conftest import make_model
from modelfold.baselines import magnitude_prune

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "real_models.py"
_spec = importlib.util.spec_from_file_location("bench_real_models", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)

needs_foolbox = pytest.mark.skipif(importlib.util.find_spec("foolbox") is None,
                                   reason="foolbox wheel (real sample images) not installed")


def _distinct(views: torch.Tensor) -> int:
    return len({v.numpy().tobytes() for v in views})


def test_crop_views_are_distinct_and_image_major():
    x = torch.rand(3, 3, 12, 12)
    views = bench.crop_views(x, 8)
    assert views.shape == (30, 3, 8, 8)
    assert _distinct(views) == 30
    assert torch.equal(views[10], x[1, :, 2:10, 2:10])  # centre crop of image 1
    assert torch.equal(views[15], torch.flip(views[10], dims=[-1]))
    assert bench.shift_views(x).shape == (30, 3, 12, 12)
    assert _distinct(bench.shift_views(x)) == 30


@needs_foolbox
@pytest.mark.parametrize("name", ["cifar10_keras_cnn", "mobilenet_v2_imagenet"])
def test_real_views(name):
    views, labels = bench.image_views(name)
    labelled = labels >= 0
    assert int(labelled.sum()) >= 100 and _distinct(views) == len(views)
    assert len(set(labels[labelled].tolist())) > 5
    if name == "cifar10_keras_cnn":  # 200 CIFAR-10 views, 200 unlabelled CIFAR-100 views
        assert len(views) == 400 and float(views.max()) > 1.5  # raw 0-255 pixels


def test_mean_kl():
    a = torch.randn(7, 10)
    assert bench.mean_kl(a, a) == pytest.approx(0.0, abs=1e-12)
    assert bench.mean_kl(a, a + 3.0) == pytest.approx(0.0, abs=1e-12)  # softmax shift
    b = torch.randn(7, 10)
    p, q = a.double().softmax(-1), b.double().softmax(-1)
    expected = float((p * (p / q).log()).sum(-1).mean())
    assert bench.mean_kl(a, b) == pytest.approx(expected, rel=1e-9) and expected > 0


def test_sentence_pairs():
    pairs = bench.sentence_pairs(20)
    assert len(pairs) == 20 and pairs[:10] == [(2 * i, 2 * i + 1) for i in range(10)]
    assert all(a // 2 != b // 2 for a, b in pairs[10:])


@pytest.mark.skipif(importlib.util.find_spec("exllamav2") is None,
                    reason="exllamav2 wheel (Wikipedia text) not installed")
def test_wiki_sentences():
    sentences = bench.wiki_sentences()
    assert len(sentences) == 240 == len(set(sentences))
    assert all(8 <= len(s.split()) <= 40 for s in sentences)


def test_sp_ratio_reaches_the_folds_sparsity():
    model = make_model("vgg11_bn")
    x = torch.randn(1, 3, 32, 32)
    before = bench.n_params(model)
    pruned = magnitude_prune(model, x, ratio=bench.sp_ratio(model, x, 0.3), p=2)
    folded = mf.fold(model, x, target_sparsity=0.3)
    assert bench.n_params(pruned) == bench.n_params(folded)
    assert abs(1 - bench.n_params(pruned) / before - 0.3) <= 0.01
