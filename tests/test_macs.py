"""The aten-level MAC counter, and `target_macs` budgets folded to within tolerance."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelfold as mf
from conftest import make_model
from modelfold.budget import (
    ALLOCATIONS,
    budget_cost,
    cluster_counts,
    register_allocation,
    uniform_clusters,
)
from modelfold.graph import discover_groups
from modelfold.macs import count_macs, profile_macs
from modelfold.merge.apply import memory_bytes, predicted_memory
from modelfold.summary import summary


class SameConv(nn.Conv2d):
    """A conv subclass with its own forward ('same' padding through F.conv2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, "same", self.dilation,
                        self.groups)


class SdpaAttention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def mha_macs(batch: int, tgt: int, src: int, embed: int) -> int:
    """q/k/v projections, QK^T and AV over all heads, output projection."""
    return (batch * tgt * embed * embed + 2 * batch * src * embed * embed
            + 2 * batch * tgt * src * embed + batch * tgt * embed * embed)


x16 = torch.randn(1, 3, 16, 16)
x8 = torch.randn(2, 8, 8, 8)
q = torch.randn(2, 8, 32)
kv = torch.randn(2, 5, 32)
CASES = {
    "conv2d": (nn.Conv2d(3, 8, 3, padding=1), x16, 16 * 16 * 8 * 3 * 9),
    "same_conv_subclass": (SameConv(3, 8, 3), x16, 16 * 16 * 8 * 3 * 9),
    "strided_conv": (nn.Conv2d(3, 8, 3, stride=2), x16, 7 * 7 * 8 * 3 * 9),
    "grouped_conv": (nn.Conv2d(8, 12, 3, groups=4, padding=1), x8, 2 * 64 * 12 * 2 * 9),
    "depthwise_conv": (nn.Conv2d(8, 8, 3, groups=8, padding=1), x8, 2 * 64 * 8 * 9),
    "linear": (nn.Linear(10, 7), torch.randn(3, 5, 10), 15 * 7 * 10),
    "mha_self": (nn.MultiheadAttention(32, 4, batch_first=True), (q, q, q),
                 mha_macs(2, 8, 8, 32)),
    "mha_cross": (nn.MultiheadAttention(32, 4, batch_first=True), (q, kv, kv),
                  mha_macs(2, 8, 5, 32)),
    "mha_no_weights": (nn.MultiheadAttention(32, 4, batch_first=True),
                       {"query": q, "key": q, "value": q, "need_weights": False},
                       mha_macs(2, 8, 8, 32)),
    "sdpa": (SdpaAttention(), (torch.randn(2, 4, 8, 16), torch.randn(2, 4, 6, 16),
                               torch.randn(2, 4, 6, 16)), 2 * (2 * 4 * 8 * 6 * 16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_count_macs_matches_hand_counts(case):
    module, inputs, expected = CASES[case]
    assert count_macs(module, inputs) == expected


def test_counting_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout()).train()
    model[2].eval()  # modes of submodules are restored one by one
    stats = model[1].running_mean.clone()
    assert count_macs(model, x16) == 14 * 14 * 4 * 3 * 9
    assert model.training and model[1].training and not model[2].training
    assert torch.equal(model[1].running_mean, stats)
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


def test_profile_attributes_macs_to_weights_and_attention_modules():
    model = nn.Sequential(nn.Linear(32, 32))
    attention = nn.MultiheadAttention(32, 4, batch_first=True)
    model.add_module("attn", attention)
    model.forward = lambda x: attention(model[0](x), model[0](x), model[0](x))[0]
    profile = profile_macs(model, q)
    assert profile.total == 3 * 16 * 32 * 32 + mha_macs(2, 8, 8, 32)
    assert profile.by_parameter[id(model[0].weight)] == 3 * 16 * 32 * 32
    assert profile.by_parameter[id(attention.in_proj_weight)] == 3 * 16 * 32 * 32
    assert profile.free == {"attn": 2 * 2 * 8 * 8 * 32}


def same_conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(SameConv(3, 16, 3), nn.ReLU(), SameConv(16, 16, 3), nn.ReLU(),
                         SameConv(16, 4, 3)).eval()


def test_summary_counts_the_macs_of_conv_subclasses():
    model = same_conv_net()
    x = torch.randn(1, 3, 8, 8)
    folded = mf.fold(model, x, ratio=0.5)
    s = summary(model, folded, x)
    per_pixel = 16 * 3 * 9 + 16 * 16 * 9 + 4 * 16 * 9
    assert s.macs_before == 64 * per_pixel
    assert s.macs_after == 64 * (8 * 3 * 9 + 8 * 8 * 9 + 4 * 8 * 9)


def test_summary_times_both_models_when_asked(monkeypatch):
    """latency=True times the model and the folded model on the example input (each through
    `median_latency`: the right model, the right input, the asked number of runs)."""
    import importlib

    from modelfold.latency import median_latency

    summary_module = importlib.import_module("modelfold.summary")  # not the function

    model = same_conv_net()
    x = torch.randn(2, 3, 8, 8)
    folded = mf.fold(model, x, ratio=0.5)
    assert summary(model, folded, x).latency_after_s is None  # not timed unless asked
    timed = []

    def fake(m, inputs, *, runs):
        timed.append((m, inputs, runs))
        return 0.004 if m is model else 0.002

    monkeypatch.setattr(summary_module, "median_latency", fake)
    s = summary(model, folded, x, latency=True, runs=7)
    assert [(m, i is x, r) for m, i, r in timed] == [(folded, True, 7), (model, True, 7)]
    assert s.speedup == pytest.approx(2.0)
    assert "4.000 ms -> 2.000 ms  (2.00x faster)" in str(s)
    assert s.to_dict()["latency_after_s"] == 0.002
    with pytest.raises(mf.FoldError, match="runs"):
        summary(model, folded, x, latency=True, runs=0)
    monkeypatch.undo()  # the real timer: positive medians, inputs given as a tuple too
    assert median_latency(folded, (x,), runs=2) > 0


# ---------------------------------------------------------------- target_macs


@pytest.fixture
def small() -> torch.Tensor:
    """A small image batch: the MAC budgets hold for any input size."""
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def achieved(model: nn.Module, folded: nn.Module, x: torch.Tensor) -> float:
    return 1.0 - count_macs(folded, x) / count_macs(model, x)


@pytest.mark.parametrize(("allocation", "target"), [("uniform", 0.3), ("inertia", 0.5)])
def test_target_macs_is_reached_on_a_residual_cnn(small, allocation, target):
    model = make_model("resnet18")
    config = mf.FoldConfig(target_macs=target, allocation=allocation, n_init=1)
    folded = mf.fold(model, small, config)
    assert abs(achieved(model, folded, small) - target) <= config.sparsity_tolerance
    extra = folded._modelfold_record.extra
    assert extra["macs_before"] == count_macs(model, small)
    assert extra["macs_after"] == count_macs(folded, small)
    s = summary(None, folded)  # the record's count stands in for the dropped model
    assert s.macs_before == extra["macs_before"]


def test_target_macs_folds_attention_heads(example):
    model = make_model("vit_tiny")
    folded = mf.fold(model, example, mf.FoldConfig(target_macs=0.4, allocation="inertia",
                                                      n_init=1))
    assert abs(achieved(model, folded, example) - 0.4) <= 0.01


def test_inertia_spends_macs_not_parameters(small):
    """The MAC budget is met, and the parameter reduction is not what decides it."""
    model = make_model("resnet18")
    discovery = discover_groups(model, small)
    macs = budget_cost(model, discovery, mf.FoldConfig(target_macs=0.5), small)
    for budget, hits in (({"target_macs": 0.5}, True), ({"target_sparsity": 0.5}, False)):
        config = mf.FoldConfig(allocation="inertia", **budget)
        _, ks = cluster_counts(model, discovery, config, example_inputs=small)
        assert (abs(1 - macs.count(ks) / macs.total - 0.5) <= 0.01) == hits


def test_target_macs_zero_is_the_identity(example):
    model = make_model("lenet5")
    folded = mf.fold(model, example, target_macs=0.0)
    assert count_macs(folded, example) == count_macs(model, example)
    assert sum(p.numel() for p in folded.parameters()) == sum(
        p.numel() for p in model.parameters())
    torch.testing.assert_close(folded(example), model(example))


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), "0.3", True])
def test_bad_target_macs_names_the_parameter(example, value):
    with pytest.raises(mf.FoldError, match="target_macs"):
        mf.FoldConfig(target_macs=value)
    with pytest.raises(mf.FoldError, match="target_macs"):
        mf.fold(make_model("lenet5"), example, target_macs=value)


