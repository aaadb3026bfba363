"""The CNN benchmark of the paper on Fashion-MNIST: `python benchmarks/cnn_sweep.py [preset]`.

Presets live in `modelfold.eval.sweep.PRESETS` ("paper-cnn": ResNet18 and VGG11-BN at width 32,
ratios 0.1-0.7, 3 seeds, both protocols; "quick"). Extra presets here:
"paper-cnn-seed0" - one clustering seed on the first 2,000 test images, a preliminary run that
fits a 2-core session. Results go to benchmarks/results/ (CSV, markdown, one PNG per panel).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from modelfold.eval.sweep import ModelSpec, preset, run_sweep

RESULTS = Path(__file__).resolve().parent / "results"


def main(name: str = "paper-cnn") -> None:
    if name == "paper-cnn-seed0":
        cfg = dataclasses.replace(
            preset("paper-cnn"),
            models=[ModelSpec("vgg11_bn", 32, 5), ModelSpec("resnet18", 32, 2)],
            seeds=[0], test_samples=2000, latency_runs=2)
    else:
        cfg = preset(name)
    run_sweep(cfg, RESULTS, f"sweep_{name.replace('-', '_')}",
              log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main(*sys.argv[1:])
