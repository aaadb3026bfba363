"""`round_to="auto"`: the channel multiple the device's kernels run fastest on, measured.

Whether kept channel counts should be multiples of 8, 16 or 64 depends on the device, the
library behind its kernels (oneDNN's blocked layouts on CPU, tensor-core tiles on CUDA), the
dtype and the layer shapes, so it is measured on the model itself rather than looked up: the
model is folded (Fold-Naive) at the same budget with every candidate multiple, each fold is
timed on the example input on the folding device, and the fastest multiple wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from modelfold.errors import FoldError

CANDIDATES = (1, 8, 16, 32, 64)
# a coarser multiple must run this much faster than the best finer one to win: the timings
# of a shared machine differ by a few per cent from run to run
MARGIN = 0.03
ROUNDS = 3  # timing rounds over all candidates


def resolve_round_to(config: Any, inputs: Any, dense_macs: int,
                     fold: Callable[[Any], nn.Module]) -> tuple[Any, dict[str, Any]]:
    """(`config` with `round_to` measured, the measurement for the record).

    `fold(config)` folds the model as the graph path does (same inputs, ignored modules and
    device); `inputs` are the example inputs on the folding device, `dense_macs` the model's
    MACs on them. Every candidate of CANDIDATES is folded with repair "none" at the config's
    budget; a plain `ratio` is turned into the MACs it removes with exact channel counts
    (`target_macs`), so that every candidate spends the same budget and only the rounding
    differs. A candidate that cannot reach the budget (groups narrower than the multiple stay
    whole) is skipped. The returned config keeps the budget it was measured at."""
    from modelfold.latency import fastest_in_turn
    from modelfold.macs import count_macs

    if config.target_latency is not None:
        raise FoldError("round_to='auto' times a fold per candidate multiple; with "
                        "target_latency (itself a timed search) give round_to a number.")
    probe = dataclasses.replace(config, repair="none", self_calibrate=False,
                                clusterer="kmeans", n_init=1, round_to=1,
                                allocation="uniform" if config.self_calibrate
                                else config.allocation)
    folds: dict[int, nn.Module] = {}
    budget: dict[str, Any] = {}
    for multiple in CANDIDATES:
        try:
            folds[multiple] = fold(dataclasses.replace(probe, **budget, round_to=multiple))
        except FoldError:
            continue  # this multiple cannot meet the budget on this model
        if multiple == 1 and config.ratio is not None:
            budget = {"ratio": None,
                      "target_macs": 1.0 - count_macs(folds[1], inputs) / dense_macs}
    timings = dict(zip(folds, fastest_in_turn(list(folds.values()), inputs, rounds=ROUNDS),
                       strict=True))
    if not timings:
        raise FoldError("round_to='auto': no candidate multiple could be folded to this "
                        "budget.")
    best = min(timings)
    for multiple in sorted(timings):
        if timings[multiple] < (1.0 - MARGIN) * timings[best]:
            best = multiple
    if best == 1:
        budget = {}  # exact counts: the config as given
    chosen = dataclasses.replace(config, **budget, round_to=best)
    return chosen, {"round_to": best, "seconds": {str(m): t for m, t in timings.items()},
                    **({"target_macs": budget["target_macs"]} if budget else {})}
