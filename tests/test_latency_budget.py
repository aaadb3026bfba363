"""`target_latency`: the smallest ratio whose measured latency meets the goal. The timer is
replaced by a deterministic one (latency = fixed overhead + MACs) wherever a test asserts on
the search; one test times for real and checks only what the search itself measured."""

from __future__ import annotations

import pytest
import torch

import modelfold as mf
import modelfold.graph_fold
import modelfold.latency
from conftest import make_model
from modelfold.macs import count_macs, run_model

X = torch.randn(2, 3, 32, 32)


@pytest.fixture
def mac_clock(monkeypatch):
    """median_latency := overhead + MACs * 1e-9 s, counting the calls."""
    calls = []

    def fake(model, inputs, **_kw):
        calls.append(fake.overhead + count_macs(model, inputs) * 1e-9)
        return calls[-1]

    fake.overhead = 0.0
    fake.calls = calls
    monkeypatch.setattr(modelfold.latency, "median_latency", fake)
    return fake


def test_target_latency_finds_the_smallest_ratio_that_meets_the_goal(mac_clock):
    model = make_model("vgg11_bn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = mf.fold(model, X, target_latency=0.4)
    record = folded._modelfold_record
    dense, goal, after = (record.extra[k] for k in ("latency_before_s", "latency_goal_s",
                                                     "latency_after_s"))
    assert goal == pytest.approx(0.6 * dense)
    assert after == pytest.approx(count_macs(folded, X) * 1e-9) and after <= goal
    assert after >= 0.9 * goal  # bisection lands close to the goal, not at the largest ratio
    slightly_less = mf.fold(model, X, ratio=record.ratio - 0.03)
    assert count_macs(slightly_less, X) * 1e-9 > goal  # a smaller ratio misses it
    assert record.config["target_latency"] == 0.4 and record.config["ratio"] is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # dense, the largest ratio, six bisection steps, and a second timing of every miss
    misses = sum(t > goal for t in mac_clock.calls[1:]) // 2
    assert len(mac_clock.calls) == 1 + 1 + 6 + misses and misses > 0


def test_target_latency_in_place_and_unreachable_targets(mac_clock):
    model = make_model("lenet5")
    folded = mf.fold(model, X, target_latency=0.3, inplace=True)
    assert folded is model and folded._modelfold_record.extra["latency_after_s"] <= \
        folded._modelfold_record.extra["latency_goal_s"]
    mac_clock.overhead = 1.0  # a fixed cost no fold removes: a 30 % cut is out of reach
    with pytest.raises(mf.FoldError, match=r"target_latency=0.3: even ratio 0.95"):
        mf.fold(make_model("lenet5"), X, target_latency=0.3)
    with pytest.raises(mf.FoldError, match="example input"):
        mf.fold(make_model("lenet5"), None, config=mf.FoldConfig(target_latency=0.3))


def test_target_latency_config_round_trip_and_one_budget_only():
    config = mf.FoldConfig(target_latency=0.25, allocation="inertia")
    assert mf.FoldConfig.from_json(config.to_json()) == config
    with pytest.raises(mf.FoldError, match="exactly one of"):
        mf.FoldConfig(target_latency=0.25, ratio=0.1)
    with pytest.raises(mf.FoldError, match="target_latency"):
        mf.FoldConfig(target_latency=1.5)


def test_target_latency_on_the_real_clock_meets_what_it_measured():
    model = make_model("resnet18")
    x = torch.randn(16, 3, 32, 32)
    folded = mf.fold(model, x, target_latency=0.3)
    extra = folded._modelfold_record.extra
    assert extra["latency_after_s"] <= extra["latency_goal_s"] < extra["latency_before_s"]
    run_model(folded, x)  # the folded model runs on the example


def test_cli_fold_with_target_latency(tmp_path, mac_clock):
    from typer.testing import CliRunner

    from modelfold.cli import app

    mf.save(make_model("lenet5"), tmp_path / "dense")
    result = CliRunner().invoke(app, ["fold", str(tmp_path / "dense"), "--target-latency",
                                      "0.3", "--out", str(tmp_path / "folded")])
    assert result.exit_code == 0, result.output
    assert mf.load(tmp_path / "folded")._modelfold_record.config["target_latency"] == 0.3
    result = CliRunner().invoke(app, ["fold", str(tmp_path / "dense"), "--target-latency",
                                      "0.3", "--ratio", "0.2", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "only one of" in result.output


def test_target_latency_search_traces_the_model_once(mac_clock, monkeypatch):
    traces, real = [], modelfold.graph_fold.discover_groups
    monkeypatch.setattr(modelfold.graph_fold, "discover_groups",
                        lambda *a, **k: traces.append(1) or real(*a, **k))
    mf.fold(make_model("resnet18"), X, target_latency=0.4)
    assert len(traces) == 1 and len(mac_clock.calls) >= 8  # seven folds, one trace
