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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("options", [
    {"target_sparsity": 0.15, "self_calibrate": True},
    {"ratio": 0.3, "allocation": "inertia"},
    {"ratio": 0.3, "repair": "self_generated", "parts": ("mlp", "attention")},
])
def test_streamed_calibrated_fold_equals_in_memory_fold(tmp_path, monkeypatch, arch, options):
    """Folds that run the model (self-generated text, sensitivity allocation, refit) or read
    every layer (inertia allocation) stream too: the same model as folding in memory, with
    never more than one decoder layer holding weights."""
    from modelfold.llm import stream

    model = tiny(arch, num_hidden_layers=4, bos_token_id=1)  # generation starts at the BOS
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB", safe_serialization=True)
    loaded_at_once: list[int] = []
    original_load = stream._StreamedLayers._load

    def counting_load(self, i):
        loaded = original_load(self, i)
        loaded_at_once.append(sum(any(t.device.type != "meta" for t in layer.parameters())
                                  for layer in self.modules))
        return loaded

    monkeypatch.setattr(stream._StreamedLayers, "_load", counting_load)
    config = mf.LLMFoldConfig(seed=0, **options)
    record = fold_checkpoint(tmp_path / "src", tmp_path / "out", config=config)
    expected = mf.fold(model, None, config)
    assert torch.equal(logits(mf.load(tmp_path / "out")), logits(expected))
    assert record["params_after"] == sum(p.numel() for p in expected.parameters())
    assert record["settings"]["streamed"] is True
    assert loaded_at_once and max(loaded_at_once) == 1


def test_streamed_self_calibration_generates_the_models_own_text(tmp_path):
    """The text generated with the layers streamed is the text the loaded model generates."""
    from modelfold.llm.architectures import architecture_of
    from modelfold.llm.fold import LLMFoldContext
    from modelfold.llm.stream import (
        _runnable_skeleton,
        _ShardReader,
        _StreamedLayers,
        checkpoint_index,
    )

    model = tiny("llama", num_hidden_layers=3)
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB", safe_serialization=True)
    config = mf.LLMFoldConfig(ratio=0.2, self_calibrate=True, seed=3)
    reader = _ShardReader(tmp_path / "src", checkpoint_index(tmp_path / "src"))
    skeleton = _runnable_skeleton(tmp_path / "src", model.config, reader, None)
    layers = _StreamedLayers(skeleton, architecture_of(skeleton), reader, None)
    with layers.loaded_on_call():
        streamed = LLMFoldContext(skeleton, config).tokens
    reader.close()
    assert all(p.device.type == "meta" for p in skeleton.model.layers.parameters())
    assert torch.equal(streamed, LLMFoldContext(model, config).tokens)
    assert streamed.unique().numel() > 20  # real sampled text, not one repeated token
