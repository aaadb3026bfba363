"""Bounded-memory folding of a big LLM from sharded safetensors: peak RSS vs model size.

`python benchmarks/llm_streaming.py [--size 1.6b|tiny] [--device cpu|cuda] [--ratio 0.2]`
`python benchmarks/llm_streaming.py --size smollm2 --self-calibrate --in-memory`

Writes a synthetic LLaMA checkpoint (random bf16 weights, one shard per decoder layer, never
the whole model in memory; "1.6b" = hidden 2048, MLP 8192, 24 layers, 16 query / 8 KV heads,
vocab 32000: 1.64 B parameters, 3.3 GB), then folds its MLPs with
`modelfold.llm.stream.fold_checkpoint` and reports fold wall time, the peak RSS of the fold
(`modelfold.eval.resources.PeakMemory`: reset at the start, read at the end) and, on CUDA, the
peak GPU allocation, next to the size of the checkpoint. With `--in-memory` it also loads the
model and folds it with `modelfold.fold` for comparison. Each path is measured in a fresh
process. "0.15b" (hidden 768, MLP 3072, 12 layers, vocab 32000) is the CPU-sized comparison.

`--size smollm2` uses the real SmolLM2-135M (fp32, re-saved with one shard per decoder layer);
`--self-calibrate` folds with the data-free self-calibrated recipe (`--target-sparsity`, default
0.2): the streamed path generates the calibration text with the model streamed layer by layer,
and the table adds the largest logit difference between the two folded models and their
perplexities on the SmolLM2 benchmark text.
Results: benchmarks/results/<name>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {
    "1.6b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=8, vocab_size=32000),
    "0.15b": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, vocab_size=1000),
}


def shard_key(name: str) -> str:
    """One shard per decoder layer, one for everything else."""
    parts = name.split(".")
    return f"layer-{int(parts[2]):05d}" if parts[:2] == ["model", "layers"] else "rest"


def write_shards(folder: Path, groups: Iterable[tuple[str, dict[str, torch.Tensor]]]) -> int:
    """Write each (key, tensors) group as `model-<key>.safetensors` (one group in memory at a
    time) and the index; returns the number of elements written."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weight_map, total, nbytes = {}, 0, 0
    for key, tensors in groups:
        shard = f"model-{key}.safetensors"
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() for t in tensors.values())
        nbytes += sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": nbytes}, "weight_map": weight_map}))
    return total


