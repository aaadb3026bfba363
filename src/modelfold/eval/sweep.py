"""`modelfold sweep`: models x methods x ratios x seeds -> CSV, markdown table, PNG plots.

Every cell folds (or prunes) a trained model, evaluates test accuracy, parameter sparsity, MACs,
fold wall time and latency relative to the dense model. Cells are appended to the CSV as they
finish, and a rerun skips the cells already there (a sweep interrupted part-way resumes).

Speed (a full CNN benchmark must fit one hour on 2 CPU cores): models are evaluated in the
channels-last memory format (oneDNN's fast path on CPU, ~15% faster here; dense and compressed
alike, so latency ratios stay fair), and latency is measured once per architecture - every
seed and every method at one ratio yields the same layer shapes, hence the same latency.
"""

from __future__ import annotations

import copy
import csv
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import modelfold as mf
from modelfold.baselines import ifm, inn, intra_fusion, magnitude_prune, neuron_merging
from modelfold.errors import FoldError
from modelfold.eval.latency import median_latency
from modelfold.repair import DeepInversionConfig
from modelfold.summary import count_macs

LABELS = {"fold-naive": "Fold-Naive", "fold-r": "Fold-R", "fold-ar": "Fold-AR",
          "fold-dir": "Fold-DIR", "sp-l1": "SP-L1", "sp-l2": "SP-L2", "sp-l1-r": "SP-L1 + BN reset",
          "sp-l2-r": "SP-L2 + BN reset", "ifm": "IFM", "inn": "INN",
          "neuron-merging": "Neuron Merging", "intra-fusion": "Intra-Fusion"}
# methods that do not depend on the clustering seed: one run per (model, protocol, ratio)
SEED_FREE = {"sp-l1", "sp-l2", "sp-l1-r", "sp-l2-r", "ifm", "inn", "neuron-merging",
             "intra-fusion"}
FIELDS = ["model", "width", "protocol", "method", "ratio", "seed", "params", "sparsity", "macs",
          "accuracy", "fold_s", "latency_ratio"]


@dataclass
class ModelSpec:
    name: str
    width: int
    epochs: int

    @property
    def label(self) -> str:
        return f"{self.name}-w{self.width}"


@dataclass
class SweepConfig:
    models: list[ModelSpec]
    methods: list[str]
    ratios: list[float]
    seeds: list[int] = field(default_factory=lambda: [0])
    protocols: list[str] = field(default_factory=lambda: ["whole"])
    # None = all 10,000 test images; the first 5,000 (class-balanced within 5%) halve the cost
    test_samples: int | None = None
    calibration_samples: int = 1024
    deep_inversion: dict[str, Any] = field(
        default_factory=lambda: asdict(DeepInversionConfig.preset("cpu")))
    latency_batch: int = 256
    latency_runs: int = 5


def _di(cfg: SweepConfig) -> dict[str, Any]:
    return cfg.deep_inversion


def _fold(repair: str) -> Callable[..., nn.Module]:
    def run(model, example, ratio, seed, calibration, module_ratios, cfg):
        config = mf.FoldConfig(ratio=ratio, seed=seed, repair=repair,
                               module_ratios=module_ratios, deep_inversion=_di(cfg),
                               calibration_samples=cfg.calibration_samples)
        return mf.fold(model, example, config=config, calibration=calibration)
    return run


def _prune(p: int, reset: bool) -> Callable[..., nn.Module]:
    def run(model, example, ratio, seed, calibration, module_ratios, cfg):
        return magnitude_prune(model, example, ratio=ratio, p=p, module_ratios=module_ratios,
                               reset_bn=calibration if reset else None,
                               calibration_samples=cfg.calibration_samples)
    return run