@pytest.mark.parametrize("other", [{"ratio": 0.5}, {"target_sparsity": 0.5}])
def test_target_macs_with_another_budget_is_refused(example, other):
    with pytest.raises(mf.FoldError, match="target_macs"):
        mf.FoldConfig(target_macs=0.3, **other)
    with pytest.raises(mf.FoldError, match="target_macs"):
        mf.fold(make_model("lenet5"), example, target_macs=0.3, **other)


def test_a_keyword_target_macs_replaces_the_config_budget(example):
    model = make_model("lenet5")
    folded = mf.fold(model, example, mf.FoldConfig(ratio=0.5), target_macs=0.2)
    assert folded._modelfold_record.config["target_macs"] == 0.2
    assert folded._modelfold_record.config["ratio"] is None


def test_unreachable_target_macs_is_explained(example):
    with pytest.raises(mf.FoldError, match=r"target_macs=0.99 is unreachable.*MACs"):
        mf.fold(make_model("lenet5"), example, target_macs=0.99)


def test_config_json_round_trip_keeps_target_macs():
    config = mf.FoldConfig(target_macs=0.25, allocation="inertia")
    data = json.loads(config.to_json())
    assert data["target_macs"] == 0.25 and data["ratio"] is None
    assert mf.FoldConfig.from_json(config.to_json()) == config
    old = {k: v for k, v in mf.FoldConfig(ratio=0.5).to_dict().items() if k != "target_macs"}
    assert mf.FoldConfig.from_dict(old).target_macs is None  # configs written before it


