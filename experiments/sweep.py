"""`modelfold sweep`: models x methods x ratios x seeds -> CSV, markdown table, PNG plots.

Every cell folds (or prunes) a trained model, evaluates test accuracy, parameter sparsity, MACs,
fold wall time and latency relative to the dense model. Cells are appended to the CSV as they
finish, and a rerun skips the cells already there (a sweep interrupted part-way resumes).

Speed (a full CNN benchmark must fit one hour on 2 CPU cores): models are evaluated in the
channels-last memory format (oneDNN's fast path on CPU, ~15% faster here; dense and compressed
alike, so latency ratios stay fair), and latency is measured once per architecture - every
seed and every method at one ratio yields the same layer shapes, hence the same latency.

Distributed (`run_sweep(..., ray="local" | ADDRESS)`, `modelfold sweep --ray local|ADDRESS`):
every cell (model x protocol x method x ratio x seed) is one Ray task running `run_cell`, a pure
function of (model spec, protocol, method, ratio, seed, config). "local" starts a local Ray
instance with one CPU per core (and passes the driver's `MODELFOLD_*` environment variables to
the workers: checkpoint, cache and data folders; a Ray the caller initialised already is used as
it is); any other value is a cluster address given to `ray.init(address=...)` (e.g. "auto",
"ray://head:10001"), whose nodes need modelfold installed, the Fashion-MNIST files and, to avoid
training there, the checkpoints in their cache (e.g. a shared `MODELFOLD_CACHE`). The driver
makes sure every checkpoint exists before it submits a task (training it if needed), so workers
only load them. Each worker process loads the data, models and dense reference once and keeps
them (`_WORKER`). The driver keeps at most two tasks per cluster CPU in flight, collects them
with `ray.wait` as they finish and rewrites the CSV (atomically) after each, so a resumed Ray
sweep, like a serial one, skips the cells already there. Latency under Ray: each worker measures
the dense model's latency itself (once per model) and times compressed models against it in the
same process, with the thread count Ray gives a 1-CPU task (1 thread), while other cells run on
the other cores; a size already measured (in the CSV, or by a finished task of this run) is
reused, as in the serial sweep. Parameters, MACs and accuracies equal a serial sweep's run with
one torch thread (tested); fold times and latency ratios reflect the worker's share of the
machine. The dense row comes from the first finished task of each model.
"""

from __future__ import annotations

import contextlib
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
from modelfold.latency import median_latency
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
          "accuracy", "fold_s", "latency_ratio", "budget"]
# sweep budget -> the FoldConfig field its targets go to ("ratio": the targets are ratios)
BUDGETS = {"ratio": None, "sparsity": "target_sparsity", "macs": "target_macs",
           "memory": "target_memory", "latency": "target_latency"}
BUDGET_LABELS = {"ratio": "ratio", "sparsity": "parameters removed", "macs": "MACs removed",
                 "memory": "weight bytes removed", "latency": "latency removed"}


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
    ratios: list[float]  # the targets of `budget` (fractions of the dense model's amount)
    seeds: list[int] = field(default_factory=lambda: [0])
    protocols: list[str] = field(default_factory=lambda: ["whole"])
    # None = all 10,000 test images; the first 5,000 (class-balanced within 5%) halve the cost
    test_samples: int | None = None
    calibration_samples: int = 1024
    deep_inversion: dict[str, Any] = field(
        default_factory=lambda: asdict(DeepInversionConfig.preset("cpu")))
    latency_batch: int = 256
    latency_runs: int = 5
    # what the ratios are: "ratio" (every group's share of channels, the paper), or the share
    # to remove of the parameters ("sparsity"), MACs ("macs"), weight bytes ("memory") or
    # measured latency at `latency_batch` ("latency"); see `_budget_cell`
    budget: str = "ratio"


def _di(cfg: SweepConfig) -> dict[str, Any]:
    return cfg.deep_inversion


def _fold(repair: str, clusterer: str = "kmeans",
          allocation: str = "uniform") -> Callable[..., nn.Module]:
    def run(model, example, ratio, seed, calibration, module_ratios, cfg, budget=None):
        config = mf.FoldConfig(**(budget or {"ratio": ratio}), seed=seed, repair=repair,
                               clusterer=clusterer,
                               allocation=allocation, module_ratios=module_ratios,
                               deep_inversion=_di(cfg),
                               calibration_samples=cfg.calibration_samples)
        return mf.fold(model, example, config=config, calibration=calibration)
    return run


