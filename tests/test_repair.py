"""Repair variants: Fold-R, Fold-AR, Fold-DIR restore the statistics they claim to restore."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modelfold as mf
from conftest import make_model
from experiments.fashion_mnist import load_fashion_mnist
from modelfold.repair import DeepInversionConfig, synthesize
from modelfold.repair.approx import variance_scale
from modelfold.repair.deep_inversion import bn_statistics_gap
from modelfold.repair.statistics import reset_batchnorm


def correlated_net(n: int, rho: float, d: int = 64) -> nn.Module:
    """Linear(d -> n) -> BN -> ReLU -> Linear(n -> 2) whose n pre-BN units have unit variance
    and pairwise correlation exactly rho under white input."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, n + 1, generator=gen))
    rows = (rho**0.5) * q[:, :1].T + ((1 - rho) ** 0.5) * q[:, 1:].T  # (n, d), unit norm
    net = nn.Sequential(nn.Linear(d, n, bias=False), nn.BatchNorm1d(n), nn.ReLU(),
                        nn.Linear(n, 2))
    with torch.no_grad():
        net[0].weight.copy_(rows)
        net[1].running_mean.zero_()
        net[1].running_var.fill_(1.0)
    return net.eval()


@pytest.mark.parametrize("correlation", ["producer", "calibrated"])
@pytest.mark.parametrize("rho", [0.2, 0.5, 0.8])
def test_fold_ar_restores_the_variance_of_correlated_channels(rho, correlation):
    n, d = 8, 64
    net = correlated_net(n, rho, d)
    x = torch.randn(20000, d, generator=torch.Generator().manual_seed(1))
    folded = {}
    for repair in ("none", "approx"):
        cfg = mf.FoldConfig(ratio=0.99, repair=repair, ar_correlation=correlation)
        folded[repair] = mf.fold(net, x[:4], config=cfg)  # 8 channels -> 1
        assert folded[repair][1].num_features == 1
    with torch.no_grad():
        naive = folded["none"][1](folded["none"][0](x)).var().item()
        repaired = folded["approx"][1](folded["approx"][0](x)).var().item()
    assert naive == pytest.approx((1 + (n - 1) * rho) / n, rel=0.05)  # the variance collapse
    assert repaired == pytest.approx(1.0, rel=0.05)  # target: the members' unit variance


def test_calibrated_correlation_accounts_for_correlated_inputs():
    """Inputs with a common mode (x = g 1 + e): weight cosines underestimate the activation
    correlation; the covariance fitted to the BN statistics does not."""
    n, d, c = 8, 64, 0.5
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(n, d, generator=gen) / d**0.5 + 0.1
    true_var = (rows**2).sum(1) + c * rows.sum(1) ** 2
    net = nn.Sequential(nn.Linear(d, n, bias=False), nn.BatchNorm1d(n), nn.ReLU(),
                        nn.Linear(n, 2)).eval()
    with torch.no_grad():
        net[0].weight.copy_(rows)
        net[1].running_mean.zero_()
        net[1].running_var.copy_(true_var)
    x = torch.randn(20000, d, generator=gen) + (c**0.5) * torch.randn(20000, 1, generator=gen)
    variances = {}
    for corr in ("producer", "calibrated"):
        cfg = mf.FoldConfig(ratio=0.99, repair="approx", ar_correlation=corr)
        folded = mf.fold(net, x[:4], config=cfg)
        with torch.no_grad():
            variances[corr] = folded[1](folded[0](x)).var().item()
    assert variances["calibrated"] == pytest.approx(1.0, rel=0.05)
    assert variances["producer"] > 1.3  # over-corrected


def test_fold_ar_scale_formula_and_floor():
    sizes = torch.tensor([1.0, 4.0, 4.0])
    s = variance_scale(torch.tensor([0.0, 1.0, -0.5]), sizes, floor=0.05)
    assert s[0] == 1.0 and s[1] == pytest.approx(1.0)
    assert s[2] == pytest.approx((4 / 0.05) ** 0.5)  # 1 + 3 * (-0.5) < 0 is floored


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "bn_mlp", "vit_tiny"])
def test_repairs_at_ratio_zero_keep_the_function(name, example):
    model = make_model(name)
    for repair in ("approx",):
        folded = mf.fold(model, example, ratio=0.0, repair=repair)
        assert (folded(example) - model(example)).abs().max() <= 1e-4


