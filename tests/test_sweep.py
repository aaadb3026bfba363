"""`modelfold sweep`: the quick preset end to end, resumability, SP baselines."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from typer.testing import CliRunner

import modelfold as mf
import modelfold.latency
from conftest import make_model
from experiments.sweep import FIELDS, preset, read_rows, run_sweep
from experiments.train import pretrained_fashion_mnist
from modelfold.baselines import magnitude_prune
from modelfold.baselines.magnitude import channel_norms
from modelfold.cli import app
from modelfold.graph import discover_groups
from modelfold.merge.apply import memory_bytes
from modelfold.summary import count_macs


def test_quick_sweep_writes_tables_and_plots_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["sweep", "--preset", "quick", "--out",
                                      str(tmp_path / "out"), "--ratios", "0.5"])
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "out" / "sweep_quick.csv")
    methods = {r["method"] for r in rows}
    assert methods == {"dense", "fold-naive", "fold-r", "fold-ar", "fold-dir", "sp-l1", "sp-l2",
                       "ifm", "inn", "neuron-merging", "intra-fusion"}
    assert set(rows[0]) == set(FIELDS)
    folded = [r for r in rows if r["method"] != "dense"]
    # same groups and ratio semantics: folding and pruning reach the same sparsity
    assert len({round(float(r["sparsity"]), 6) for r in folded}) == 1
    assert all(float(r["latency_ratio"]) > 0 for r in folded)
    acc = {r["method"]: float(r["accuracy"]) for r in rows}
    assert acc["fold-r"] > acc["fold-naive"]
    assert (tmp_path / "out" / "sweep_quick.md").read_text().count("\n") == len(rows) + 2
    assert (tmp_path / "out" / "sweep_quick_vgg11_bn-w8_whole.png").stat().st_size > 10_000
    # an interrupted sweep resumes: a rerun adds only the missing cells
    cut = [r for r in rows if r["method"] not in ("sp-l2", "inn")]
    (tmp_path / "out" / "sweep_quick.csv").write_text(
        ",".join(FIELDS) + "\n" + "\n".join(",".join(r[f] for f in FIELDS) for r in cut) + "\n")
    cfg = dataclasses.replace(preset("quick"), ratios=[0.5])
    again = run_sweep(cfg, tmp_path / "out", "sweep_quick", log=lambda line: None)
    assert [r["method"] for r in again[len(cut):]] == ["sp-l2", "inn"]


def test_sweep_spends_mac_memory_and_latency_budgets(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "sweep", "--preset", "quick", "--out", str(out), "--ratios", "0.4", "--budget", "macs",
        "--methods", "fold-naive,fold-naive-a,sp-l1"])
    assert result.exit_code == 0, result.output
    rows = read_rows(out / "sweep_quick.csv")
    dense = next(r for r in rows if r["method"] == "dense")
    folded = [r for r in rows if r["method"] != "dense"]
    assert {r["budget"] for r in folded} == {"macs"} and len(folded) == 3
    for r in folded:  # every method, the inertia allocation too, removes 40 % of the MACs
        assert 1 - int(r["macs"]) / int(dense["macs"]) == pytest.approx(0.4, abs=0.01)
    # the uniform fold and the pruning baseline land on the same shapes
    assert len({r["params"] for r in folded if r["method"] != "fold-naive-a"}) == 1
    assert "40% MACs removed" in (out / "sweep_quick.md").read_text()
    assert (out / "sweep_quick_vgg11_bn-w8_whole_macs.png").stat().st_size > 10_000

    cfg = dataclasses.replace(preset("quick"), ratios=[0.5], methods=["fold-naive", "sp-l1"],
                              budget="memory")
    rows = run_sweep(cfg, out, "memory", log=lambda line: None)
    cap = 0.5 * memory_bytes(pretrained_fashion_mnist("vgg11_bn", width=8, epochs=1))
    for r in (r for r in rows if r["method"] != "dense"):
        # float32 parameters (+ a few BN buffers) of the compressed model: half the dense bytes
        assert 0.9 * cap <= int(r["params"]) * 4 <= cap and r["budget"] == "memory"

    # latency: one target_latency search (here on a clock that counts MACs) sets the ratio
    # every method compresses at
    monkeypatch.setattr(modelfold.latency, "median_latency",
                        lambda model, inputs, **kw: count_macs(model, inputs[:1]) * 1e-9)
    rows = run_sweep(dataclasses.replace(cfg, budget="latency", ratios=[0.3]), out, "latency",
                     log=lambda line: None)
    dense, *folded = rows
    assert len({r["params"] for r in folded}) == 1 and len(folded) == 2
    assert 1 - int(folded[0]["macs"]) / int(dense["macs"]) >= 0.3

    with pytest.raises(mf.FoldError, match="unknown budget"):
        run_sweep(dataclasses.replace(cfg, budget="flops"), out, "x", log=lambda line: None)
    with pytest.raises(mf.FoldError, match="needs protocols"):
        run_sweep(dataclasses.replace(cfg, protocols=["whole", "last-two-blocks"]), out, "x",
                  log=lambda line: None)


def test_magnitude_pruning_keeps_the_largest_filters(example):
    model = make_model("vgg11_bn")
    pruned = magnitude_prune(model, example, ratio=0.5, p=2)
    folded = mf.fold(model, example, ratio=0.5)
    assert sum(p.numel() for p in pruned.parameters()) == sum(
        p.numel() for p in folded.parameters())
    group = next(g for g in discover_groups(model, example).groups if g.name == "features.0")
    norms = channel_norms(group, 2)
    keep = sorted(torch.argsort(norms, descending=True)[:4].tolist())
    assert torch.equal(pruned.features[0].weight, model.features[0].weight[keep])
    assert pruned(example).shape == (2, 10)


def test_magnitude_pruning_with_bn_reset_and_errors(example):
    model = make_model("resnet18")
    calibration = torch.randn(64, 3, 32, 32)
    pruned = magnitude_prune(model, example, ratio=0.5, p=1, reset_bn=calibration)
    assert pruned(example).shape == (2, 10)
    with pytest.raises(mf.FoldError, match="p must be 1 or 2"):
        magnitude_prune(model, example, ratio=0.5, p=3)