def _merge(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def run(model, example, ratio, seed, calibration, module_ratios, cfg):
        return fn(model, example, ratio=ratio, module_ratios=module_ratios)
    return run


METHODS: dict[str, Callable[..., nn.Module]] = {
    "fold-naive": _fold("none"), "fold-r": _fold("data"), "fold-ar": _fold("approx"),
    "fold-dir": _fold("deep_inversion"), "sp-l1": _prune(1, False), "sp-l2": _prune(2, False),
    "sp-l1-r": _prune(1, True), "sp-l2-r": _prune(2, True), "ifm": _merge(ifm),
    "inn": _merge(inn), "neuron-merging": _merge(neuron_merging),
    "intra-fusion": _merge(intra_fusion),
}
PROTOCOLS = ("whole", "last-two-blocks")


def protocol_ratios(model: nn.Module, protocol: str, ratio: float) -> tuple[float, dict]:
    """(global ratio, module_ratios) of a protocol.

    "whole": every group at `ratio` (the paper). "last-two-blocks": only groups written by the
    last two residual blocks (ResNet `layer4`) are compressed, the IFM/INN protocol.
    """
    if protocol == "whole":
        return ratio, {}
    if protocol == "last-two-blocks":
        names = [n for n, m in model.named_modules() if n.startswith("layer4.")
                 and isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        if not names:
            raise FoldError("protocol 'last-two-blocks' needs a ResNet with `layer4`.")
        return 0.0, {n: ratio for n in names}
    raise FoldError(f"unknown protocol {protocol!r}; known: {list(PROTOCOLS)}.")


def _key(row: dict) -> tuple:
    return (row["model"], str(row["width"]), row["protocol"], row["method"],
            f"{float(row['ratio']):.4f}", str(row["seed"]))


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def run_sweep(cfg: SweepConfig, out_dir: Path, name: str = "sweep",
              log: Callable[[str], None] = print) -> list[dict]:
    from modelfold.data import load_fashion_mnist
    from modelfold.zoo.train import evaluate_accuracy, pretrained_fashion_mnist

    for method in cfg.methods:
        if method not in METHODS:
            raise FoldError(f"unknown method {method!r}; known: {sorted(METHODS)}.")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{name}.csv"
    rows = read_rows(csv_path)
    done = {_key(r) for r in rows}
    # cells of equal size (same groups, same k) run at the same speed: a resumed sweep reuses
    # the latency measured for the architecture instead of timing it again under other load
    measured_latency = {(r["model"], str(r["width"]), str(r["params"]), str(r["macs"])):
                        float(r["latency_ratio"]) for r in rows if r["method"] != "dense"}
    test = load_fashion_mnist("test")
    if cfg.test_samples is not None:
        test = torch.utils.data.TensorDataset(test.tensors[0][: cfg.test_samples],
                                              test.tensors[1][: cfg.test_samples])
    train = load_fashion_mnist("train")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    calibration = train.tensors[0][pick[: cfg.calibration_samples]]
    test = torch.utils.data.TensorDataset(_channels_last(test.tensors[0]), test.tensors[1])
    example = test.tensors[0][:1]
    for spec in cfg.models:
        model = pretrained_fashion_mnist(spec.name, width=spec.width, epochs=spec.epochs)
        dense = None
        latencies: dict[tuple, float] = {}
        for protocol in cfg.protocols:
            if protocol != "whole" and not spec.name.startswith("resnet"):
                continue
            for ratio in cfg.ratios:
                for seed in cfg.seeds:
                    for method in cfg.methods:
                        row = {"model": spec.name, "width": spec.width, "protocol": protocol,
                               "method": method, "ratio": ratio, "seed": seed}
                        if _key(row) in done:
                            continue
                        if method in SEED_FREE and seed != cfg.seeds[0]:
                            continue  # does not depend on the clustering seed
                        if dense is None:
                            dense = _dense_row(spec, model, test, example, cfg,
                                               evaluate_accuracy)
                            if _key(dense["row"]) not in done:
                                rows.append(dense["row"])
                                done.add(_key(dense["row"]))
                        g_ratio, m_ratios = protocol_ratios(model, protocol, ratio)
                        start = time.perf_counter()
                        folded = METHODS[method](model, example, g_ratio, seed, calibration,
                                                 m_ratios, cfg)
                        fold_s = time.perf_counter() - start
                        folded = _channels_last(folded)
                        params = sum(p.numel() for p in folded.parameters())
                        shapes = tuple(tuple(p.shape) for p in folded.parameters())
                        macs = count_macs(folded, example)
                        measured = measured_latency.get((spec.name, str(spec.width), str(params),
                                                         str(macs)))
                        if measured is None and shapes not in latencies:
                            latencies[shapes] = median_latency(
                                folded, dense["batch"], runs=cfg.latency_runs) / dense["latency"]
                        row.update(
                            params=params, sparsity=1 - params / dense["params"], macs=macs,
                            accuracy=evaluate_accuracy(folded, test), fold_s=fold_s,
                            latency_ratio=measured or latencies[shapes])
                        rows.append(row)
                        done.add(_key(row))
                        write_rows(csv_path, rows)
                        log(f"{spec.label} {protocol} {method} r={ratio:.2f} seed={seed}: "
                            f"acc {row['accuracy']:.2%}, sparsity {row['sparsity']:.1%}, "
                            f"{fold_s:.2f} s")
    write_rows(csv_path, rows)
    (out_dir / f"{name}.md").write_text(markdown_table(rows))
    plot_rows(rows, out_dir / name)
    return rows


def _channels_last(x):
    """`x` (a 4-D tensor or a module the sweep owns) in the channels-last memory format."""
    if isinstance(x, torch.Tensor):
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    return x.to(memory_format=torch.channels_last)


def _dense_row(spec: ModelSpec, model: nn.Module, test, example, cfg: SweepConfig,
               evaluate_accuracy) -> dict:
    model = _channels_last(copy.deepcopy(model))  # the original stays as folding expects it
    batch = test.tensors[0][: cfg.latency_batch]
    params = sum(p.numel() for p in model.parameters())
    row = {"model": spec.name, "width": spec.width, "protocol": "whole", "method": "dense",
           "ratio": 0.0, "seed": 0, "params": params, "sparsity": 0.0,
           "macs": count_macs(model, example), "accuracy": evaluate_accuracy(model, test),
           "fold_s": 0.0, "latency_ratio": 1.0}
    return {"row": row, "params": params, "batch": batch,
            "latency": median_latency(model, batch, runs=cfg.latency_runs)}


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of every (model, width, protocol, method, ratio)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["model"], int(r["width"]), r["protocol"], r["method"], float(r["ratio"]))
        groups.setdefault(key, []).append(r)
    out = []
    order = ["dense", *LABELS]

    def sort_key(item):
        (model, width, protocol, method, ratio), _ = item
        rank = order.index(method) if method in order else len(order)
        return (model, width, protocol, ratio, rank, method)

    for (model, width, protocol, method, ratio), rs in sorted(groups.items(), key=sort_key):
        acc = [float(r["accuracy"]) for r in rs]
        out.append({"model": model, "width": width, "protocol": protocol, "method": method,
                    "ratio": ratio, "seeds": len(rs),
                    "sparsity": statistics.fmean(float(r["sparsity"]) for r in rs),
                    "params": int(statistics.fmean(float(r["params"]) for r in rs)),
                    "macs": int(statistics.fmean(float(r["macs"]) for r in rs)),
                    "accuracy": statistics.fmean(acc),
                    "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "fold_s": statistics.fmean(float(r["fold_s"]) for r in rs),
                    "latency_ratio": statistics.fmean(float(r["latency_ratio"]) for r in rs)})
    return out


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | protocol | method | ratio | param. sparsity | MACs | test accuracy "
             "(mean ± std) | seeds | fold s | latency vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in aggregate(rows):
        lines.append(
            f"| {r['model']}-w{r['width']} | {r['protocol']} | {r['method']} | "
            f"{r['ratio']:.2f} | {r['sparsity']:.1%} | {r['macs']:,} | "
            f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f} | {r['seeds']} | "
            f"{r['fold_s']:.2f} | {r['latency_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[dict], stem: Path) -> list[Path]:
    """One PNG per (model, protocol): accuracy vs parameter sparsity, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    written = []
    panels = sorted({(r["model"], r["width"], r["protocol"]) for r in agg
                     if r["method"] != "dense"})
    for model, width, protocol in panels:
        fig, ax = plt.subplots(figsize=(8.0, 4.4))
        for index, (method, label) in enumerate(LABELS.items()):
            pts = sorted((r for r in agg if (r["model"], r["width"], r["protocol"],
                                              r["method"]) == (model, width, protocol, method)),
                         key=lambda r: r["sparsity"])
            if pts:
                ax.errorbar([100 * r["sparsity"] for r in pts],
                            [100 * r["accuracy"] for r in pts],
                            yerr=[100 * r["accuracy_std"] for r in pts], marker="o",
                            markersize=4, capsize=2, label=label, color=plt.cm.tab20(index),
                            ls="-" if method.startswith("fold") else
                            ":" if method.startswith("sp-") else "--")
        dense = [r for r in agg if (r["model"], r["width"], r["method"]) ==
                 (model, width, "dense")]
        if dense:
            ax.axhline(100 * dense[0]["accuracy"], color="grey", ls="--", label="dense")
        ax.axhline(10, color="lightgrey", ls=":", label="chance")
        ax.set_xlabel("parameter sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model} (width {width}), Fashion-MNIST, {protocol}, no fine-tuning")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(f"{stem}_{model}-w{width}_{protocol}.png")
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written


PRESETS: dict[str, SweepConfig] = {
    "quick": SweepConfig(
        models=[ModelSpec("vgg11_bn", 8, 1)],
        methods=["fold-naive", "fold-r", "fold-ar", "fold-dir", "sp-l1", "sp-l2", "ifm", "inn",
                 "neuron-merging", "intra-fusion"],
        ratios=[0.3, 0.5], test_samples=1000, latency_batch=64, latency_runs=2,
        deep_inversion=asdict(DeepInversionConfig(num_images=32, steps=30, lr=0.05,
                                                  batch_size=32))),
    "paper-cnn": SweepConfig(
        models=[ModelSpec("resnet18", 32, 2), ModelSpec("vgg11_bn", 32, 5)],
        methods=["fold-naive", "fold-r", "fold-ar", "fold-dir", "sp-l1", "sp-l2",
                 "sp-l1-r", "sp-l2-r", "ifm", "inn", "neuron-merging", "intra-fusion"],
        ratios=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], seeds=[0, 1, 2],
        protocols=["whole", "last-two-blocks"], test_samples=5000, latency_runs=5),
}


def preset(name: str) -> SweepConfig:
    if name not in PRESETS:
        raise FoldError(f"unknown sweep preset {name!r}; known: {sorted(PRESETS)}.")
    return PRESETS[name]


__all__ = [
    "METHODS",
    "PRESETS",
    "PROTOCOLS",
    "ModelSpec",
    "SweepConfig",
    "aggregate",
    "markdown_table",
    "plot_rows",
    "preset",
    "run_sweep",
]