def bn_input_moments(model: nn.Module, data: torch.Tensor):
    found = []

    def hook(module, inputs, output):
        x = inputs[0].double()
        dims = [d for d in range(x.ndim) if d != 1]
        found.append((module, x.mean(dims), x.var(dims, unbiased=False)))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        model.eval()(data)
    for h in handles:
        h.remove()
    return found


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet_small"])
def test_fold_r_matches_running_statistics_to_the_calibration_data(name):
    model = make_model(name)
    calibration = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    folded = mf.fold(model, calibration[:2], ratio=0.5, repair="data", calibration=calibration)
    moments = bn_input_moments(folded, calibration)
    assert moments
    for bn, mean, var in moments:
        assert torch.allclose(bn.running_mean.double(), mean, atol=1e-5, rtol=1e-4)
        assert torch.allclose(bn.running_var.double(), var, atol=1e-5, rtol=1e-4)


def test_fold_r_repair_restores_channel_statistics_without_bn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 4)).eval()
    data = torch.randn(512, 16)
    folded = mf.fold(net, data[:2], ratio=0.5, repair="data", calibration=[(data, None)])
    plan = mf.summary(net, folded, data[:2])
    assert any(g.status == "folded" for g in plan.groups)
    with torch.no_grad():
        h_orig, h_fold = net[0](data), folded[0](data)
    labels = torch.tensor(folded._modelfold_record.plan["groups"]["0"]["labels"])
    k = folded[0].out_features
    for c in range(k):
        members = labels == c
        assert h_fold[:, c].mean() == pytest.approx(h_orig[:, members].mean(0).mean().item(),
                                                    abs=1e-4)
        assert h_fold[:, c].std(unbiased=False) == pytest.approx(
            h_orig[:, members].std(0, unbiased=False).mean().item(), rel=1e-3)


def test_the_llm_repair_is_refused_for_other_models(example):
    with pytest.raises(mf.FoldError, match="causal LMs"):
        mf.fold(make_model("resnet18"), example, ratio=0.3, repair="self_generated")


def test_repair_errors_are_clear(example):
    model = make_model("resnet18")
    with pytest.raises(mf.FoldError, match="calibration"):
        mf.fold(model, example, ratio=0.5, repair="data")
    with pytest.raises(mf.FoldError, match="does not fit"):
        mf.fold(model, example, ratio=0.5, repair="data", calibration=torch.randn(4, 7))
    with pytest.raises(mf.FoldError, match=r"repair='magic'"):
        mf.fold(model, example, ratio=0.5, repair="magic")
    with pytest.raises(mf.FoldError, match="deep_inversion"):
        mf.FoldConfig(ratio=0.5, deep_inversion={"steps": 0})


def test_deep_inversion_matches_bn_statistics_and_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path))
    model = make_model("resnet18")
    # BN statistics of real images (as in a trained model), so that they are attainable
    reset_batchnorm(model, load_fashion_mnist("test").tensors[0][:256])
    cfg = DeepInversionConfig(num_images=16, steps=40, lr=0.05, batch_size=16, cache=False)
    images = synthesize(model, (3, 32, 32), 10, cfg, progress=False)
    assert images.shape == (16, 3, 32, 32)
    noise = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert bn_statistics_gap(model, images) < 0.2 * bn_statistics_gap(model, noise)
    again = synthesize(model, (3, 32, 32), 10, cfg, progress=False)
    assert torch.equal(images, again)


def test_deep_inversion_cache_is_keyed_by_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path))
    cfg = DeepInversionConfig(num_images=4, steps=3, batch_size=4)
    model = make_model("lenet5")
    with pytest.raises(mf.FoldError, match="BatchNorm"):
        synthesize(model, (3, 32, 32), 10, cfg, progress=False)
    model = make_model("vgg11_bn")
    first = synthesize(model, (3, 32, 32), 10, cfg, progress=False)
    assert len(list((tmp_path / "deep_inversion").iterdir())) == 1
    assert torch.equal(synthesize(model, (3, 32, 32), 10, cfg, progress=False), first)
    other = make_model("vgg11_bn", seed=9)
    synthesize(other, (3, 32, 32), 10, cfg, progress=False)
    assert len(list((tmp_path / "deep_inversion").iterdir())) == 2


