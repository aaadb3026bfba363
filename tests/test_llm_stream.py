"""Streaming fold of a sharded checkpoint equals folding the loaded model in memory."""

from __future__ import annotations

import pytest
import torch

import modelfold as mf
from modelfold.errors import FoldError
from modelfold.llm.stream import fold_checkpoint
from test_llm import logits, tiny

transformers = pytest.importorskip("transformers")


@pytest.fixture
def sharded(tmp_path):
    model = tiny("llama", num_hidden_layers=3)
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB", safe_serialization=True)
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 2  # really sharded
    return model, tmp_path / "src"


@pytest.mark.parametrize("kwargs", [
    {"ratio": 0.4, "parts": ("mlp", "attention")},
    {"target_sparsity": 0.2},
    {"recipe": {"mlp": {0: 0.5, "1-2": 0.25}}},
])
def test_streamed_fold_equals_in_memory_fold(sharded, tmp_path, kwargs):
    model, src = sharded
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    record = fold_checkpoint(src, tmp_path / "out", seed=0, **kwargs)
    expected = mf.fold(model, seed=0, **kwargs)
    loaded = mf.load(tmp_path / "out")
    assert record["params_after"] == sum(p.numel() for p in expected.parameters())
    assert torch.equal(logits(loaded), logits(expected))
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # source untouched
    if "recipe" not in kwargs:  # uniform shapes: plain transformers loads the folder
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        assert torch.equal(logits(plain), logits(expected))


def test_streamed_fold_of_a_single_file_and_errors(tmp_path):
    model = tiny("qwen2")
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    fold_checkpoint(tmp_path / "src", tmp_path / "out", ratio=0.3)
    assert torch.equal(logits(mf.load(tmp_path / "out")), logits(mf.fold(model, ratio=0.3)))
    with pytest.raises(FoldError, match=r"no config\.json"):
        fold_checkpoint(tmp_path, tmp_path / "x", ratio=0.3)
    with pytest.raises(FoldError, match="must differ"):
        fold_checkpoint(tmp_path / "src", tmp_path / "src", ratio=0.3)
    (tmp_path / "src" / "model.safetensors").unlink()
    with pytest.raises(FoldError, match="neither"):
        fold_checkpoint(tmp_path / "src", tmp_path / "y", ratio=0.3)
    assert not (tmp_path / "y").exists()


def test_cli_stream_option(sharded, tmp_path):
    from typer.testing import CliRunner

    from modelfold.cli import app

    model, src = sharded
    result = CliRunner().invoke(app, ["fold-llm", str(src), "--out", str(tmp_path / "o"),
                                      "--ratio", "0.3", "--stream"])
    assert result.exit_code == 0, result.output
    assert torch.equal(logits(mf.load(tmp_path / "o")), logits(mf.fold(model, ratio=0.3)))