def test_target_macs_does_not_apply_to_llm_configs():
    with pytest.raises(mf.FoldError, match="target_macs"):
        mf.LLMFoldConfig.from_fold_config(mf.FoldConfig(target_macs=0.2))


def test_a_parameter_only_allocation_refuses_a_mac_budget(example):
    @register_allocation("test-params-only")
    def params_only(model, discovery, config, ratio):
        return {}

    try:
        model = make_model("lenet5")
        mf.fold(model, example, mf.FoldConfig(ratio=0.3, allocation="test-params-only"))
        with pytest.raises(mf.FoldError, match=r"test-params-only.*target_macs.*inertia"):
            mf.fold(model, example, mf.FoldConfig(target_macs=0.3,
                                                  allocation="test-params-only"))
    finally:
        ALLOCATIONS.unregister("test-params-only")


def test_a_mac_allocation_is_given_the_mac_cost(example):
    seen = {}

    @register_allocation("test-macs", units=("parameters", "MACs"))
    def with_cost(model, discovery, config, ratio, cost=None):
        seen["unit"] = cost.unit
        return uniform_clusters(discovery, config, ratio)

    try:
        model = make_model("lenet5")
        discovery = discover_groups(model, example)
        config = mf.FoldConfig(target_macs=0.2, allocation="test-macs")
        cost = budget_cost(model, discovery, config, example)
        assert cost.total == count_macs(model, example) and cost.count({}) == cost.total
        cluster_counts(model, discovery, config, example_inputs=example)
        assert seen["unit"] == "MACs"
    finally:
        ALLOCATIONS.unregister("test-macs")
    with pytest.raises(mf.FoldError, match="units"):
        register_allocation("test-bad", units=("bytes",))


