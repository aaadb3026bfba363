"""Folding Hugging Face LLaMA-family models: exactness on planted duplicates, GQA validity,
budgets, dtypes, non-mutation and Hugging Face round trips (tiny random configs)."""

from __future__ import annotations

import copy

import pytest
import torch

import modelfold as mf

transformers = pytest.importorskip("transformers")

ARCHS = {
    "llama": lambda **kw: transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)),
    "qwen2": lambda **kw: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)),
    "mistral": lambda **kw: transformers.MistralForCausalLM(transformers.MistralConfig(**kw)),
    "gemma3": lambda **kw: _gemma3(**kw),
}


def _gemma3(**kw):
    """A tiny Gemma 3 text model: GeGLU, QK-norm, sandwich norms, a sliding window (8) shorter
    than the test sequences and alternating sliding / full-attention layers (different masks
    and rotary tables per layer)."""
    n = kw["num_hidden_layers"]
    kw = {"sliding_window": 8, "query_pre_attn_scalar": 16, "bos_token_id": 2,
          "eos_token_id": 1, "pad_token_id": 0,
          "layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(n)],
          **kw}
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**kw))


def tiny(arch: str = "llama", *, heads: int = 4, kv: int = 2, seed: int = 0,
         dtype: torch.dtype = torch.float32, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=heads, num_key_value_heads=kv, head_dim=16,
              max_position_embeddings=64, tie_word_embeddings=True)
    kw.update(extra)
    model = ARCHS[arch](**kw).eval().to(dtype)
    if arch == "qwen2":  # make the q/k/v biases non-trivial
        with torch.no_grad():
            for layer in model.model.layers:
                for name in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, name).bias.normal_(0, 0.1)
    if arch == "gemma3":  # Gemma's norms scale by 1 + weight, initialised to 0: make them matter
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.normal_(0, 0.3)
    return model


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def plant_mlp_duplicates(model, n_dup: int, share: float = 0.5) -> None:
    """The last `n_dup` channels of every MLP repeat the first ones (same gate/up rows) and
    carry `share` of the pair's down column (the first keep the rest), so merging each pair is
    exact."""
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            n = mlp.gate_proj.out_features
            src, dst = torch.arange(n_dup), torch.arange(n - n_dup, n)
            mlp.gate_proj.weight[dst] = mlp.gate_proj.weight[src]
            mlp.up_proj.weight[dst] = mlp.up_proj.weight[src]
            column = mlp.down_proj.weight[:, src].clone()
            mlp.down_proj.weight[:, src] = (1 - share) * column
            mlp.down_proj.weight[:, dst] = share * column