def write_synthetic(folder: Path, size: str, seed: int = 0) -> int:
    """A random LLaMA checkpoint written layer by layer; returns its parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False,
                         dtype="bfloat16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    groups: dict[str, dict[str, torch.Size]] = {}
    for name, p in skeleton.state_dict().items():
        groups.setdefault(shard_key(name), {})[name] = p.shape

    def random_groups():  # generated one shard at a time: never the whole model in memory
        for key, shapes in groups.items():
            yield key, {name: (torch.ones(shape) if name.endswith("norm.weight")
                               else torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
                        for name, shape in shapes.items()}

    total = write_shards(folder, random_groups())
    config.save_pretrained(folder)
    return total


def write_smollm2(folder: Path) -> int:
    """SmolLM2-135M (fp32) re-saved with one shard per decoder layer; its parameter count."""
    from transformers import AutoModelForCausalLM

    from modelfold.zoo.llm import smollm2_folder

    source = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        groups.setdefault(shard_key(name), {})[name] = t.contiguous()
    write_shards(folder, groups.items())
    model.config.save_pretrained(folder)
    for extra in source.iterdir():
        if extra.suffix in (".json", ".txt", ".jinja") and not (folder / extra.name).exists():
            (folder / extra.name).write_bytes(extra.read_bytes())
    return sum(p.numel() for p in model.parameters())


def fold_config(args: argparse.Namespace):
    import modelfold as mf

    if args.self_calibrate:
        return mf.LLMFoldConfig(target_sparsity=args.target_sparsity, self_calibrate=True)
    return mf.LLMFoldConfig(ratio=args.ratio, n_init=args.n_init)


def measure(path: str, work: Path, args: argparse.Namespace) -> dict:
    """Fold with one path in this (fresh) process; wall time and peak memory of the fold."""
    from transformers import AutoModelForCausalLM

    import modelfold as mf
    from modelfold.eval.resources import PeakMemory
    from modelfold.llm.stream import fold_checkpoint

    torch.set_num_threads(args.threads)
    config = fold_config(args)
    dtype = torch.float32 if args.size == "smollm2" else torch.bfloat16
    with PeakMemory() as peak:
        start = time.perf_counter()
        if path == "streamed":
            record = fold_checkpoint(work / "src", work / "out-streamed", config=config,
                                     device=args.device)
            after = record.params_after
        else:
            model = AutoModelForCausalLM.from_pretrained(work / "src", dtype=dtype)
            folded = mf.fold(model, config=config, device=args.device)
            after = sum(p.numel() for p in folded.parameters())
        seconds = time.perf_counter() - start
    if path == "in-memory" and args.self_calibrate:
        mf.save(folded, work / "out-in-memory")
    return {"seconds": seconds, "start_rss_mb": peak.start_rss_mb, "rss_mb": peak.rss_mb,
            "cuda_mb": peak.cuda_mb, "params_after": after}


def compare(work: Path) -> str:
    """Largest logit difference of the two folded models and their perplexities."""
    from transformers import AutoTokenizer

    import modelfold as mf
    from modelfold.eval.perplexity import (
        make_windows,
        offline_wiki_text,
        perplexity,
        pick_windows,
        tokenize_text,
    )

    streamed, in_memory = mf.load(work / "out-streamed"), mf.load(work / "out-in-memory")
    tokens = tokenize_text(AutoTokenizer.from_pretrained(work / "src"),
                           offline_wiki_text().read_text("utf-8"))
    windows = pick_windows(make_windows(tokens, 512), "tail:40")  # the LLM benchmark's "tail"
    with torch.no_grad():
        a, b = streamed(windows[:2]).logits, in_memory(windows[:2]).logits
    diff = float((a - b).abs().max() / b.abs().max())
    ppl = [perplexity(m, windows) for m in (streamed, in_memory)]
    return (f"Largest logit difference streamed vs in-memory fold, relative to the largest "
            f"logit: {diff:.2e}; perplexity on the benchmark text: streamed {ppl[0]:.4f}, "
            f"in-memory {ppl[1]:.4f}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1.6b", choices=[*sorted(SIZES), "smollm2"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--n-init", type=int, default=1)
    parser.add_argument("--self-calibrate", action="store_true")
    parser.add_argument("--target-sparsity", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--in-memory", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--measure", choices=["streamed", "in-memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mf-stream-"))
    if args.measure:  # child process: one path, result as the last line of stdout
        print(json.dumps(measure(args.measure, work, args)))
        return
    start = time.perf_counter()
    if args.size == "smollm2":
        params = write_smollm2(work / "src")
    else:
        params = write_synthetic(work / "src", args.size)
    print(f"wrote {params / 1e9:.2f} B parameters in {time.perf_counter() - start:.0f} s",
          flush=True)
    disk = sum(f.stat().st_size for f in (work / "src").glob("*.safetensors"))
    shards = len(list((work / "src").glob("*.safetensors")))
    mode = "_self_calibrated" if args.self_calibrate else ""
    name = args.name or f"llm_streaming_{args.size}{mode}_{args.device}"
    rows: list[tuple[str, dict]] = []
    labels = {"streamed": "streamed (fold_checkpoint)",
              "in-memory": "load + modelfold.fold (in memory)"}
    if args.self_calibrate:
        how = (f"{args.target_sparsity:.0%} of the parameters folded away with the "
               "self-calibrated recipe (self-generated text, activation clustering, sensitivity "
               "allocation, refit)")
    else:
        how = f"MLP folded at ratio {args.ratio} (k-means, n_init {args.n_init})"
    model_name = ("SmolLM2-135M (fp32" if args.size == "smollm2"
                  else f"Synthetic LLaMA ({args.size}: {params / 1e9:.2f} B parameters, bf16")
    for path in ["streamed", "in-memory"] if args.in_memory else ["streamed"]:
        # a fresh process per path: the RSS high-water mark and allocator state of one path
        # (or of writing the checkpoint) must not leak into the other's numbers
        cmd = [sys.executable, __file__, "--measure", path, "--workdir", str(work), "--ratio",
               str(args.ratio), "--n-init", str(args.n_init), "--device", args.device,
               "--size", args.size, "--target-sparsity", str(args.target_sparsity),
               "--threads", str(args.threads)] + (["--self-calibrate"] if args.self_calibrate
                                                  else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        rows.append((labels[path], result))
        header = (f"{model_name}, {disk / 2**30:.2f} GiB on disk, {shards} shards), {how} on "
                  f"{args.device} with {args.threads} torch threads; "
                  f"{result['params_after'] / 1e9:.3f} B parameters after. Each path runs in "
                  "a fresh process; RSS before = torch and transformers imported.")
        write_table(RESULTS / f"{name}.md", header, rows, disk)  # after every path
    if args.self_calibrate and args.in_memory:
        write_table(RESULTS / f"{name}.md", header, rows, disk, footer=compare(work))


def write_table(out: Path, header: str, rows: list[tuple[str, dict]], disk: int,
                footer: str = "") -> None:
    lines = [header, "", "| path | wall s | RSS before MiB | peak RSS MiB | peak RSS / checkpoint "
             "size | peak CUDA MiB |", "|---|---|---|---|---|---|"]
    for label, r in rows:
        cuda = f"{r['cuda_mb']:.0f}" if r["cuda_mb"] is not None else "-"
        lines.append(f"| {label} | {r['seconds']:.0f} | {r['start_rss_mb']:.0f} | "
                     f"{r['rss_mb']:.0f} | {r['rss_mb'] * 2**20 / disk:.2f} | {cuda} |")
    if footer:
        lines += ["", footer]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text("\n".join(lines) + "\n")
    os.replace(out.with_suffix(".tmp"), out)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
