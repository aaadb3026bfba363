"""Inference speed of folded vs dense models, next to the MAC reduction (the physical limit).

`python benchmarks/inference_speed.py --what cnn|smollm2|synthetic-llm [--device cpu|cuda]`

* cnn: CIFAR-style ResNet18 and VGG11-BN (width 32, 32x32 inputs) folded at ratios 0.3 / 0.5
  (0.3 also with channel counts rounded to multiples of 8);
  latency of a batch of 256 and of a single image, throughput, MAC ratio (`modelfold.summary`).
* smollm2: real SmolLM2-135M (fp32, CPU) with 10 / 20 / 30 % of its MLP channels removed:
  prefill latency (1 x 512 tokens) and greedy decoding speed (64 new tokens).
* synthetic-llm: a random LLaMA of 1.6 B parameters (bf16, the `llm_streaming` config) on the
  GPU, MLP ratios 0.2 / 0.4, each with exact widths and with widths rounded to multiples of
  64 (`round_to`): prefill (8 x 1024 tokens) and decoding (batch 8, 128 tokens).
  Only shapes matter for speed, so the compressed LLMs (both) are built with the data-free magnitude
  selection (`prune_llm`), which gives exactly the shapes folding gives at the same ratio
  without the clustering time.

Every number is the median of repeated runs after warm-up, dense and compressed measured in the
same process. "Linear MACs" counts the multiply-accumulates of the linear layers per token.
Results: benchmarks/results/inference_speed_<what>_<device>.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], object], runs: int, device: str, warmup: int = 2) -> float:
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def linear_macs(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def cnn_rows(device: str) -> list[str]:
    import modelfold as mf
    from modelfold.summary import count_macs
    from modelfold.zoo import create_model

    rows = ["| model | ratio | round_to | params | MACs ratio | latency b=256 ms | "
            "speed-up b=256 | latency b=1 ms | speed-up b=1 | images/s b=256 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("resnet18", "vgg11_bn"):
        torch.manual_seed(0)
        dense = create_model(name, width=32).eval().to(device)
        x = torch.randn(256, 3, 32, 32, device=device)
        base: dict[str, float] = {}
        for ratio, multiple in ((0.0, 1), (0.3, 1), (0.3, 8), (0.5, 1)):
            config = mf.FoldConfig(ratio=ratio, round_to=multiple)
            model = dense if ratio == 0 else mf.fold(dense, x[:1], config=config)
            macs = count_macs(model, x[:1])
            model = model.to(memory_format=torch.channels_last)
            xb = x.contiguous(memory_format=torch.channels_last)
            big = timed(lambda m=model, xb=xb: m(xb), 10, device)
            one = timed(lambda m=model, xb=xb: m(xb[:1]), 50, device)
            if ratio == 0:
                base = {"big": big, "one": one, "macs": macs}
            rows.append(f"| {name}-w32 | {ratio} | {multiple} | "
                        f"{sum(p.numel() for p in model.parameters()):,}"
                        f" | {macs / base['macs']:.2f} | {1000 * big:.1f} | "
                        f"{base['big'] / big:.2f}x | {1000 * one:.2f} | {base['one'] / one:.2f}x"
                        f" | {256 / big:,.0f} |")
            print(rows[-1], flush=True)
    return rows


def llm_rows(model, device: str, ratios: list[tuple[float, int]], batch: int, prompt: int,
             new: int, runs: int) -> list[str]:
    """Rows for the dense model and each (MLP ratio, round_to) of `ratios`."""
    from modelfold.baselines import prune_llm

    rows = ["| MLP ratio | round_to | MLP width | params | linear MACs ratio | prefill ms | "
            "prefill speed-up | decode tokens/s | decode speed-up |",
            "|---|---|---|---|---|---|---|---|---|"]
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    base: dict[str, float] = {}
    for ratio, multiple in [(0.0, 1), *ratios]:
        compressed = model if ratio == 0 else prune_llm(model, method="magnitude", ratio=ratio,
                                                        round_to=multiple)
        compressed.eval()
        prefill = timed(lambda m=compressed: m(ids), runs, device)

        def generate(m=compressed, n=1):
            return m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)

        first = timed(generate, max(2, runs // 2), device, warmup=1)
        full = timed(lambda: generate(n=new), max(2, runs // 2), device, warmup=1)
        tokens_s = batch * (new - 1) / max(full - first, 1e-9)  # decoding steps only
        macs = linear_macs(compressed)
        if ratio == 0:
            base = {"prefill": prefill, "tokens": tokens_s, "macs": macs}
        rows.append(f"| {ratio} | {multiple} | {compressed.config.intermediate_size} | "
                    f"{sum(p.numel() for p in compressed.parameters()):,} | "
                    f"{macs / base['macs']:.2f} | {1000 * prefill:.1f} | "
                    f"{base['prefill'] / prefill:.2f}x | {tokens_s:,.1f} | "
                    f"{tokens_s / base['tokens']:.2f}x |")
        print(rows[-1], flush=True)
        if ratio:
            del compressed
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", default="cnn", choices=["cnn", "smollm2", "synthetic-llm"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="1.6b", help="synthetic-llm size (llm_streaming.SIZES)")
    args = parser.parse_args()
    header = [f"Device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, "
              f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}.", ""]
    if args.what == "cnn":
        rows = cnn_rows(args.device)
    else:
        from transformers import AutoModelForCausalLM

        if args.what == "smollm2":
            from modelfold.zoo.llm import smollm2_folder

            model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32)
            rows = llm_rows(model.to(args.device), args.device,
                            [(0.1, 1), (0.2, 1), (0.3, 1)], batch=1,
                            prompt=512, new=64, runs=5)
        else:
            from llm_streaming import SIZES
            from transformers import LlamaConfig

            config = LlamaConfig(**SIZES[args.size], max_position_embeddings=2048,
                                 tie_word_embeddings=False)
            with torch.device(args.device):  # random init on the device: seconds, not minutes
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            rows = llm_rows(model, args.device, [(0.2, 1), (0.2, 64), (0.4, 1), (0.4, 64)],
                            batch=8,
                            prompt=1024, new=128, runs=10)
    suffix = f"_{args.size}" if args.what == "synthetic-llm" and args.size != "1.6b" else ""
    out = RESULTS / f"inference_speed_{args.what}{suffix}_{args.device}.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text("\n".join(header + rows) + "\n")
    os.replace(out.with_suffix(".tmp"), out)


if __name__ == "__main__":
    main()
