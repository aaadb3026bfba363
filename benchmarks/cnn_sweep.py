"""The CNN benchmark of the paper on Fashion-MNIST: `make bench` or, from the repository root,
`PYTHONPATH=. python benchmarks/cnn_sweep.py [preset]` (the sweep is in `experiments/`).

Presets live in `experiments.sweep.PRESETS` ("paper-cnn": ResNet18 and VGG11-BN at width 32,
12 methods, ratios 0.1-0.7, 3 seeds, both protocols, first 5,000 test images - about 75 min on 2
CPU cores with cached checkpoints; "quick"). Results go to benchmarks/results/ (CSV, markdown, one
PNG per panel); a rerun resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.sweep import preset, run_sweep

RESULTS = Path(__file__).resolve().parent / "results"


def main(name: str = "paper-cnn") -> None:
    cfg = preset(name)
    run_sweep(cfg, RESULTS, f"sweep_{name.replace('-', '_')}",
              log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main(*sys.argv[1:])
