"""`make demo`: the main job end to end on real data.

Trains (or loads from the cache) a CIFAR-style ResNet18 on Fashion-MNIST, folds it at several
ratios with the four variants of the paper (Fold-Naive, Fold-R on 1,024 training images, the
data-free Fold-AR, Fold-DIR on DeepInversion images), never fine-tuning, evaluates every folded
model on the 10,000 test images, prints a table and writes it with a plot under
`benchmarks/results/`.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import modelfold as mf
from modelfold.data import load_fashion_mnist
from modelfold.repair import DeepInversionConfig
from modelfold.summary import count_macs
from modelfold.zoo.train import evaluate_accuracy, pretrained_fashion_mnist

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
METHODS = {"fold-naive": "none", "fold-r": "data", "fold-ar": "approx",
           "fold-dir": "deep_inversion"}
LABELS = {"fold-naive": "Fold-Naive", "fold-r": "Fold-R", "fold-ar": "Fold-AR",
          "fold-dir": "Fold-DIR"}


def run_demo(width: int = 16, epochs: int = 2, out_dir: Path = Path("benchmarks/results"),
             ratios: tuple[float, ...] = RATIOS, seed: int = 0,
             methods: tuple[str, ...] = tuple(METHODS)) -> list[dict]:
    console = Console(width=120)
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
    train = load_fashion_mnist("train")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:1024]
    calibration = train.tensors[0][pick]  # Fold-R: 1,024 training images, no augmentation
    di = mf.FoldConfig(ratio=0.5).deep_inversion | asdict(DeepInversionConfig.preset("cpu"))
    for ratio in ratios:
        for method in methods:
            config = mf.FoldConfig(ratio=ratio, seed=seed, repair=METHODS[method],
                                   deep_inversion=di)
            start = time.perf_counter()
            folded = mf.fold(model, example, config=config, calibration=calibration)
            fold_s = time.perf_counter() - start
            s = mf.summary(model, folded, example)
            rows.append({"method": method, "ratio": ratio, "params": s.params_after,
                         "sparsity": s.sparsity, "macs": s.macs_after,
                         "accuracy": evaluate_accuracy(folded, test), "fold_s": fold_s})
            console.print(f"  ratio {ratio:.1f} {LABELS[method]:<10}: accuracy "
                          f"{rows[-1]['accuracy']:.2%}, {s.params_after:,} parameters, "
                          f"folded in {fold_s:.2f} s")
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
    table = Table(title="Folded ResNet18, no fine-tuning, Fashion-MNIST test accuracy")
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

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, label in LABELS.items():
        pts = [r for r in rows if r["method"] == method]
        if pts:
            ax.plot([100 * r["sparsity"] for r in pts], [100 * r["accuracy"] for r in pts],
                    "o-", label=label, markersize=4)
    ax.axhline(100 * rows[0]["accuracy"], color="grey", ls="--", label="dense")
    ax.axhline(10, color="lightgrey", ls=":", label="chance")
    ax.set_xlabel("parameter sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"ResNet18 (width {width}) on Fashion-MNIST, folded, no fine-tuning")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    run_demo()
