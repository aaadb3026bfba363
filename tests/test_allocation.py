"""Budget-aware allocation: Ward distortion curves and the Lagrangian split of a budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import cut_tree, linkage

import modelfold as mf
from helpers import n_params, plant_duplicates
from modelfold.cluster.allocation import allocate, distortion_curve


def test_distortion_curve_is_the_relative_sse_of_ward_cuts():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0)).double()
    curve = distortion_curve(x)
    xs = x.numpy()
    total = ((xs - xs.mean(0)) ** 2).sum()
    tree = linkage(xs, method="ward")
    for k in (1, 2, 7, 20, 39, 40):
        labels = cut_tree(tree, n_clusters=k).reshape(-1)
        sse = sum(((xs[labels == c] - xs[labels == c].mean(0)) ** 2).sum() for c in range(k))
        assert curve[k - 1] == pytest.approx(sse / total, rel=1e-9, abs=1e-12)
    assert curve[0] == pytest.approx(1.0) and curve[-1] == 0.0
    assert np.all(np.diff(curve) <= 1e-12)  # more clusters never cost more


def test_allocation_folds_the_redundant_group_and_meets_the_budget():
    n = 20
    redundant = np.where(np.arange(1, n + 1) >= n // 2, 0.0, 0.5)  # free down to k = 10
    distinct = np.linspace(1.0, 0.0, n)  # every merge costs
    costs = {"a": 1.0, "b": 1.0}

    def count(ks):
        return ks["a"] + ks["b"]

    ks = allocate({"a": redundant, "b": distinct}, costs, count, budget=30)
    assert count(ks) <= 30
    assert ks == {"a": 10, "b": 20}  # uniform would take 5 from each, distorting b


def test_allocation_respects_round_to_and_the_cap():
    curve = np.linspace(1.0, 0.0, 64)
    ks = allocate({"a": curve}, {"a": 1.0}, lambda ks: ks["a"], budget=3, round_to=8)
    assert ks["a"] % 8 == 0  # the cap (k >= 64 * 0.1) and multiples of 8: 8 is the least


def test_inertia_allocation_keeps_the_budget_and_planted_duplicates_lossless(example):
    model = mf.zoo.create_model("resnet18", width=16)
    model.eval()
    plant_duplicates(model, example)
    uniform = mf.fold(model, example, config=mf.FoldConfig(ratio=0.3))
    spread = mf.fold(model, example, config=mf.FoldConfig(ratio=0.3, allocation="inertia"))
    assert n_params(spread) <= n_params(uniform)
    assert n_params(spread) >= 0.95 * n_params(uniform)  # the same budget, not a lot more
    ref = model(example)
    assert (spread(example) - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    ks = {g: p["k"] for g, p in spread._modelfold_record.plan["groups"].items()}
    n = {g: p["n"] for g, p in spread._modelfold_record.plan["groups"].items()}
    assert all(ks[g] >= n[g] // 2 for g in ks)  # folds only inside the duplicate plateau


def test_inertia_allocation_with_target_sparsity(example):
    model = mf.zoo.create_model("vgg11_bn", width=16)
    folded = mf.fold(model, example,
                     config=mf.FoldConfig(target_sparsity=0.5, allocation="inertia"))
    achieved = 1 - n_params(folded) / n_params(model)
    assert 0.49 - 1e-9 <= achieved <= 0.56