def test_self_calibration_spends_a_mac_budget(example):
    model = make_model("lenet5")
    config = mf.FoldConfig(target_macs=0.3, self_calibrate=True, sparsity_tolerance=0.05)
    folded = mf.fold(model, example, config)
    assert abs(achieved(model, folded, example) - 0.3) <= 0.05


def test_an_allocation_too_coarse_for_the_target_is_explained(example):
    """LeNet's first conv: one channel is 15 % of the MACs; the sensitivity allocation can only
    fold it, so it misses a 20 % target."""
    with pytest.raises(mf.FoldError, match=r"target_macs=0.2.*removes 0.30.*uniform"):
        mf.fold(make_model("lenet5"), example, target_macs=0.2, self_calibrate=True)


def test_cli_fold_with_target_macs(tmp_path):
    from typer.testing import CliRunner

    from modelfold.cli import app

    model = make_model("lenet5")
    mf.save(model, tmp_path / "dense")
    result = CliRunner().invoke(app, ["fold", str(tmp_path / "dense"), "--target-macs", "0.2",
                                      "--out", str(tmp_path / "folded")])
    assert result.exit_code == 0, result.output
    assert "MACs" in result.output
    folded = mf.load(tmp_path / "folded")
    assert folded._modelfold_record.config["target_macs"] == 0.2
    x = torch.zeros(1, 3, 32, 32)
    assert abs(achieved(model, folded, x) - 0.2) <= 0.01


# ---------------------------------------------------------------- target_memory


@pytest.mark.parametrize("allocation", ["uniform", "inertia"])
def test_target_memory_caps_parameter_and_buffer_bytes(small, allocation):
    model = make_model("resnet18")
    cap = int(memory_bytes(model) * 0.6)
    folded = mf.fold(model, small, mf.FoldConfig(target_memory=cap, allocation=allocation,
                                                 n_init=1))
    after = memory_bytes(folded)
    assert cap * 0.97 <= after <= cap
    assert folded._modelfold_record.extra == {"memory_before": memory_bytes(model),
                                              "memory_after": after}


def test_target_memory_predicted_from_shapes(example):
    model = make_model("vit_tiny")  # attention heads, LayerNorm, no buffers to shrink
    discovery = discover_groups(model, example)
    config = mf.FoldConfig(ratio=0.5)
    predicted = predicted_memory(model, discovery, uniform_clusters(discovery, config, 0.5))
    assert predicted == memory_bytes(mf.fold(model, example, config))


def test_target_memory_the_model_fits_already_is_the_identity(example):
    model = make_model("lenet5")
    folded = mf.fold(model, example, target_memory=memory_bytes(model))
    assert memory_bytes(folded) == memory_bytes(model)


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "100"])
def test_bad_target_memory_names_the_parameter(example, value):
    with pytest.raises(mf.FoldError, match="target_memory"):
        mf.FoldConfig(target_memory=value)
    with pytest.raises(mf.FoldError, match="target_memory"):
        mf.fold(make_model("lenet5"), example, target_memory=value)


def test_target_memory_errors(example):
    model = make_model("lenet5")
    with pytest.raises(mf.FoldError, match="target_memory=10 is unreachable"):
        mf.fold(model, example, target_memory=10)
    with pytest.raises(mf.FoldError, match=r"target_macs.*target_memory"):
        mf.fold(model, example, target_macs=0.2, target_memory=1000)
    config = mf.FoldConfig(target_memory=123_456)
    assert mf.FoldConfig.from_json(config.to_json()) == config
