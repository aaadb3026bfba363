"""Export Hugging Face Llama-family models (dense or folded) to GGUF for llama.cpp.

Uniform layer widths are written as the ordinary `llama` architecture; per-layer widths (MLP width,
query or KV head counts differing between layers) as `deci`, whose llama.cpp graph reads
`feed_forward_length`, `attention.head_count` and `attention.head_count_kv` per layer. Metadata,
tensor names and the q/k RoPE permutation follow llama.cpp's `convert_hf_to_gguf.py`
(`LlamaModel` / `DeciModel`). The `gguf` package is imported lazily.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from hashlib import sha256
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelfold.errors import FoldError

DTYPES = ("f32", "f16", "bf16", "q8_0")

# convert_hf_to_gguf.py: get_vocab_base_pre hashes the token ids of this text.
_CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ '
           '(multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 '
           '33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
           '------======= нещо на Български '
           '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
           '\'RE you sure? '
           '\'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
_PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
}


def export_gguf(model: nn.Module, tokenizer: Any, path: str | Path, dtype: str = "f16",
                *, pre_tokenizer: str | None = None) -> Path:
    """Write `model` (a dense or folded Hugging Face Llama model) and its GPT-2-style BPE
    `tokenizer` to a GGUF file llama.cpp loads. `dtype`: f32 | f16 | bf16 | q8_0 (norms and
    other 1-D tensors stay f32, as llama.cpp's converter writes them). `pre_tokenizer` overrides
    `tokenizer.ggml.pre` (by default found from the tokenizer's hash, as the converter does)."""
    if dtype not in DTYPES:
        raise FoldError(f"Unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "llama":
        raise FoldError("GGUF export supports Hugging Face Llama models (config.model_type "
                        f"'llama'); got {getattr(cfg, 'model_type', type(model).__name__)!r}.")
    if tokenizer is None:
        raise FoldError("GGUF export needs the model's tokenizer (llama.cpp reads the vocabulary "
                        "from the file).")
    import gguf

    shapes, head_dim = layer_shapes(model)
    per_layer = len(set(shapes)) > 1
    arch = gguf.MODEL_ARCH.DECI if per_layer else gguf.MODEL_ARCH.LLAMA
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    _write_parameters(writer, cfg, shapes, head_dim, per_layer, dtype)
    _write_vocab(writer, tokenizer, int(cfg.vocab_size), pre_tokenizer)
    for name, data, qtype in _tensors(model, arch, shapes, head_dim, dtype):
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def layer_shapes(model: nn.Module) -> tuple[list[tuple[int, int, int]], int]:
    """Per layer (intermediate size, query heads, KV heads) read from the weights, and the one
    head dimension all layers share (llama.cpp has a single head size)."""
    layers = model.model.layers
    head_dims = {int(layer.self_attn.head_dim) for layer in layers}
    if len(head_dims) != 1:
        raise FoldError(f"Layers have different attention head_dim {sorted(head_dims)}; "
                        "llama.cpp (llama / deci) needs one head_dim for all layers.")
    head_dim = head_dims.pop()
    shapes = []
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        nq, nk, nv = (attn.q_proj.out_features, attn.k_proj.out_features,
                      attn.v_proj.out_features)
        if nq % head_dim or nk % head_dim or nk != nv or attn.o_proj.in_features != nq:
            raise FoldError(f"Layer {i}: q/k/v widths {nq}/{nk}/{nv} are not whole heads of "
                            f"head_dim {head_dim}; llama.cpp cannot express this layer.")
        if (nq // head_dim) % (nk // head_dim):
            raise FoldError(f"Layer {i}: {nq // head_dim} query heads are not a multiple of "
                            f"{nk // head_dim} KV heads.")
        shapes.append((mlp.gate_proj.out_features, nq // head_dim, nk // head_dim))
    return shapes, head_dim


def _rope_parameters(cfg: Any) -> dict[str, Any]:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    params.update(getattr(cfg, "rope_scaling", None) or {})
    if "rope_theta" not in params and getattr(cfg, "rope_theta", None) is not None:
        params["rope_theta"] = cfg.rope_theta
    return params


def _write_parameters(writer: Any, cfg: Any, shapes: list[tuple[int, int, int]], head_dim: int,
                      per_layer: bool, dtype: str) -> None:
    import gguf

    ff, heads, kv = (list(x) for x in zip(*shapes, strict=True))
    writer.add_block_count(len(shapes))
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    if per_layer:
        writer.add_feed_forward_length(ff)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv)
    else:
        writer.add_feed_forward_length(ff[0])
        writer.add_head_count(heads[0])
        writer.add_head_count_kv(kv[0])
    rope = _rope_parameters(cfg)
    rope_type = (rope.get("rope_type") or rope.get("type") or "default").lower()
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type not in ("default", "llama3"):
        raise FoldError(f"RoPE type {rope_type!r} is not supported by the GGUF export.")
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_key_length(head_dim)  # n_embd / n_head no longer holds once heads are folded
    writer.add_value_length(head_dim)
    writer.add_vocab_size(int(cfg.vocab_size))
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32,
                          "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def pre_tokenizer_name(tokenizer: Any) -> str | None:
    """llama.cpp's pre-tokenizer name for `tokenizer`, found like convert_hf_to_gguf does (hash
    of the ids of a probe text); None when the hash is not in the known list."""
    ids = tokenizer.encode(_CHKTXT)
    return _PRE_BY_HASH.get(sha256(str(ids).encode()).hexdigest())


def _write_vocab(writer: Any, tokenizer: Any, vocab_size: int, pre: str | None) -> None:
    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise FoldError(f"The tokenizer has ids up to {max(vocab.values())}, the model's "
                        f"vocabulary is {vocab_size}.")
    if pre is None:
        pre = pre_tokenizer_name(tokenizer)
        if pre is None:
            warnings.warn("Unknown BPE pre-tokenizer (hash not in modelfold's list); writing "
                          "'default'. Pass pre_tokenizer= to name it.", stacklevel=3)
            pre = "default"
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = getattr(tokenizer, "added_tokens_decoder", {})
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            entry = decoder.get(i)
            if entry is not None and not entry.normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = (entry is not None and entry.special) or token in ("<pad>", "<mask>") or (
                token.startswith("<|") and token.endswith("|>"))
            if special:
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
        if not special.merges:
            raise FoldError("GGUF export supports GPT-2-style BPE tokenizers (with merges); "
                            f"{type(tokenizer).__name__} has none.")
        special.add_to_gguf(writer, quiet=True)


def permute_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half q/k rows -> GGML interleaved RoPE (LlamaModel.permute)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def unpermute_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `permute_rope`."""
    return (weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _llama3_rope_factors(cfg: Any, head_dim: int) -> torch.Tensor:
    rope = _rope_parameters(cfg)
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _tensors(model: nn.Module, arch: Any, shapes: list[tuple[int, int, int]], head_dim: int,
             dtype: str):
    import gguf

    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    tied = bool(getattr(model.config, "tie_word_embeddings", False))

    def emit(kind: Any, tensor: torch.Tensor, bid: int | None = None, suffix: str = "weight"):
        name = (names[kind].format(bid=bid) if bid is not None else names[kind]) + "." + suffix
        return (name, *_encode(tensor, dtype))

    yield emit(T.TOKEN_EMBD, model.model.embed_tokens.weight)
    rope = _rope_parameters(model.config)
    if (rope.get("rope_type") or rope.get("type") or "").lower() == "llama3":
        yield emit(T.ROPE_FREQS, _llama3_rope_factors(model.config, head_dim))
    for bid, (layer, (_, n_head, n_kv)) in enumerate(zip(model.model.layers, shapes, strict=True)):
        attn, mlp = layer.self_attn, layer.mlp
        yield emit(T.ATTN_NORM, layer.input_layernorm.weight, bid)
        for kind, lin, heads in ((T.ATTN_Q, attn.q_proj, n_head), (T.ATTN_K, attn.k_proj, n_kv),
                                 (T.ATTN_V, attn.v_proj, None), (T.ATTN_OUT, attn.o_proj, None)):
            for suffix in ("weight", "bias"):
                t = getattr(lin, suffix, None)
                if t is None:
                    continue
                yield emit(kind, permute_rope(t, heads) if heads else t, bid, suffix)
        yield emit(T.FFN_NORM, layer.post_attention_layernorm.weight, bid)
        for kind, lin in ((T.FFN_GATE, mlp.gate_proj), (T.FFN_UP, mlp.up_proj),
                          (T.FFN_DOWN, mlp.down_proj)):
            for suffix in ("weight", "bias"):
                t = getattr(lin, suffix, None)
                if t is not None:
                    yield emit(kind, t, bid, suffix)
    yield emit(T.OUTPUT_NORM, model.model.norm.weight)
    if not tied:
        yield emit(T.OUTPUT, model.lm_head.weight)


def _encode(tensor: torch.Tensor, dtype: str):
    """numpy data and GGML type for one tensor; 1-D tensors stay f32 (as the converter does)."""
    import gguf
    import numpy as np

    data = tensor.detach().to("cpu", torch.float32).contiguous()
    if data.ndim <= 1 or dtype == "f32":
        return data.numpy(), gguf.GGMLQuantizationType.F32
    if dtype == "f16":
        return data.numpy().astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    if dtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        # a row that is not a whole number of blocks: the converter falls back to f16
        qtype = gguf.GGMLQuantizationType.F16
        return data.numpy().astype(np.float16), qtype
    return gguf.quants.quantize(data.numpy(), qtype), qtype