def plant_query_head_duplicates(model) -> None:
    """Query heads come in identical pairs inside each KV group (o columns split)."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            hd = attn.head_dim
            n_q = attn.q_proj.out_features // hd
            for h in range(0, n_q, 2):
                a, b = slice(h * hd, (h + 1) * hd), slice((h + 1) * hd, (h + 2) * hd)
                attn.q_proj.weight[b] = attn.q_proj.weight[a]
                if attn.q_proj.bias is not None:
                    attn.q_proj.bias[b] = attn.q_proj.bias[a]
                half = attn.o_proj.weight[:, a] / 2
                attn.o_proj.weight[:, a] = half
                attn.o_proj.weight[:, b] = half


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_planted_duplicate_mlp_channels_fold_losslessly(arch):
    model = tiny(arch)
    plant_mlp_duplicates(model, 24)
    folded = mf.fold(model, ratio=0.25)
    assert folded.config.intermediate_size == 72
    assert all(layer.mlp.down_proj.in_features == 72 for layer in folded.model.layers)
    torch.testing.assert_close(logits(folded), logits(model), atol=1e-4, rtol=1e-4)
    refined = mf.fold(model, config=mf.FoldConfig(ratio=0.25, clusterer="hartigan"))
    torch.testing.assert_close(logits(refined), logits(model), atol=1e-4, rtol=1e-4)


def test_self_generated_repair_brings_the_folded_model_closer_and_is_deterministic():
    model = tiny(num_hidden_layers=3)
    plain = mf.fold(model, ratio=0.5)
    repaired = mf.fold(model, ratio=0.5, repair="self_generated")
    again = mf.fold(model, ratio=0.5, repair="self_generated")
    ref = logits(model)
    assert (logits(repaired) - ref).norm() < 0.97 * (logits(plain) - ref).norm()
    torch.testing.assert_close(logits(repaired), logits(again), rtol=0, atol=0)
    assert repaired._modelfold_llm_record["settings"]["repair"] == "self_generated"
    for layer_p, layer_r in zip(plain.model.layers, repaired.model.layers, strict=True):
        # only the down projections are refitted
        assert torch.equal(layer_p.mlp.gate_proj.weight, layer_r.mlp.gate_proj.weight)
    with pytest.raises(mf.FoldError, match="graph-based"):
        mf.fold(model, ratio=0.5, repair="data")
    with pytest.raises(mf.FoldError, match="in place"):
        mf.fold(copy.deepcopy(model), ratio=0.5, repair="self_generated", inplace=True)


def test_inertia_allocation_takes_the_budget_from_the_redundant_layer(tmp_path):
    model = tiny(num_hidden_layers=3)
    layer = model.model.layers[1].mlp
    with torch.no_grad():  # layer 1 only: 48 channels repeat the other 48 (exact pairs)
        src, dst = torch.arange(48), torch.arange(48, 96)
        layer.gate_proj.weight[dst] = layer.gate_proj.weight[src]
        layer.up_proj.weight[dst] = layer.up_proj.weight[src]
        half = layer.down_proj.weight[:, src] / 2
        layer.down_proj.weight[:, src] = half
        layer.down_proj.weight[:, dst] = half
    uniform = mf.fold(model, ratio=0.15)
    spread = mf.fold(model, config=mf.FoldConfig(ratio=0.15, allocation="inertia"))
    count = mf.llm.fold.count_parameters
    assert 0.97 * count(uniform) <= count(spread) <= count(uniform)
    widths = [block.mlp.down_proj.in_features for block in spread.model.layers]
    assert widths[0] == widths[2] == 96 and widths[1] < 96  # 3 x 14 channels from layer 1
    torch.testing.assert_close(logits(spread), logits(model), atol=1e-4, rtol=1e-4)
    assert spread._modelfold_llm_record["settings"]["allocation"] == "inertia"
    mf.save(spread, tmp_path / "spread")  # per-layer widths survive save -> load
    torch.testing.assert_close(logits(mf.load(tmp_path / "spread")), logits(spread))
    with pytest.raises(mf.FoldError, match="MLP channels only"):
        mf.fold(model, parts=("mlp", "attention"),
                config=mf.FoldConfig(ratio=0.2, allocation="inertia"))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_gqa_query_heads_fold_within_their_kv_group(arch):
    model = tiny(arch, heads=8, kv=2)
    plant_query_head_duplicates(model)
    folded = mf.fold(model, ratio=0.5, parts=("attention",))
    cfg = folded.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    attn = folded.model.layers[0].self_attn
    assert attn.q_proj.out_features == 64 and attn.k_proj.out_features == 32
    assert attn.num_key_value_groups == 2
    torch.testing.assert_close(logits(folded), logits(model), atol=1e-4, rtol=1e-4)


def test_multi_head_attention_merges_whole_heads():
    model = tiny(heads=4, kv=4)
    with torch.no_grad():  # heads 2, 3 duplicate heads 0, 1 in q, k and v; o split
        for layer in model.model.layers:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(attn, name).weight[32:] = getattr(attn, name).weight[:32]
            half = attn.o_proj.weight[:, :32] / 2
            attn.o_proj.weight[:, :32] = half
            attn.o_proj.weight[:, 32:] = half
    folded = mf.fold(model, ratio=0.5, parts="attention")
    assert (folded.config.num_attention_heads, folded.config.num_key_value_heads) == (2, 2)
    torch.testing.assert_close(logits(folded), logits(model), atol=1e-4, rtol=1e-4)


def test_ratio_zero_is_identity_and_the_model_is_not_mutated():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    same = mf.fold(model, ratio=0.0, parts=("mlp", "attention"))
    torch.testing.assert_close(logits(same), logits(model), atol=0, rtol=0)
    folded = mf.fold(model, ratio=0.4, parts=("mlp", "attention"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.config.intermediate_size == 96 and model.config.num_attention_heads == 4
    assert folded.model.layers[0].mlp.gate_proj.out_features == 58
    assert folded.model.embed_tokens.weight is model.model.embed_tokens.weight  # shared, no copy
    assert torch.isfinite(logits(folded)).all()


def test_parameter_counts_target_sparsity_and_seed_determinism():
    model = tiny(num_hidden_layers=4)
    total = sum(p.numel() for p in model.parameters())
    folded = mf.fold(model, target_sparsity=0.2, parts=("mlp",))
    record = folded._modelfold_llm_record
    assert record["params_after"] == sum(p.numel() for p in folded.parameters())
    assert abs(1 - record["params_after"] / total - 0.2) <= 0.01
    report = mf.summary(model, folded)
    assert report.params_before == total and report.params_after == record["params_after"]
    k = folded.config.intermediate_size
    assert k < 96
    assert [(g.n, g.k) for g in report.groups if g.kind == "channels"] == [(96, k)] * 4
    assert "layers.3.mlp" in str(report)
    again = mf.fold(model, target_sparsity=0.2, parts=("mlp",))
    for (k, a), b in zip(folded.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(mf.FoldError, match="not reachable"):
        mf.fold(model, target_sparsity=0.9, parts=("attention",))


def test_recipe_gives_per_layer_shapes_and_mf_load_restores_them(tmp_path):
    model = tiny(num_hidden_layers=4)
    folded = mf.fold(model, recipe={"mlp": {"1-2": 0.5}, "attention": {3: 0.5}})
    sizes = [layer.mlp.gate_proj.out_features for layer in folded.model.layers]
    assert sizes == [96, 48, 48, 96]
    assert folded.model.layers[3].self_attn.q_proj.out_features == 32
    out = mf.save(folded, tmp_path / "folded")
    loaded = mf.load(out)
    torch.testing.assert_close(logits(loaded), logits(folded), atol=0, rtol=0)
    with pytest.raises(mf.FoldError, match="unknown recipe"):
        mf.fold(model, recipe="no-such-recipe")
    with pytest.raises(mf.FoldError, match="layer 9"):
        mf.fold(model, recipe={"mlp": {9: 0.5}})


@pytest.mark.parametrize("recipe, expected", [
    ({"mlp": {"1-2": 0.5}}, True),  # per-layer MLP widths: DeciLM layout
    ({"mlp": {1: 0.5}, "attention": {3: 0.5}}, False),  # query heads differ between layers
    ({"mlp": {"0-3": 0.5}}, False),  # uniform: the plain Llama config says it all
])
def test_per_layer_folds_write_decilm_block_configs(tmp_path, recipe, expected):
    """Per-layer folds also describe their layers the way vLLM's DeciLMForCausalLM builds them
    (KV heads = num_attention_heads // n_heads_in_group, MLP width = intermediate_size); the
    shapes it would build match the saved weights."""
    import json

    from safetensors import safe_open

    folded = mf.fold(tiny(num_hidden_layers=4, heads=4, kv=2), recipe=recipe)
    out = mf.save(folded, tmp_path / "folded")
    config = json.loads((out / "config.json").read_text())
    assert ("block_configs" in config) == expected
    if not expected:
        return
    head_dim = config["head_dim"]
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as fh:
        for i, block in enumerate(config["block_configs"]):
            kv = config["num_attention_heads"] // block["attention"]["n_heads_in_group"]
            width = block["ffn"]["intermediate_size"]
            prefix = f"model.layers.{i}."
            assert fh.get_slice(prefix + "self_attn.k_proj.weight").get_shape()[0] == kv * head_dim
            assert fh.get_slice(prefix + "mlp.up_proj.weight").get_shape()[0] == width
            assert fh.get_slice(prefix + "mlp.down_proj.weight").get_shape()[1] == width
            assert not block["attention"]["no_op"] and not block["ffn"]["no_op"]
    assert [b["ffn"]["intermediate_size"] for b in config["block_configs"]] == [96, 48, 48, 96]
    assert mf.load(out) is not None  # the extra key does not disturb modelfold.load


def test_uniform_fold_loads_in_a_process_that_never_imports_modelfold(tmp_path):
    """A user without modelfold installed: plain transformers loads the folder and computes the
    folded model's logits."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    folded = mf.fold(tiny(num_hidden_layers=3), ratio=0.3, parts=("mlp", "attention"))
    out = mf.save(folded, tmp_path / "hf")
    script = (
        "import sys, torch, transformers\n"
        "from safetensors.torch import save_file\n"
        f"model = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"ids = torch.tensor({IDS.tolist()!r})\n"
        "with torch.no_grad():\n"
        "    logits = model(ids).logits.float().contiguous()\n"
        f"save_file({{'logits': logits}}, {str(tmp_path / 'logits.safetensors')!r})\n"
        "assert not any(m == 'modelfold' or m.startswith('modelfold.') for m in sys.modules)\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    got = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    torch.testing.assert_close(got, logits(folded), atol=1e-6, rtol=1e-6)


def test_uniform_fold_loads_with_plain_from_pretrained(tmp_path):
    model = tiny("qwen2", heads=8, kv=2)
    folded = mf.fold(model, ratio=0.3, parts=("mlp", "attention"))
    out = mf.save(folded, tmp_path / "hf")
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(plain), logits(folded), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(mf.load(out)), logits(folded), atol=0, rtol=0)
    weights = next(out.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(mf.FoldError, match="checksum"):
        mf.load(out)


def test_half_precision_models_fold_in_fp32_and_keep_their_dtype():
    model = tiny(dtype=torch.bfloat16)
    plant_mlp_duplicates(model, 24)
    folded = mf.fold(model, ratio=0.25)
    assert all(p.dtype == torch.bfloat16 for p in folded.parameters())
    torch.testing.assert_close(logits(folded), logits(model), atol=0.05, rtol=0.05)



def test_half_precision_per_layer_fold_reloads_in_its_dtype(tmp_path):
    folded = mf.fold(tiny(dtype=torch.bfloat16), recipe={"mlp": {1: 0.5}})
    loaded = mf.load(mf.save(folded, tmp_path / "bf16"))
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    saved = folded.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    # rotary buffers are rebuilt by transformers (not saved), so logits agree to bf16 precision
    torch.testing.assert_close(logits(loaded), logits(folded), atol=0.05, rtol=0.05)


def test_bad_inputs_are_named():
    model = tiny()
    with pytest.raises(mf.FoldError, match="parts"):
        mf.fold(model, ratio=0.2, parts=("mlp", "embeddings"))
    with pytest.raises(mf.FoldError, match="exactly one"):
        mf.fold(model, ratio=0.2, recipe="llama-7b-paper")
    with pytest.raises(mf.FoldError, match="repair"):
        mf.fold(model, ratio=0.2, repair="data")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    with pytest.raises(mf.FoldError, match="supported model types"):
        mf.fold(gpt2, ratio=0.2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(mf.FoldError, match="NaN"):
        mf.fold(model, ratio=0.2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("parts", [("mlp",), ("mlp", "attention")])
def test_cuda_llm_fold_matches_cpu(parts):
    model = tiny("llama")
    cpu = mf.fold(model, ratio=0.4, parts=parts)  # shares unchanged tensors with `model`
    gpu = mf.fold(copy.deepcopy(model).cuda(), ratio=0.4, parts=parts)
    assert next(gpu.parameters()).device.type == "cuda"
    assert (logits(gpu, IDS.cuda()).cpu() - logits(cpu)).abs().max() <= 1e-3