def test_fold_dir_end_to_end(tmp_path, monkeypatch, example):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path))
    model = make_model("vgg11_bn")
    cfg = mf.FoldConfig(ratio=0.5, repair="deep_inversion",
                        deep_inversion={"num_images": 16, "steps": 10, "batch_size": 16})
    folded = mf.fold(model, example, config=cfg)
    assert folded(example).shape == (2, 10)
    assert folded._modelfold_record.config["repair"] == "deep_inversion"


def test_debiased_deep_inversion_at_ratio_zero_restores_the_stored_statistics(
        tmp_path, monkeypatch, example):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path))
    model = make_model("resnet18")
    reset_batchnorm(model, load_fashion_mnist("test").tensors[0][:128])  # attainable stats
    di = {"num_images": 16, "steps": 10, "batch_size": 16}
    plain = mf.fold(model, example, config=mf.FoldConfig(
        ratio=0.0, repair="deep_inversion", deep_inversion=di))
    debiased = mf.fold(model, example, config=mf.FoldConfig(
        ratio=0.0, repair="deep_inversion_debiased", deep_inversion=di))
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    plain_bns, debiased_bns = dict(plain.named_modules()), dict(debiased.named_modules())
    # synthetic images alone leave a gap; the original's own gap removes it exactly at r = 0
    assert any(not torch.allclose(plain_bns[n].running_var, m.running_var, rtol=1e-3)
               for n, m in bns)
    for name, bn in bns:
        torch.testing.assert_close(debiased_bns[name].running_mean, bn.running_mean,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(debiased_bns[name].running_var, bn.running_var,
                                   atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def trained_vgg():
    """VGG11-BN (width 8) trained one epoch on real Fashion-MNIST (train, test)."""
    from experiments.train import train_classifier
    from modelfold.zoo import create_model

    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    torch.manual_seed(0)
    model = create_model("vgg11_bn", width=8)
    train_classifier(model, train, epochs=1, progress=False)
    return model.eval(), train, test


def test_debiased_statistics_predict_the_real_data_statistics_better(
        trained_vgg, tmp_path, monkeypatch):
    """On a trained model folded at r = 0.3 the data-free BN statistics of Fold-DIR debiased are
    closer to those real images give the same folded model (Fold-R) than plain Fold-DIR's, and
    within 25 % (median relative error of the running variance)."""
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path))
    model, train, test = trained_vgg
    di = {"num_images": 64, "steps": 60, "lr": 0.05, "batch_size": 64}
    example = test.tensors[0][:2]
    folds = {repair: mf.fold(model, example, config=mf.FoldConfig(
        ratio=0.3, clusterer="hartigan", repair=repair, deep_inversion=di,
        calibration_samples=1024), calibration=train.tensors[0][30000:31024])
        for repair in ("data", "deep_inversion", "deep_inversion_debiased")}
    real = {n: m for n, m in folds["data"].named_modules() if isinstance(m, nn.BatchNorm2d)}

    def median_var_error(repair: str) -> float:
        mods = dict(folds[repair].named_modules())
        errs = [((mods[n].running_var - m.running_var).abs() / m.running_var).flatten()
                for n, m in real.items()]
        return float(torch.cat(errs).median())

    plain, debiased = median_var_error("deep_inversion"), median_var_error(
        "deep_inversion_debiased")
    assert debiased < plain, (debiased, plain)
    assert debiased < 0.25, debiased


def test_repairs_beat_fold_naive_on_a_trained_bn_network(trained_vgg):
    """VGG11-BN (width 8) trained one epoch on real Fashion-MNIST, folded at ratio 0.3."""
    from experiments.train import evaluate_accuracy

    model, train, test = trained_vgg
    calibration = train.tensors[0][30000:31024]
    acc = {}
    for repair in ("none", "data", "approx"):
        folded = mf.fold(model, test.tensors[0][:2], ratio=0.3, repair=repair,
                         calibration=calibration)
        acc[repair] = evaluate_accuracy(folded, test)
    assert acc["data"] > acc["none"] + 0.05, acc
    assert acc["approx"] > acc["none"] + 0.05, acc
