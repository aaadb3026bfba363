"""`make demo`: the main job end to end on real data.

Trains (or loads from the cache) a CIFAR-style ResNet18 on Fashion-MNIST, folds it at several
ratios without data or fine-tuning, evaluates every folded model on the 10,000 test images,
prints a table and writes it with a plot under `benchmarks/results/`.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import modelfold as mf
from modelfold.data import load_fashion_mnist
from modelfold.summary import count_macs
from modelfold.zoo.train import evaluate_accuracy, pretrained_fashion_mnist

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def run_demo(width: int = 16, epochs: int = 1, out_dir: Path = Path("benchmarks/results"),
             ratios: tuple[float, ...] = RATIOS, seed: int = 0) -> list[dict]:
    console = Console()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    test = load_fashion_mnist("test")
    console.print(f"[bold]ResNet18 (width {width}) on Fashion-MNIST[/]: training or loading "
                  "the cached checkpoint...")
    model = pretrained_fashion_mnist("resnet18", width=width, epochs=epochs, seed=seed)
    example = test.tensors[0][:1]
    dense_params = sum(p.numel() for p in model.parameters())
    dense_macs = count_macs(model, example)
    rows = [{"method": "dense", "ratio": 0.0, "params": dense_params, "sparsity": 0.0,
             "macs": dense_macs, "accuracy": evaluate_accuracy(model, test), "fold_s": 0.0}]
    for ratio in ratios:
        start = time.perf_counter()
        folded = mf.fold(model, example, ratio=ratio, seed=seed)
        fold_s = time.perf_counter() - start
        s = mf.summary(model, folded, example)
        rows.append({"method": "fold-naive", "ratio": ratio, "params": s.params_after,
                     "sparsity": s.sparsity, "macs": s.macs_after,
                     "accuracy": evaluate_accuracy(folded, test), "fold_s": fold_s})
        console.print(f"  ratio {ratio:.1f}: accuracy {rows[-1]['accuracy']:.2%}, "
                      f"{s.params_after:,} parameters, folded in {fold_s:.2f} s")
    _print_table(console, rows)
    stem = f"demo_resnet18_w{width}_fmnist"
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / f"{stem}.csv", rows)
    (out_dir / f"{stem}.md").write_text(markdown_table(rows))
    _plot(out_dir / f"{stem}.png", rows, width)
    console.print(f"wrote {out_dir / stem}.{{csv,md,png}}")
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | ratio | parameters | param. sparsity | MACs | test accuracy "
             "| fold time (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio']:.1f} | {r['params']:,} | "
                     f"{r['sparsity']:.1%} | {r['macs']:,} | {r['accuracy']:.2%} | "
                     f"{r['fold_s']:.2f} |")
    return "\n".join(lines) + "\n"


def _print_table(console: Console, rows: list[dict]) -> None:
    table = Table(title="Fold-Naive (no data, no fine-tuning) on the Fashion-MNIST test set")
    for col in ("method", "ratio", "parameters", "param. sparsity", "MACs", "accuracy",
                "fold s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["method"], f"{r['ratio']:.1f}", f"{r['params']:,}",
                      f"{r['sparsity']:.1%}", f"{r['macs']:,}", f"{r['accuracy']:.2%}",
                      f"{r['fold_s']:.2f}")
    console.print(table)


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _plot(path: Path, rows: list[dict], width: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folded = [r for r in rows if r["method"] != "dense"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([100 * r["sparsity"] for r in folded], [100 * r["accuracy"] for r in folded],
            "o-", label="Fold-Naive")
    ax.axhline(100 * rows[0]["accuracy"], color="grey", ls="--", label="dense")
    ax.axhline(10, color="lightgrey", ls=":", label="chance")
    for r in folded:
        ax.annotate(f"r={r['ratio']:.1f}", (100 * r["sparsity"], 100 * r["accuracy"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("parameter sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"ResNet18 (width {width}) on Fashion-MNIST, folded without data")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    run_demo()