# Folding variants beyond the paper: suffix -h = Hartigan-refined k-means, -a = budget-aware
# ("inertia") allocation of the same parameter count; "dirb" = Fold-DIR with debiased BN
# statistics. A uniform ratio sets the parameter budget of every -a variant.
_REPAIR_NAMES = {"naive": "none", "r": "data", "ar": "approx", "dir": "deep_inversion",
                 "dirb": "deep_inversion_debiased"}
_BEYOND = {f"fold-{short}{h}{a}": _fold(repair, "hartigan" if h else "kmeans",
                                        "inertia" if a else "uniform")
           for short, repair in _REPAIR_NAMES.items() for h in ("", "-h") for a in ("", "-a")
           if h or a or short == "dirb"}
_SHORT_LABELS = {"naive": "Fold-Naive", "r": "Fold-R", "ar": "Fold-AR", "dir": "Fold-DIR",
                 "dirb": "Fold-DIR debiased"}
LABELS.update({name: _SHORT_LABELS[name.split("-")[1]] + (" + Hartigan" if "-h" in name else "")
               + (" + allocation" if name.endswith("-a") else "") for name in _BEYOND})


def _prune(p: int, reset: bool) -> Callable[..., nn.Module]:
    def run(model, example, ratio, seed, calibration, module_ratios, cfg, budget=None):
        return magnitude_prune(model, example, ratio=ratio, p=p, module_ratios=module_ratios,
                               reset_bn=calibration if reset else None,
                               calibration_samples=cfg.calibration_samples)
    return run


