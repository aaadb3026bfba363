"""Where a fold's time goes: wall time per stage on CPU, next to the reference code's fold time.

`python benchmarks/fold_time.py [--models resnet18,vgg11_bn,mobilenet_v2,smollm2]`

Stages are the cumulative times (`cProfile`, one profiled run) of the functions that do them:
tracing the channel groups (`discover_groups`), building the clustering features
(`group_features`), clustering (`cluster_channels`), merging (`apply_plan`), repair (the
repair's `after_merge`, Fold-AR) and the output checks (`reference_output`, `check_output`);
"total" is the median wall time of five unprofiled runs. CIFAR-style ResNet18 / VGG11-BN at
width 32 on a 3x32x32 example (random weights: only shapes and k-means iterations matter), the
real ImageNet MobileNetV2 on 3x224x224, ratio 0.3; SmolLM2-135M: the self-calibrated folds of
20 % of all parameters (MLP) and of 50 % (MLP + attention), whose stages are text generation,
the sensitivity pass, the head costs of the budget split and the layer-by-layer fold (which
contains the sensitivity pass and the head costs). The reference code's times
(`../shared/reference/anchor_fmnist.md`, same 2-core machine class, trained checkpoints) are
quoted for ResNet18 / VGG11-BN at r = 0.3. A second table folds each CNN at seven ratios in a
row, tracing the graph every time and once inside `modelfold.reuse_traces()` (as a sweep does).
Results: benchmarks/results/fold_time.md.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
from pathlib import Path

import torch

import modelfold as mf

RESULTS = Path(__file__).resolve().parent / "results"
# stage -> the (function name, file suffix) whose cumulative times add up to it
GRAPH_STAGES = {
    "trace": [("discover_groups", "graph/groups.py")],
    "features": [("group_features", "cluster/features.py")],
    "k-means": [("cluster_channels", "cluster/__init__.py")],
    "merge": [("apply_plan", "merge/apply.py")],
    "repair": [(f, "repair/__init__.py") for f in ("before_plan", "before_merge",
                                                    "after_merge")],
    "output checks": [("reference_output", "graph_fold.py"), ("check_output", "graph_fold.py")],
}
LLM_STAGES = {
    "text generation": [("self_generated_tokens", "llm/repair.py")],
    "sensitivity pass": [("sensitive_layers", "llm/repair.py")],
    "head costs": [("head_error_curves", "llm/repair.py")],
    "layer-by-layer fold": [("transform_llm", "llm/fold.py")],
}
# reference code, r = 0.3, s (anchor_fmnist.md): (Fold-Naive, Fold-AR)
REFERENCE = {"resnet18": (1.86, 3.43), "vgg11_bn": (1.90, 2.77)}
SWEEP_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def stage_times(fn, stages: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    profile = cProfile.Profile()
    profile.enable()
    fn()
    profile.disable()
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    return {stage: sum(v[3] for (file, _, func), v in stats.items()
                       if any(func == f and file.endswith(sfx) for f, sfx in parts))
            for stage, parts in stages.items()}


def wall(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cnn(name: str) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """(model, example input, label) of a CNN row."""
    from modelfold.zoo import create_model

    torch.manual_seed(0)
    if name == "mobilenet_v2":
        return (create_model("mobilenet_v2_imagenet", pretrained=True).eval(),
                torch.randn(1, 3, 224, 224), "MobileNetV2 (ImageNet)")
    return create_model(name, width=32).eval(), torch.randn(1, 3, 32, 32), f"{name}-w32"


def sweep_row(name: str) -> str:
    """One model folded at SWEEP_RATIOS one after another (fold-naive), tracing every time
    and inside `modelfold.reuse_traces()` (one trace); median of three runs each."""
    model, x, label = cnn(name)

    def folds():
        for r in SWEEP_RATIOS:
            mf.fold(model, x, ratio=r)

    def reused():
        with mf.reuse_traces():
            folds()

    folds()  # warm-up
    each, once = wall(folds, runs=3), wall(reused, runs=3)
    row = f"| {label} | {each:.3f} | {once:.3f} | {each / once:.2f}x |"
    print(row, flush=True)
    return row


def cnn_rows(name: str) -> list[str]:
    model, x, label_model = cnn(name)
    rows = []
    for label, repair in (("fold-naive", "none"), ("Fold-AR", "approx")):
        def run(repair=repair):
            return mf.fold(model, x, ratio=0.3, repair=repair)

        run()  # warm-up (first-call costs)
        stages = stage_times(run, GRAPH_STAGES)
        total = wall(run)
        ref = REFERENCE.get(name)
        reference = f"{ref[0 if repair == 'none' else 1]:.2f}" if ref else "-"
        rows.append(f"| {label_model} | {label} | " + " | ".join(
            f"{stages[s]:.3f}" for s in GRAPH_STAGES) + f" | **{total:.3f}** | {reference} |")
        print(rows[-1], flush=True)
    return rows


def smollm2_rows() -> list[str]:
    from transformers import AutoModelForCausalLM

    from modelfold.zoo.llm import smollm2_folder

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32).eval()
    rows = []
    for label, parts, target in (("MLP, 20 %", ("mlp",), 0.2),
                                 ("MLP + attention, 50 %", ("mlp", "attention"), 0.5)):
        def run(parts=parts, target=target):
            return mf.fold(model, config=mf.LLMFoldConfig(target_sparsity=target, parts=parts,
                                                          self_calibrate=True))

        start = time.perf_counter()
        stages = stage_times(run, LLM_STAGES)
        total = time.perf_counter() - start
        rows.append(f"| SmolLM2-135M | self-calibrated, {label} | " + " | ".join(
            f"{stages[s]:.1f}" for s in LLM_STAGES) + f" | **{total:.1f}** (profiled) |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet18,vgg11_bn,mobilenet_v2,smollm2")
    args = parser.parse_args()
    names = args.models.split(",")
    lines = [f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; seconds.", "",
             "| model | fold | " + " | ".join(GRAPH_STAGES) + " | total | reference code |",
             "|---|---|" + "---|" * len(GRAPH_STAGES) + "---|---|"]
    cnns = [name for name in names if name != "smollm2"]
    for name in cnns:
        lines += cnn_rows(name)
    if cnns:
        lines += ["", f"One model folded at {len(SWEEP_RATIOS)} ratios "
                  f"({SWEEP_RATIOS[0]}-{SWEEP_RATIOS[-1]}, fold-naive) one after another:", "",
                  "| model | traced every fold, s | inside reuse_traces(), s | speed-up |",
                  "|---|---|---|---|", *(sweep_row(name) for name in cnns)]
    if "smollm2" in names:
        lines += ["", "| model | fold | " + " | ".join(LLM_STAGES) + " | total |",
                  "|---|---|" + "---|" * len(LLM_STAGES) + "---|", *smollm2_rows()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "fold_time.md"
    out.with_suffix(".tmp").write_text("\n".join(lines) + "\n")
    os.replace(out.with_suffix(".tmp"), out)


if __name__ == "__main__":
    main()
