"""`round_to="auto"`: the multiple whose fold runs fastest is measured on the model. A fake
device clock (MACs, doubled when a convolution's channel count is not a multiple of 8) makes
the choice deterministic; one test uses the real clock and checks only what was measured."""

from __future__ import annotations

import pytest
import torch

import modelfold as mf
import modelfold.latency
from modelfold.macs import count_macs
from modelfold.zoo import create_model

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def vgg() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("vgg11_bn", width=16).eval()


def convs(model: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.fixture
def clock(monkeypatch):
    """latency := MACs * 1e-9 s, times `clock.penalty` when a conv writes a channel count
    that is not a multiple of 8 (a device whose kernels like multiples of 8)."""
    def fake(model, inputs, **_kw):
        aligned = all(c.out_channels % 8 == 0 for c in convs(model))
        return count_macs(model, inputs) * 1e-9 * (1.0 if aligned else fake.penalty)

    fake.penalty = 2.0
    monkeypatch.setattr(modelfold.latency, "median_latency", fake)
    return fake


def test_auto_picks_the_multiple_the_device_runs_fastest_at_the_same_budget(clock):
    model = vgg()
    exact = mf.fold(model, X, ratio=0.3)
    folded = mf.fold(model, X, config=mf.FoldConfig(ratio=0.3, round_to="auto"))
    record = folded._modelfold_record
    assert record.config["round_to"] == 8
    measured = record.extra["round_to_auto"]
    assert measured["round_to"] == 8 and set(measured["seconds"]) >= {"1", "8"}
    assert measured["seconds"]["8"] < measured["seconds"]["1"]
    assert all(c.out_channels % 8 == 0 for c in convs(folded))
    # the ratio's budget is kept as the MACs it removes with exact counts
    removed = 1 - count_macs(folded, X) / count_macs(model, X)
    assert removed == pytest.approx(1 - count_macs(exact, X) / count_macs(model, X), abs=0.01)
    assert record.config["target_macs"] == pytest.approx(measured["target_macs"])
    assert torch.isfinite(folded(X)).all()


def test_without_an_alignment_effect_auto_is_the_exact_fold(clock):
    clock.penalty = 1.0  # every count runs at the speed of its MACs
    model = vgg()
    folded = mf.fold(model, X, config=mf.FoldConfig(target_sparsity=0.4, round_to="auto",
                                                    repair="approx"))
    exact = mf.fold(model, X, config=mf.FoldConfig(target_sparsity=0.4, repair="approx"))
    assert folded._modelfold_record.config["round_to"] == 1
    assert all(torch.equal(a, b) for a, b in zip(folded.state_dict().values(),
                                                 exact.state_dict().values(), strict=True))


def test_auto_refusals_and_round_trip():
    with pytest.raises(mf.FoldError, match="target_latency"):
        mf.fold(vgg(), X, config=mf.FoldConfig(target_latency=0.3, round_to="auto"))
    with pytest.raises(mf.FoldError, match="round_to must be a positive integer"):
        mf.LLMFoldConfig(ratio=0.2, round_to="auto")
    with pytest.raises(mf.FoldError, match="round_to must be a positive integer"):
        mf.FoldConfig(ratio=0.2, round_to="fast")
    config = mf.FoldConfig(ratio=0.2, round_to="auto")
    assert mf.FoldConfig.from_dict(config.to_dict()) == config


def test_auto_on_the_real_clock_returns_the_fastest_measured_multiple():
    model = create_model("lenet5", width=16).eval()
    x = torch.randn(64, 3, 32, 32)
    folded = mf.fold(model, x, config=mf.FoldConfig(ratio=0.25, round_to="auto"))
    measured = folded._modelfold_record.extra["round_to_auto"]
    seconds = {int(m): t for m, t in measured["seconds"].items()}
    best = measured["round_to"]
    assert best in seconds and seconds[best] <= min(seconds.values()) / (1 - 0.03) + 1e-12
    assert all(seconds[m] >= (1 - 0.03) * seconds[best] for m in seconds if m > best)