def _merge(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def run(model, example, ratio, seed, calibration, module_ratios, cfg, budget=None):
        return fn(model, example, ratio=ratio, module_ratios=module_ratios)
    return run


METHODS: dict[str, Callable[..., nn.Module]] = {
    "fold-naive": _fold("none"), "fold-r": _fold("data"), "fold-ar": _fold("approx"),
    "fold-dir": _fold("deep_inversion"), "sp-l1": _prune(1, False), "sp-l2": _prune(2, False),
    "sp-l1-r": _prune(1, True), "sp-l2-r": _prune(2, True), "ifm": _merge(ifm),
    "inn": _merge(inn), "neuron-merging": _merge(neuron_merging),
    "intra-fusion": _merge(intra_fusion), **_BEYOND,
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
            f"{float(row['ratio']):.4f}", str(row["seed"]), row.get("budget") or "ratio")


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:  # files written before budgets existed hold ratios
        row["budget"] = row.get("budget") or "ratio"
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def run_sweep(cfg: SweepConfig, out_dir: Path, name: str = "sweep",
              log: Callable[[str], None] = print, ray: str | None = None) -> list[dict]:
    """Run (or resume) the sweep `cfg`; rows go to `out_dir/<name>.csv` as cells finish.

    `ray`: None runs the cells here, one after another; "local" runs them as tasks on a local
    Ray instance (started here, one CPU per core, shut down at the end); any other value is the
    address of a Ray cluster to run them on (see the module docstring).
    """
    for method in cfg.methods:
        if method not in METHODS:
            raise FoldError(f"unknown method {method!r}; known: {sorted(METHODS)}.")
    if cfg.budget not in BUDGETS:
        raise FoldError(f"SweepConfig.budget: unknown budget {cfg.budget!r}; known: "
                        f"{list(BUDGETS)}.")
    if cfg.budget != "ratio" and cfg.protocols != ["whole"]:
        raise FoldError(f"SweepConfig.budget={cfg.budget!r} spends a budget over the whole "
                        f"model; it needs protocols ['whole'], got {cfg.protocols}.")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{name}.csv"
    rows = read_rows(csv_path)
    done = {_key(r) for r in rows}
    # cells of equal size (same groups, same k) run at the same speed: a resumed sweep reuses
    # the latency measured for the architecture instead of timing it again under other load
    measured_latency = {(r["model"], str(r["width"]), str(r["params"]), str(r["macs"])):
                        float(r["latency_ratio"]) for r in rows if r["method"] != "dense"}
    if ray is None:
        _run_serial(cfg, rows, done, measured_latency, csv_path, log)
    else:
        _run_ray(ray, cfg, rows, done, measured_latency, csv_path, log)
    write_rows(csv_path, rows)
    (out_dir / f"{name}.md").write_text(markdown_table(rows))
    plot_rows(rows, out_dir / name)
    return rows


def _spec_cells(spec: ModelSpec, cfg: SweepConfig):
    """(protocol, ratio, seed, method) of every cell of `spec`, in the sweep's order."""
    for protocol in cfg.protocols:
        if protocol != "whole" and not spec.name.startswith("resnet"):
            continue
        for ratio in cfg.ratios:
            for seed in cfg.seeds:
                for method in cfg.methods:
                    if method in SEED_FREE and seed != cfg.seeds[0]:
                        continue  # does not depend on the clustering seed
                    yield protocol, ratio, seed, method


def _cell_row(spec: ModelSpec, protocol: str, method: str, ratio: float, seed: int,
              budget: str = "ratio") -> dict:
    return {"model": spec.name, "width": spec.width, "protocol": protocol, "method": method,
            "ratio": ratio, "seed": seed, "budget": budget}


def _log_line(spec: ModelSpec, row: dict) -> str:
    target = "r" if row["budget"] == "ratio" else BUDGET_LABELS[row["budget"]]
    return (f"{spec.label} {row['protocol']} {row['method']} {target}={row['ratio']:.2f} "
            f"seed={row['seed']}: acc {row['accuracy']:.2%}, sparsity {row['sparsity']:.1%}, "
            f"{row['fold_s']:.2f} s")


def _load_data(cfg: SweepConfig) -> tuple[torch.utils.data.TensorDataset, torch.Tensor,
                                          torch.Tensor]:
    """(test set in channels-last, calibration images, one example input) of a sweep."""
    from experiments.fashion_mnist import load_fashion_mnist

    test = load_fashion_mnist("test")
    if cfg.test_samples is not None:
        test = torch.utils.data.TensorDataset(test.tensors[0][: cfg.test_samples],
                                              test.tensors[1][: cfg.test_samples])
    train = load_fashion_mnist("train")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    calibration = train.tensors[0][pick[: cfg.calibration_samples]]
    test = torch.utils.data.TensorDataset(_channels_last(test.tensors[0]), test.tensors[1])
    return test, calibration, test.tensors[0][:1]


def _compress_cell(spec: ModelSpec, model: nn.Module, data: tuple, protocol: str, method: str,
                   ratio: float, seed: int, cfg: SweepConfig, dense: dict,
                   latencies: dict[tuple, float], measured_latency: dict[tuple, float]) -> dict:
    """One cell's row: compress `model` with METHODS[method], measure it against `dense`.

    `latencies` (layer shapes -> latency ratio) caches timings made in this process;
    `measured_latency` ((model, width, params, macs) -> ratio) holds earlier measurements.
    """
    from experiments.train import evaluate_accuracy

    test, calibration, example = data
    row = _cell_row(spec, protocol, method, ratio, seed, cfg.budget)
    g_ratio, m_ratios = protocol_ratios(model, protocol, ratio)
    budget, g_ratio = _budget_cell(spec, model, example, method, ratio, g_ratio, cfg, dense)
    start = time.perf_counter()
    folded = METHODS[method](model, example, g_ratio, seed, calibration, m_ratios, cfg,
                             budget=budget)
    fold_s = time.perf_counter() - start
    folded = _channels_last(folded)
    params = sum(p.numel() for p in folded.parameters())
    shapes = tuple(tuple(p.shape) for p in folded.parameters())
    macs = count_macs(folded, example)
    measured = measured_latency.get((spec.name, str(spec.width), str(params), str(macs)))
    if measured is None and shapes not in latencies:
        latencies[shapes] = median_latency(
            folded, dense["batch"], runs=cfg.latency_runs) / dense["latency"]
    row.update(
        params=params, sparsity=1 - params / dense["params"], macs=macs,
        accuracy=evaluate_accuracy(folded, test), fold_s=fold_s,
        latency_ratio=measured or latencies[shapes])
    return row


# (model, budget, target) -> the uniform ratio spending it, solved once per process
_SOLVED: dict[tuple, float] = {}


def _budget_cell(spec: ModelSpec, model: nn.Module, example: torch.Tensor, method: str,
                 target: float, ratio: float, cfg: SweepConfig, dense: dict
                 ) -> tuple[dict[str, Any] | None, float]:
    """(FoldConfig budget fields, ratio) of a cell. Folds spend a parameter, MAC or memory
    budget themselves (`target_*`, so allocations like "inertia" spend it their way); the other
    methods remove the same share of every group, at the uniform ratio the fold solves for it
    (`modelfold.graph_fold.uniform_ratio`). A latency budget is solved once per target by the
    `target_latency` search on the sweep's latency batch, and every method, folds included,
    compresses at that ratio: one timing per target, not one per cell."""
    if cfg.budget == "ratio":
        return None, ratio
    from modelfold.graph_fold import uniform_ratio
    from modelfold.merge.apply import memory_bytes

    field_name = BUDGETS[cfg.budget]
    value: float | int = target
    if cfg.budget == "memory":
        value = int((1.0 - target) * memory_bytes(model))
    fields = {field_name: value}
    if cfg.budget != "latency" and method.startswith("fold"):
        return fields, ratio
    key = (spec.label, spec.epochs, cfg.budget, target)
    if key not in _SOLVED:
        inputs = dense["batch"] if cfg.budget == "latency" else example
        _SOLVED[key] = uniform_ratio(model, inputs, **fields)
    return None, _SOLVED[key]


def _run_serial(cfg: SweepConfig, rows: list[dict], done: set, measured_latency: dict,
                csv_path: Path, log: Callable[[str], None]) -> None:
    from experiments.train import pretrained_fashion_mnist

    data = _load_data(cfg)
    for spec in cfg.models:
        model = pretrained_fashion_mnist(spec.name, width=spec.width, epochs=spec.epochs)
        with mf.reuse_traces():  # every cell of the model folds a copy of one trace
            _run_model_cells(spec, model, cfg, data, rows, done, measured_latency, csv_path,
                             log)


def _run_model_cells(spec: ModelSpec, model: nn.Module, cfg: SweepConfig, data: tuple,
                     rows: list[dict], done: set, measured_latency: dict, csv_path: Path,
                     log: Callable[[str], None]) -> None:
    from experiments.train import evaluate_accuracy

    test, _, example = data
    dense = None
    latencies: dict[tuple, float] = {}
    for protocol, ratio, seed, method in _spec_cells(spec, cfg):
        if _key(_cell_row(spec, protocol, method, ratio, seed, cfg.budget)) in done:
            continue
        if dense is None:
            dense = _dense_row(spec, model, test, example, cfg, evaluate_accuracy)
            if _key(dense["row"]) not in done:
                rows.append(dense["row"])
                done.add(_key(dense["row"]))
        row = _compress_cell(spec, model, data, protocol, method, ratio, seed, cfg, dense,
                             latencies, measured_latency)
        rows.append(row)
        done.add(_key(row))
        write_rows(csv_path, rows)
        log(_log_line(spec, row))


# per-process cache of a Ray worker (data, models, dense references, latencies), so a worker
# that runs many cells loads each only once; keyed by everything that determines the value
_WORKER: dict[tuple, Any] = {}


def run_cell(spec: ModelSpec, protocol: str, method: str, ratio: float, seed: int,
             cfg: SweepConfig, measured_latency: dict[tuple, float] | None = None) -> dict:
    """One sweep cell, computed in this process (the body of a Ray task).

    Loads the cached checkpoint and Fashion-MNIST (once per process), measures the dense
    reference (once per process and model) and returns {"row": the cell's CSV row, "dense":
    the model's dense row}.
    """
    from experiments import fashion_mnist
    from experiments.train import checkpoint_path, evaluate_accuracy, pretrained_fashion_mnist

    ckpt = str(checkpoint_path(spec.name, width=spec.width, epochs=spec.epochs))
    data_key = ("data", str(fashion_mnist.resolve_root()), cfg.test_samples,
                cfg.calibration_samples)
    if data_key not in _WORKER:
        _WORKER[data_key] = _load_data(cfg)
        # keep only the copies the cells use, not the decoded splits (~0.9 GB per worker)
        fashion_mnist._load_tensors.cache_clear()
    data = _WORKER[data_key]
    if ("model", ckpt) not in _WORKER:
        _WORKER["model", ckpt] = pretrained_fashion_mnist(
            spec.name, width=spec.width, epochs=spec.epochs, progress=False)
    model = _WORKER["model", ckpt]
    timing = (ckpt, data_key, cfg.latency_batch, cfg.latency_runs)
    if ("dense", *timing) not in _WORKER:
        _WORKER["dense", *timing] = _dense_row(spec, model, data[0], data[2], cfg,
                                              evaluate_accuracy)
    dense = _WORKER["dense", *timing]
    latencies = _WORKER.setdefault(("latencies", *timing), {})
    row = _compress_cell(spec, model, data, protocol, method, ratio, seed, cfg, dense,
                         latencies, measured_latency or {})
    return {"row": row, "dense": dict(dense["row"])}


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise FoldError("a sweep with --ray needs Ray: pip install 'modelfold[ray]'.") from exc
    return ray


def _run_ray(address: str, cfg: SweepConfig, rows: list[dict], done: set,
             measured_latency: dict, csv_path: Path, log: Callable[[str], None]) -> None:
    from experiments.train import pretrained_fashion_mnist

    ray = _import_ray()
    cells = [(spec, protocol, ratio, seed, method) for spec in cfg.models
             for protocol, ratio, seed, method in _spec_cells(spec, cfg)
             if _key(_cell_row(spec, protocol, method, ratio, seed, cfg.budget)) not in done]
    if not cells:
        return
    for spec in {(s.name, s.width, s.epochs): s for s, *_ in cells}.values():
        # train (or find) every checkpoint now: workers must never train concurrently
        pretrained_fashion_mnist(spec.name, width=spec.width, epochs=spec.epochs)
    started = not ray.is_initialized()
    if started:
        if address == "local":
            env = {k: v for k, v in os.environ.items() if k.startswith("MODELFOLD_")}
            # workers import this module (`experiments` of the source checkout) by name
            root = str(Path(__file__).resolve().parents[1])
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (root, os.environ.get("PYTHONPATH")) if p)
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False,
                     ignore_reinit_error=True, log_to_driver=False,
                     runtime_env={"env_vars": env})
        else:
            try:
                ray.init(address=address)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise FoldError(f"cannot connect to the Ray cluster at {address!r} "
                                f"({type(exc).__name__}: {exc}); use --ray local for a local "
                                "instance.") from exc
    pending: dict[Any, ModelSpec] = {}
    try:
        task = ray.remote(num_cpus=1)(run_cell)
        in_flight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        queue = list(reversed(cells))
        while queue or pending:
            while queue and len(pending) < in_flight:
                spec, protocol, ratio, seed, method = queue.pop()
                known = {k: v for k, v in measured_latency.items()
                         if k[:2] == (spec.name, str(spec.width))}
                ref = task.remote(spec, protocol, method, ratio, seed, cfg, known)
                pending[ref] = spec
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(ready)
            result = ray.get(ready)
            row = result["row"]
            for new in (result["dense"], row):
                if _key(new) not in done:
                    rows.append(new)
                    done.add(_key(new))
            measured_latency.setdefault((spec.name, str(spec.width), str(row["params"]),
                                         str(row["macs"])), float(row["latency_ratio"]))
            write_rows(csv_path, rows)
            log(_log_line(spec, row))
    finally:
        for ref in pending:  # only after an error or an interrupt: stop the other cells
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        if started:
            ray.shutdown()


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
           "fold_s": 0.0, "latency_ratio": 1.0, "budget": "ratio"}
    return {"row": row, "params": params, "batch": batch,
            "latency": median_latency(model, batch, runs=cfg.latency_runs)}


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of every (model, width, protocol, method, budget, target)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["model"], int(r["width"]), r["protocol"], r["method"],
               r.get("budget") or "ratio", float(r["ratio"]))
        groups.setdefault(key, []).append(r)
    out = []
    order = ["dense", *LABELS]

    def sort_key(item):
        (model, width, protocol, method, budget, ratio), _ = item
        rank = order.index(method) if method in order else len(order)
        return (model, width, protocol, budget, ratio, rank, method)

    for (model, width, protocol, method, budget, ratio), rs in sorted(groups.items(),
                                                                       key=sort_key):
        acc = [float(r["accuracy"]) for r in rs]
        out.append({"model": model, "width": width, "protocol": protocol, "method": method,
                    "budget": budget, "ratio": ratio, "seeds": len(rs),
                    "sparsity": statistics.fmean(float(r["sparsity"]) for r in rs),
                    "params": int(statistics.fmean(float(r["params"]) for r in rs)),
                    "macs": int(statistics.fmean(float(r["macs"]) for r in rs)),
                    "accuracy": statistics.fmean(acc),
                    "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "fold_s": statistics.fmean(float(r["fold_s"]) for r in rs),
                    "latency_ratio": statistics.fmean(float(r["latency_ratio"]) for r in rs)})
    return out


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | protocol | method | target | param. sparsity | MACs | test accuracy "
             "(mean ± std) | seeds | fold s | latency vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in aggregate(rows):
        target = (f"{r['ratio']:.2f}" if r["budget"] == "ratio" or r["method"] == "dense" else
                  f"{r['ratio']:.0%} {BUDGET_LABELS[r['budget']]}")
        lines.append(
            f"| {r['model']}-w{r['width']} | {r['protocol']} | {r['method']} | "
            f"{target} | {r['sparsity']:.1%} | {r['macs']:,} | "
            f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f} | {r['seeds']} | "
            f"{r['fold_s']:.2f} | {r['latency_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[dict], stem: Path) -> list[Path]:
    """One PNG per (model, protocol, budget): accuracy vs the budget's reduction (parameter
    sparsity for ratios, parameter and memory budgets; MACs removed; latency removed), one
    line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    written = []
    panels = sorted({(r["model"], r["width"], r["protocol"], r["budget"]) for r in agg
                     if r["method"] != "dense"})
    dense_macs = {(r["model"], r["width"]): r["macs"] for r in agg if r["method"] == "dense"}
    for model, width, protocol, budget in panels:
        fig, ax = plt.subplots(figsize=(8.0, 4.4))
        panel = [r for r in agg if (r["model"], r["width"], r["protocol"], r["budget"]) ==
                 (model, width, protocol, budget)]

        def reduction(r: dict, budget: str = budget, model: str = model,
                      width: int = width) -> float:
            if budget == "macs":
                return 1.0 - r["macs"] / dense_macs.get((model, width), r["macs"])
            if budget == "latency":
                return 1.0 - r["latency_ratio"]
            return r["sparsity"]

        present = [m for m in LABELS if any(r["method"] == m for r in panel)]
        colors = plt.cm.tab10 if len(present) <= 10 else plt.cm.tab20
        for index, method in enumerate(present):
            label = LABELS[method]
            pts = sorted((r for r in panel if r["method"] == method), key=reduction)
            if pts:
                ax.errorbar([100 * reduction(r) for r in pts],
                            [100 * r["accuracy"] for r in pts],
                            yerr=[100 * r["accuracy_std"] for r in pts], marker="o",
                            markersize=4, capsize=2, label=label, color=colors(index),
                            ls="-" if method.startswith("fold") else
                            ":" if method.startswith("sp-") else "--")
        dense = [r for r in agg if (r["model"], r["width"], r["method"]) ==
                 (model, width, "dense")]
        if dense:
            ax.axhline(100 * dense[0]["accuracy"], color="grey", ls="--", label="dense")
        ax.axhline(10, color="lightgrey", ls=":", label="chance")
        ax.set_xlabel({"macs": "MACs removed (%)", "latency": "measured latency removed (%)"}
                      .get(budget, "parameter sparsity (%)"))
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model} (width {width}), Fashion-MNIST, {protocol}, no fine-tuning")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        suffix = "" if budget == "ratio" else f"_{budget}"
        path = Path(f"{stem}_{model}-w{width}_{protocol}{suffix}.png")
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
    # data-free variants beyond the paper next to the paper's folds, ~51 % / ~75 %
    "beyond-cnn": SweepConfig(
        models=[ModelSpec("resnet18", 32, 2), ModelSpec("vgg11_bn", 32, 5)],
        methods=["fold-naive", "fold-r", "fold-dir", "fold-naive-h", "fold-dir-h",
                 "fold-dirb-h", "fold-naive-h-a", "fold-dirb-h-a", "fold-r-h-a"],
        ratios=[0.3, 0.5], seeds=[0, 1, 2], test_samples=5000, latency_runs=3),
}


def preset(name: str) -> SweepConfig:
    if name not in PRESETS:
        raise FoldError(f"unknown sweep preset {name!r}; known: {sorted(PRESETS)}.")
    return PRESETS[name]


__all__ = [
    "BUDGETS",
    "METHODS",
    "PRESETS",
    "PROTOCOLS",
    "ModelSpec",
    "SweepConfig",
    "aggregate",
    "markdown_table",
    "plot_rows",
    "preset",
    "run_cell",
    "run_sweep",
]
