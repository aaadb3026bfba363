"""`make demo`: the main job end to end on real data.

Trains (or loads from the cache) a CIFAR-style ResNet18 on Fashion-MNIST, folds it at several
ratios with the four variants of the paper (Fold-Naive, Fold-R on 1,024 training images, the
data-free Fold-AR, Fold-DIR on DeepInversion images), never fine-tuning, evaluates every folded
model on the 10,000 test images, prints a table and writes it with a plot to `out/demo/`
(git-ignored; `make demo-results` writes the committed copy under `benchmarks/results/`).

Reproducible: torch runs on a pinned number of threads (`DEMO_THREADS`, 2) throughout - CPU
kernels split their reductions by thread count, so training on another count gives other
weights - and the checkpoint is cached under a name that includes it. Every number of the
table except the fold wall time is then the same bits on every run on the same machine.

Run from the repository root: `python -m experiments.demo [--out DIR]`.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import modelfold as mf
from experiments.fashion_mnist import load_fashion_mnist
from experiments.train import checkpoint_path, evaluate_accuracy, pretrained_fashion_mnist
from modelfold.repair import DeepInversionConfig
from modelfold.summary import count_macs

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
METHODS = {"fold-naive": "none", "fold-r": "data", "fold-ar": "approx",
           "fold-dir": "deep_inversion"}
LABELS = {"fold-naive": "Fold-Naive", "fold-r": "Fold-R", "fold-ar": "Fold-AR",
          "fold-dir": "Fold-DIR"}
DEMO_THREADS = 2  # torch threads for training and folding: results depend on the count
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "out" / "demo"


def run_demo(width: int = 16, epochs: int = 2, out_dir: Path = DEFAULT_OUT,
             ratios: tuple[float, ...] = RATIOS, seed: int = 0,
             methods: tuple[str, ...] = tuple(METHODS), threads: int = DEMO_THREADS,
             console: Console | None = None) -> list[dict]:
    console = console or Console(width=120)
    begin = time.perf_counter()

    def say(text: str) -> None:
        elapsed = time.perf_counter() - begin
        console.print(f"[dim]{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}[/] {text}")

    torch.set_num_threads(threads)
    say(f"torch runs on {threads} threads (pinned: the numbers depend on the thread count)")
    ckpt = checkpoint_path("resnet18", width=width, epochs=epochs, seed=seed, threads=threads)
    if ckpt.is_file():
        say(f"[bold]ResNet18 (width {width}) on Fashion-MNIST[/]: loading the cached model "
            f"{ckpt}")
    else:
        minutes = max(1, round(2 * epochs * (width / 16) ** 2 * 2 / threads))  # 4 by default
        say(f"[bold]ResNet18 (width {width}) on Fashion-MNIST[/]: no cached model, so it is "
            f"trained first ({epochs} epoch(s) on 60,000 images, about {minutes} minute(s) on "
            f"{threads} idle CPU cores; cached in {ckpt.parent} for the next run)")
    model = pretrained_fashion_mnist("resnet18", width=width, epochs=epochs, seed=seed,
                                     threads=threads)
    test = load_fashion_mnist("test")
    example = test.tensors[0][:1]
    say("evaluating the dense model on the 10,000 test images")
    dense_params = sum(p.numel() for p in model.parameters())
    dense_macs = count_macs(model, example)
    rows = [{"method": "dense", "ratio": 0.0, "params": dense_params, "sparsity": 0.0,
             "macs": dense_macs, "accuracy": evaluate_accuracy(model, test), "fold_s": 0.0}]
    say(f"dense: accuracy {rows[0]['accuracy']:.2%}, {dense_params:,} parameters")
    train = load_fashion_mnist("train")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:1024]
    calibration = train.tensors[0][pick]  # Fold-R: 1,024 training images, no augmentation
    di_config = DeepInversionConfig.preset("cpu")
    di = mf.FoldConfig(ratio=0.5).deep_inversion | asdict(di_config)
    say(f"folding at {len(ratios)} ratios x {len(methods)} methods, each evaluated on the "
        "test images (a few seconds per row)")
    for ratio in ratios:
        for method in methods:
            if method == "fold-dir" and ratio == ratios[0]:
                say(f"Fold-DIR first synthesises {di_config.num_images} DeepInversion images "
                    f"from the model's BatchNorm statistics ({di_config.steps} optimisation "
                    "steps, minutes on 2 cores; a bar shows the time left in a terminal; "
                    "cached for later ratios and runs)")
            rows.append(_fold_row(model, example, test, calibration, method, ratio, seed, di))
            r = rows[-1]
            say(f"ratio {ratio:.1f} {LABELS[method]:<10}: accuracy {r['accuracy']:.2%}, "
                f"{r['params']:,} parameters, folded in {r['fold_s']:.2f} s")
    _print_table(console, rows)
    stem = f"demo_resnet18_w{width}_fmnist"
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / f"{stem}.csv", rows)
    _write_text(out_dir / f"{stem}.md", markdown_table(rows))
    _plot(out_dir / f"{stem}.png", rows, width)
    say(f"wrote {out_dir / stem}.{{csv,md,png}}")
    return rows


def _fold_row(model: torch.nn.Module, example: torch.Tensor,
              test: torch.utils.data.TensorDataset, calibration: torch.Tensor, method: str,
              ratio: float, seed: int, di: dict) -> dict:
    config = mf.FoldConfig(ratio=ratio, seed=seed, repair=METHODS[method], deep_inversion=di)
    start = time.perf_counter()
    folded = mf.fold(model, example, config=config, calibration=calibration)
    fold_s = time.perf_counter() - start
    s = mf.summary(model, folded, example)
    return {"method": method, "ratio": ratio, "params": s.params_after, "sparsity": s.sparsity,
            "macs": s.macs_after, "accuracy": evaluate_accuracy(folded, test), "fold_s": fold_s}


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
                "fold s (wall)"):
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


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
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


def main(argv: list[str] | None = None, run: Callable[..., list[dict]] = run_demo) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__
                                     .splitlines()[0])
    parser.add_argument("--width", type=int, default=16, help="ResNet18 base width")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder of the table and plot (default {DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, default=DEMO_THREADS,
                        help="torch threads (the numbers are reproducible for a given count)")
    args = parser.parse_args(argv)
    run(width=args.width, epochs=args.epochs, out_dir=args.out, threads=args.threads)


if __name__ == "__main__":
    main()
