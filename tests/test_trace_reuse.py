"""`reuse_traces()`: many folds of one model share one trace and give exactly the folds that
tracing every time gives; changed weights are seen, changed structure or inputs trace again."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

import modelfold as mf
import modelfold.graph_fold
from conftest import make_model
from modelfold.baselines import magnitude_prune

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def traces(monkeypatch):
    """Counts the graph traces of the graph path and the baselines."""
    calls = []
    real = modelfold.graph_fold.discover_groups

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(modelfold.graph_fold, "discover_groups", counting)
    return calls


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _fold(model, method: str, ratio: float) -> torch.nn.Module:
    if method == "sp-l1":
        return magnitude_prune(model, X, ratio=ratio, p=1)
    return mf.fold(model, X, ratio=ratio, repair=method)


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "mobilenet_v2", "vit_tiny"])
def test_one_trace_gives_the_folds_of_fresh_traces(name, traces):
    model = make_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cells = [(m, r) for r in (0.2, 0.5) for m in ("none", "approx", "sp-l1")]
    fresh = [_fold(model, m, r) for m, r in cells]
    assert len(traces) == len(cells)
    traces.clear()
    with mf.reuse_traces():
        reused = [_fold(model, m, r) for m, r in cells]
        assert len(traces) == 1
    for a, b in zip(fresh, reused, strict=True):
        assert _same(a, b)
        assert torch.equal(a(X), b(X))
        assert asdict(a._modelfold_record) == asdict(b._modelfold_record)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    traces.clear()
    mf.fold(model, X, ratio=0.3)
    assert len(traces) == 1  # the traces end with the block


def test_weights_changed_inside_the_block_are_folded(traces):
    model = make_model("resnet18")
    with mf.reuse_traces():
        mf.fold(model, X, ratio=0.4)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.5)
        after = mf.fold(model, X, ratio=0.4)
        assert len(traces) == 1
    assert _same(after, mf.fold(model, X, ratio=0.4))


def test_other_inputs_structure_or_ignored_modules_trace_again(traces):
    model = make_model("vgg11_bn")
    with mf.reuse_traces():
        mf.fold(model, X, ratio=0.3)
        mf.fold(model, X[:1], ratio=0.3)  # other input shape
        mf.fold(model, X, ratio=0.3, ignored=[model.features[0]])
        other = make_model("vgg11_bn")  # same structure, another model object
        mf.fold(other, X, ratio=0.3)
        assert len(traces) == 4
        model.classifier = torch.nn.Linear(model.classifier.in_features, 7)
        folded = mf.fold(model, X, ratio=0.3)
        assert len(traces) == 5 and folded(X).shape == (2, 7)
        with mf.reuse_traces():  # a nested block shares the outer traces
            mf.fold(model, X, ratio=0.5)
        assert len(traces) == 5


def test_in_place_folds_never_use_or_fill_the_traces(traces):
    with mf.reuse_traces():
        model = make_model("lenet5")
        folded = mf.fold(model, X, ratio=0.3, inplace=True)
        assert folded is model
        mf.fold(make_model("lenet5"), X, ratio=0.3)
        assert len(traces) == 2


@pytest.mark.parametrize("budget", [{"target_sparsity": 0.5}, {"target_macs": 0.3},
                                    {"target_memory": 60_000}])
@pytest.mark.parametrize("allocation", ["uniform", "inertia"])
def test_a_budget_search_clusters_each_group_once(budget, allocation, monkeypatch):
    """Budgets are solved on channel counts alone (shapes): k-means then runs once per
    folded group, never inside the search."""
    calls: list[tuple[int, int]] = []
    real = modelfold.graph_fold.cluster_channels

    def counting(x, k, config):
        calls.append((x.shape[0], k))
        return real(x, k, config)

    monkeypatch.setattr(modelfold.graph_fold, "cluster_channels", counting)
    config = mf.FoldConfig(allocation=allocation, sparsity_tolerance=0.03, **budget)
    folded = mf.fold(make_model("resnet18"), X, config=config)
    plan = folded._modelfold_record.plan["groups"]
    assert len(calls) == len(plan) > 0
    assert sorted(calls) == sorted((g["n"], g["k"]) for g in plan.values())
