"""Measured speed-up vs MAC reduction: models folded to 25 / 50 / 75 % fewer MACs, timed on CPU.

`python benchmarks/latency.py [--models resnet18,vgg11_bn,mobilenet_v2,smollm2]`
(`make bench-latency`).

* CNNs (`target_macs`, uniform allocation, fold-naive: speed depends on shapes only):
  CIFAR-style ResNet18 and VGG11-BN at base width 32 on 3x32x32 inputs, and the real ImageNet
  MobileNetV2 (torchvision weights, 3x224x224), each with exact channel counts
  (`round_to=1`), with counts rounded to multiples of 8 (`round_to=8`) and with the multiple
  measured at batch 32 (`round_to="auto"`; the table shows the one chosen, e.g. auto:8).
* SmolLM2-135M (fp32): MLP channels removed until the counted MACs of a 128-token forward
  pass fall by the target (the embedding lookup costs no MACs and the 49,152-wide output layer
  stays, so 75 % is out of reach); shapes from the data-free magnitude selection
  (`prune_llm`), which gives the shapes folding gives at the same widths.

Latency: median of repeated forward passes after warm-up (`modelfold.latency.median_latency`),
batch 1 and batch 32 (LLM: 1 x 128 and 32 x 128 tokens), eager, and for the CNNs at batch 32
also `torch.compile` (inductor, first call excluded); the dense model in the same process.
CNNs: the dense and all folded models of a setting are timed in turn, three rounds, each
keeping its fastest (robust to a shared machine's drifting speed).
The "ideal" speed-up is dense MACs / folded MACs. Results:
benchmarks/results/latency_cpu.{csv,md,png} (speed-up against MAC reduction, ideal line).
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch

import modelfold as mf
from modelfold.latency import fastest_in_turn, median_latency
from modelfold.macs import count_macs

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = (0.25, 0.5, 0.75)
FIELDS = ["model", "target_macs", "round_to", "macs_removed", "params", "batch", "compile",
          "latency_ms", "speedup", "ideal"]


def cnn(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    from modelfold.zoo import create_model

    torch.manual_seed(0)
    if name == "mobilenet_v2":
        return create_model("mobilenet_v2_imagenet", pretrained=True).eval(), (3, 224, 224)
    return create_model(name, width=32).eval(), (3, 32, 32)


ROUNDS = 3  # timing rounds over all models of one setting


def timed(models: list[torch.nn.Module], x, compiled: bool, runs: int) -> list[float]:
    """Seconds per forward pass of every model on `x` (`fastest_in_turn`: timed in turn,
    ROUNDS rounds, the fastest each), compiled first when asked."""
    if compiled:
        # every folded shape is a recompile of the same forward(): room for all of them
        torch._dynamo.config.recompile_limit = 4 * len(models)
        models = [torch.compile(m) for m in models]
        for m in models:
            median_latency(m, x, runs=1, warmup=1)  # compile outside the timing
    return fastest_in_turn(models, x, rounds=ROUNDS, runs=runs)


def cnn_rows(name: str, compile_too: bool) -> list[dict]:
    dense, shape = cnn(name)
    one = torch.randn(1, *shape)
    batch = torch.randn(32, *shape)
    dense_macs = count_macs(dense, one)
    settings = [(one, False), (batch, False)] + ([(batch, True)] if compile_too else [])
    variants = [(0.0, 1, dense)]  # (target, round_to, model)
    for target in TARGETS:
        for multiple in (1, 8, "auto"):
            try:
                # "auto" measures the multiple at batch 32, the batch the speed goal is for
                model = mf.fold(dense, batch if multiple == "auto" else one,
                                config=mf.FoldConfig(target_macs=target, round_to=multiple,
                                                     sparsity_tolerance=0.03))
            except mf.FoldError as exc:
                print(f"{name} {target} round_to={multiple}: {exc}", flush=True)
                continue
            if multiple == "auto":
                multiple = f"auto:{model._modelfold_record.config['round_to']}"
            variants.append((target, multiple, model))
    macs = [count_macs(model, one) for _, _, model in variants]
    rows = []
    for x, compiled in settings:
        seconds = timed([m for _, _, m in variants], x, compiled,
                        runs=10 if x.shape[0] == 1 else 4)
        for (target, multiple, model), m, t in zip(variants, macs, seconds, strict=True):
            rows.append(row(name, target, multiple, 1 - m / dense_macs, model, x.shape[0],
                            compiled, t, seconds[0] / t, dense_macs / m))
    return sorted(rows, key=lambda r: (r["target_macs"], str(r["round_to"]), r["batch"],
                                       r["compile"]))


def row(model: str, target: float, multiple: int, removed: float, net, batch: int,
        compiled: bool, seconds: float, speedup: float, ideal: float) -> dict:
    out = {"model": model, "target_macs": target, "round_to": multiple,
           "macs_removed": f"{removed:.4f}", "params": sum(p.numel() for p in net.parameters()),
           "batch": batch, "compile": "on" if compiled else "off",
           "latency_ms": f"{1000 * seconds:.3f}", "speedup": f"{speedup:.3f}",
           "ideal": f"{ideal:.3f}"}
    print(out, flush=True)
    return out


def smollm2_rows() -> list[dict]:
    from transformers import AutoModelForCausalLM

    from modelfold.baselines import prune_llm
    from modelfold.zoo.llm import smollm2_folder

    dense = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32).eval()
    ids = {b: torch.randint(0, dense.config.vocab_size, (b, 128),
                            generator=torch.Generator().manual_seed(0)) for b in (1, 32)}
    inputs = {b: {"input_ids": ids[b], "use_cache": False} for b in ids}
    dense_macs = count_macs(dense, inputs[1])
    base = {b: median_latency(dense, inputs[b], runs=10, warmup=2) for b in ids}
    rows = [row("smollm2", 0.0, 1, 0.0, dense, b, False, base[b], 1.0, 1.0) for b in ids]
    for target in TARGETS:
        for multiple in (1, 8):
            lo, hi = 0.0, 0.99
            best = None
            for _ in range(12):  # MLP ratio whose counted MACs fall by the target
                mid = (lo + hi) / 2
                model = prune_llm(dense, method="magnitude", ratio=mid, round_to=multiple)
                removed = 1 - count_macs(model, inputs[1]) / dense_macs
                if removed < target:
                    lo = mid
                else:
                    hi, best = mid, (model, removed)
            if best is None or abs(best[1] - target) > 0.03:
                print(f"smollm2 {target}: out of reach with MLP channels", flush=True)
                break
            model, removed = best
            for b in ids:
                seconds = median_latency(model, inputs[b], runs=10, warmup=2)
                rows.append(row("smollm2", target, multiple, removed, model, b, False, seconds,
                                base[b] / seconds, 1 / (1 - removed)))
    return rows


def write(rows: list[dict]) -> None:
    path = RESULTS / "latency_cpu.csv"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    lines = [f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}. Speed-up = "
             "dense latency / folded latency in the same process; ideal = dense MACs / folded "
             "MACs; efficiency = speed-up / ideal (the goal: >= 0.8 at batch 32).", "",
             "| model | MACs target | round_to | MACs removed | params | batch | compile | "
             "latency ms | speed-up | ideal | efficiency |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eff = float(r["speedup"]) / float(r["ideal"])
        lines.append(f"| {r['model']} | {float(r['target_macs']):.0%} | {r['round_to']} | "
                     f"{float(r['macs_removed']):.1%} | {int(r['params']):,} | {r['batch']} | "
                     f"{r['compile']} | {float(r['latency_ms']):.2f} | "
                     f"{float(r['speedup']):.2f}x | {float(r['ideal']):.2f}x | {eff:.2f} |")
    md = RESULTS / "latency_cpu.md"
    md.with_suffix(".tmp").write_text("\n".join(lines) + "\n")
    os.replace(md.with_suffix(".tmp"), md)
    plot(rows)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, batch in zip(axes, (1, 32), strict=True):
        xs = [i / 100 for i in range(0, 81)]
        ax.plot([100 * x for x in xs], [1 / (1 - x) for x in xs], color="black",
                linestyle=":", label="ideal (MACs)")
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if int(r["batch"]) != batch or float(r["target_macs"]) == 0:
                continue
            rounding = str(r["round_to"]).split(":")[0]  # auto:8 -> one "auto" line
            label = f"{r['model']} r{rounding}" + (" compiled" if r["compile"] == "on" else "")
            series.setdefault(label, []).append((float(r["macs_removed"]),
                                                 float(r["speedup"])))
        for j, (label, pts) in enumerate(sorted(series.items())):
            pts.sort()
            ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                    linestyle="--" if "compiled" in label else "-",
                    color=plt.get_cmap("tab20")(j % 20))
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("MACs removed (%)")
        ax.set_title(f"CPU, batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("measured speed-up vs dense")
    fig.tight_layout()
    fig.savefig(RESULTS / "latency_cpu.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet18,vgg11_bn,mobilenet_v2,smollm2")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the table and plot from latency_cpu.csv")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        write(list(csv.DictReader((RESULTS / "latency_cpu.csv").read_text().splitlines())))
        return
    names = args.models.split(",")
    path = RESULTS / "latency_cpu.csv"
    rows = [r for r in (csv.DictReader(path.read_text().splitlines()) if path.is_file() else [])
            if r["model"] not in names]  # other models' rows stay
    for name in names:
        rows += smollm2_rows() if name == "smollm2" else cnn_rows(name, not args.no_compile)
        write(rows)


if __name__ == "__main__":
    main()
