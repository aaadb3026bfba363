"""The command line: fold, summary, clean errors with exit code 2."""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import modelfold as mf
from conftest import make_model
from modelfold.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("fold", "summary", "demo"):
        assert command in result.output


def test_fold_a_saved_folder_then_summarise(tmp_path, example):
    model = make_model("vgg11_bn")
    mf.save(model, tmp_path / "dense")
    result = runner.invoke(app, ["fold", str(tmp_path / "dense"), "--ratio", "0.5",
                                 "--out", str(tmp_path / "folded")])
    assert result.exit_code == 0, result.output
    folded = mf.load(tmp_path / "folded")
    assert folded.features[0].out_channels == 4
    assert folded(example).shape == (2, 10)
    result = runner.invoke(app, ["summary", str(tmp_path / "folded")])
    assert result.exit_code == 0, result.output
    assert "folded" in result.output and "->" in result.output


def test_fold_a_weights_file_with_a_zoo_architecture(tmp_path):
    model = make_model("resnet18")
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    for weights in ("w.safetensors", "w.pt"):
        out = tmp_path / f"out-{weights}"
        result = runner.invoke(app, ["fold", str(tmp_path / weights), "--model", "resnet18",
                                     "--model-kwargs", '{"width": 8}', "--target-sparsity",
                                     "0.5", "--out", str(out)])
        assert result.exit_code == 0, result.output
        s = mf.summary(None, mf.load(out))
        assert abs(s.sparsity - 0.5) <= 0.01


def test_fold_command_beyond_the_paper_options(tmp_path, example):
    model = make_model("vgg11_bn")
    mf.save(model, tmp_path / "dense")
    result = runner.invoke(app, ["fold", str(tmp_path / "dense"), "--ratio", "0.4",
                                 "--clusterer", "hartigan", "--allocation", "inertia",
                                 "--round-to", "4", "--out", str(tmp_path / "folded")])
    assert result.exit_code == 0, result.output
    folded = mf.load(tmp_path / "folded")
    cfg = folded._modelfold_record.config
    assert (cfg["clusterer"], cfg["allocation"], cfg["round_to"]) == ("hartigan", "inertia", 4)
    widths = [m.out_channels for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 4 == 0 for w in widths)
    assert folded(example).shape == (2, 10)
    result = runner.invoke(app, ["fold", str(tmp_path / "dense"), "--ratio", "0.4",
                                 "--round-to", "auto", "--out", str(tmp_path / "auto")])
    assert result.exit_code == 0, result.output
    record = mf.load(tmp_path / "auto")._modelfold_record
    assert record.config["round_to"] == record.extra["round_to_auto"]["round_to"]


def test_errors_are_clean_messages_with_exit_code_2(tmp_path):
    cases = [
        ["fold", str(tmp_path / "missing"), "--ratio", "0.5", "--out", str(tmp_path / "o")],
        ["fold", str(tmp_path), "--ratio", "1.5", "--out", str(tmp_path / "o")],
        ["summary", str(tmp_path / "missing")],
    ]
    (tmp_path / "w.pt").write_bytes(b"junk")
    cases.append(["fold", str(tmp_path / "w.pt"), "--ratio", "0.5", "--out", str(tmp_path / "o")])
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
        assert "error" in result.output.lower()


def test_fold_with_repair_from_the_command_line(tmp_path, example):
    model = make_model("vgg11_bn")
    mf.save(model, tmp_path / "dense")
    torch.save(torch.randn(64, 3, 32, 32), tmp_path / "calib.pt")
    for repair, extra in [("data", ["--calibration", str(tmp_path / "calib.pt")]),
                          ("approx", [])]:
        out = tmp_path / f"folded-{repair}"
        result = runner.invoke(app, ["fold", str(tmp_path / "dense"), "--ratio", "0.5",
                                     "--repair", repair, "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        assert mf.load(out)._modelfold_record.config["repair"] == repair
    result = runner.invoke(app, ["fold", str(tmp_path / "dense"), "--ratio", "0.5", "--repair",
                                 "data", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "calibration" in result.output
