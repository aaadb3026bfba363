"""Command line: `modelfold fold`, `fold-llm`, `export-gguf`, `eval-ppl`, `eval-zero-shot`,
`summary`, `sweep`, `demo`.

Options are checked before any model is loaded; every failure ends in one line on stderr and
exit code 2 (see `modelfold.cli_support`).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.console import Console

from modelfold.cli_support import App, CliError, Group, fail


def _experiments(module: str, what: str) -> ModuleType:
    """`experiments.<module>` of the source checkout this modelfold runs from (`demo`, `sweep`
    and the Fashion-MNIST data are experiments beside `src/`, not part of the package)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "experiments" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module(f"experiments.{module}")
    except ModuleNotFoundError as exc:
        if exc.name in ("experiments", f"experiments.{module}"):
            fail(f"{what} runs the experiments of a modelfold source checkout (experiments/ "
                 "beside src/, installed with pip install -e '.[bench]'); clone the repository "
                 "and run it there (make demo).")
        fail(f"{what} needs the bench extra ({exc.name} is missing): "
             "pip install 'modelfold[bench]'.")


def _sweep_presets() -> list[str]:
    try:
        return list(_experiments("sweep", "modelfold sweep").PRESETS)
    except CliError:  # no source checkout or no bench extra: `sweep` itself says why
        return []

app = App(
    cls=Group,
    help="Compress trained PyTorch models by folding (cluster -> merge), no data needed.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console()

TRUST_HELP = ("Run the architecture factory the folder's manifest names even if it is not "
              "modelfold's zoo or registered (like Hugging Face's trust_remote_code); only for "
              "folders you trust.")
TrustFactory = Annotated[bool, typer.Option("--trust-factory", help=TRUST_HELP)]
LLM_FAMILIES = "LLaMA / Qwen2 / Mistral"

def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        fail(f"--input-shape {text!r} must be comma-separated integers, e.g. 1,3,32,32.")
    if not shape or any(v <= 0 for v in shape):
        fail(f"--input-shape {text!r} must contain positive integers.")
    return shape


def _check_ratio(option: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and 0.0 <= value < 1.0):
        fail(f"{option} {value} must lie in [0, 1).")


def _check_positive(option: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        fail(f"{option} {value} must be at least {minimum}.")


def _check_device(device: str | None) -> None:
    """A device torch knows and this machine has."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        fail(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps).")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {device}: no CUDA GPU is available here (torch {torch.__version__}); "
                 "use --device cpu or leave --device out.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            fail(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                 "device(s).")
    elif dev.type == "meta":
        fail("--device meta holds no weights; use cpu or cuda.")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {device}: Apple's MPS backend is not available here.")
    elif dev.type not in ("cpu", "mps"):
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if not callable(available) or not available():
            fail(f"--device {device}: no {dev.type} device is available here.")


def _check_file(option: str, path: Path | None) -> None:
    if path is not None and not path.is_file():
        fail(f"{option} {path}: no such file.")


def _check_folder(option: str, path: Path | None) -> None:
    if path is not None and not path.is_dir():
        fail(f"{option} {path}: no such folder.")


def _zoo_names() -> str:
    from modelfold.zoo import MODEL_ZOO

    return ", ".join(sorted(MODEL_ZOO))


def _model_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        fail(f"--model-kwargs {text!r} is not valid JSON ({exc}); e.g. '{{\"width\": 16}}'.")
    if not isinstance(kwargs, dict):
        fail(f"--model-kwargs {text!r} must be a JSON object of keyword arguments, e.g. "
             "'{\"width\": 16}'.")
    return kwargs


def _build_model(model_name: str, model_kwargs: str | None, checkpoint: Path):
    from modelfold.errors import FoldError
    from modelfold.io.folder import build_from_factory, factory_spec
    from modelfold.zoo import MODEL_ZOO, create_model

    kwargs = _model_kwargs(model_kwargs)
    if model_name not in MODEL_ZOO and ":" not in model_name:
        fail(f"--model {model_name!r} is neither a zoo model ({_zoo_names()}) nor "
             "'package.module:callable'.")
    shown = f"--model {model_name}" + (f" --model-kwargs '{model_kwargs}'" if kwargs else "")
    try:
        if model_name in MODEL_ZOO:
            return create_model(model_name, **kwargs)
        # the user named this factory on the command line: trusted
        return build_from_factory(factory_spec(model_name, kwargs), checkpoint, trust=True)
    except FoldError as exc:
        fail(f"{shown}: {exc}")
    except Exception as exc:  # building runs the architecture's own code
        fail(f"{shown} cannot be built ({type(exc).__name__}: {exc}); check --model-kwargs.")


def _read_state(checkpoint: Path) -> dict[str, Any]:
    import torch

    try:
        if checkpoint.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(checkpoint))
        else:  # never unpickle arbitrary objects
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
    except Exception as exc:  # torch.load / safetensors raise many types for bad files
        first = " ".join(str(exc).split())[:200]
        fail(f"cannot read weights from {checkpoint} ({type(exc).__name__}: {first}); give a "
             ".safetensors file or a .pt state dict.")
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        fail(f"{checkpoint} holds no state dict (a mapping of tensor names to tensors).")
    return state


def _fit_summary(state: dict[str, Any], own: dict[str, Any]) -> str | None:
    """What keeps `state` from loading into a model with state dict `own`, in one line."""
    wrong = [(k, list(state[k].shape), list(v.shape)) for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    parts = []
    if wrong:
        shown = "; ".join(f"{k}: file {a} vs model {b}" for k, a, b in wrong[:3])
        more = f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        parts.append(f"{len(wrong)} tensor{'s' if len(wrong) > 1 else ''} differ in shape "
                     f"({shown}{more})")
    for what, names in (("missing from the file", missing), ("not in the model", unexpected)):
        if names:
            more = f", +{len(names) - 3}" if len(names) > 3 else ""
            parts.append(f"{len(names)} tensor{'s' if len(names) > 1 else ''} {what} "
                         f"({', '.join(names[:3])}{more})")
    return "; ".join(parts) or None


def load_checkpoint(checkpoint: Path, model_name: str | None, model_kwargs: str | None,
                    trust_factory: bool = False):
    """A modelfold folder, or a weights file (.safetensors / .pt) plus --model."""
    import modelfold as mf

    if checkpoint.is_dir():
        return mf.load(checkpoint, trust_factory=trust_factory)
    if not checkpoint.is_file():
        fail(f"checkpoint {checkpoint} does not exist.")
    if model_name is None:
        fail(f"{checkpoint} is a weights file: say which architecture with --model "
             f"(a zoo name: {_zoo_names()}; or 'package.module:callable').")
    model = _build_model(model_name, model_kwargs, checkpoint)
    state = _read_state(checkpoint)
    problem = _fit_summary(state, model.state_dict())
    if problem is not None:
        fail(f"the weights in {checkpoint} do not fit --model {model_name}"
             f"{' --model-kwargs ' + repr(model_kwargs) if model_kwargs else ''}: {problem}. "
             "Check --model and --model-kwargs (e.g. the width).")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        fail(f"cannot load the weights in {checkpoint} into --model {model_name} "
             f"({' '.join(str(exc).split())[:300]}).")
    return model.eval()


def load_calibration(source: str):
    """A tensor of inputs from a file, or 1,024 Fashion-MNIST training images."""
    import torch

    if source == "fashion-mnist":
        data = _experiments("fashion_mnist", "--calibration fashion-mnist")
        images = data.load_fashion_mnist("train").tensors[0]
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:1024]
        return images[pick]
    path = Path(source)
    if not path.is_file():
        fail(f"--calibration {source}: no such file (or use 'fashion-mnist').")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            data = tensors.get("inputs", next(iter(tensors.values()), None))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load / safetensors raise many types for bad files
        fail(f"--calibration {source}: cannot read a tensor ({type(exc).__name__}: "
             f"{' '.join(str(exc).split())[:200]}).")
    if not isinstance(data, torch.Tensor):
        fail(f"--calibration {source} must hold one tensor of inputs.")
    return data


def _fold_config(config: Path | None, data_flags: dict[str, Any], di_preset: str | None):
    """FoldConfig from --config and the flags (flags win)."""
    from dataclasses import asdict

    import modelfold as mf
    from modelfold.errors import FoldError
    from modelfold.repair import DeepInversionConfig

    data: dict[str, Any] = {}
    if config is not None:
        _check_file("--config", config)
        try:
            data = mf.FoldConfig.from_json(config.read_text(encoding="utf-8")).to_dict()
        except FoldError as exc:
            fail(f"--config {config}: {str(exc).removeprefix('FoldConfig: ')}")
        except (ValueError, RecursionError, TypeError) as exc:
            fail(f"--config {config} is not a FoldConfig JSON file ({type(exc).__name__}: "
                 f"{' '.join(str(exc).split())[:200]}).")
    budgets = ("ratio", "target_sparsity", "target_macs", "target_memory", "target_latency")
    for key in budgets:  # a budget flag replaces the config file's budget
        if data_flags.get(key) is not None:
            data.update(dict.fromkeys(budgets), **{key: data_flags[key]})
    data.update({k: v for k, v in data_flags.items()
                 if v is not None and k not in budgets})
    if di_preset is not None:
        try:
            data["deep_inversion"] = asdict(DeepInversionConfig.preset(di_preset))
        except FoldError as exc:
            fail(f"--di-preset: {exc}")
    return mf.FoldConfig.from_dict(data)


@app.command()
def fold(
    checkpoint: Annotated[Path, typer.Argument(help="modelfold folder, or weights file "
                                               "(.safetensors/.pt) together with --model.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the folded model to.")],
    ratio: Annotated[float | None, typer.Option(help="Fraction of channels removed per group.")]
    = None,
    target_sparsity: Annotated[float | None, typer.Option(
        help="Fraction of parameters to remove (solves for the ratio).")] = None,
    target_macs: Annotated[float | None, typer.Option(
        help="Fraction of multiply-accumulates to remove, counted on an input of "
             "--input-shape (solves for the ratio).")] = None,
    target_memory: Annotated[int | None, typer.Option(
        help="Bytes the folded model's parameters and buffers may take at most (solves for "
             "the ratio).")] = None,
    target_latency: Annotated[float | None, typer.Option(
        help="Fraction of the forward-pass latency on an input of --input-shape to remove, "
             "measured on this machine (searches the ratio by folding and timing).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="Architecture of a weights file: zoo name or 'package.module:callable'.")]
    = None,
    model_kwargs: Annotated[str | None, typer.Option(
        help='JSON keyword arguments for --model, e.g. \'{"width": 16}\'.')] = None,
    input_shape: Annotated[str, typer.Option(help="Example input shape for tracing.")]
    = "1,3,32,32",
    seed: Annotated[int | None, typer.Option(help="Clustering seed (default 0).")] = None,
    clusterer: Annotated[str | None, typer.Option(
        help="kmeans, hartigan or ward (default kmeans).")]
    = None,
    round_to: Annotated[str | None, typer.Option(
        help="Round kept channel counts to multiples of this (default 1), or auto: the "
             "multiple whose fold runs fastest on this device, measured.")] = None,
    allocation: Annotated[str | None, typer.Option(
        help="uniform (same ratio in every group) or inertia (same parameter or MAC count "
             "spread by clustering distortion) (default uniform).")] = None,
    config: Annotated[Path | None, typer.Option(help="FoldConfig JSON file (flags override).")]
    = None,
    repair: Annotated[str | None, typer.Option(
        help="none (Fold-Naive), data (Fold-R, needs --calibration), approx (Fold-AR, "
             "data-free), deep_inversion (Fold-DIR) or deep_inversion_debiased (Fold-DIR with "
             "the original model's statistics gap removed) (default none).")] = None,
    calibration: Annotated[str | None, typer.Option(
        help="Calibration inputs for --repair data: a tensor file (.safetensors/.pt) or "
             "'fashion-mnist' (1,024 training images).")] = None,
    di_preset: Annotated[str | None, typer.Option(
        help="DeepInversion settings: paper or cpu (default paper).")] = None,
    ignore: Annotated[str | None, typer.Option(
        help="Comma-separated names of modules whose channel groups stay unfolded (modules an "
             "error names: ones that never run on the example input, reused or tied ones).")]
    = None,
    self_calibrate: Annotated[bool, typer.Option(
        "--self-calibrate",
        help="Data-free folding calibrated on inputs the model synthesises itself (BN "
             "statistics inversion or sampled tokens), activation merge, sensitivity "
             "allocation, least-squares refit of the consumers.")] = False,
    trust_factory: TrustFactory = False,
) -> None:
    """Fold a model and save the smaller model to --out."""
    import torch

    import modelfold as mf

    given = [o for o, v in (("--ratio", ratio), ("--target-sparsity", target_sparsity),
                            ("--target-macs", target_macs), ("--target-memory", target_memory),
                            ("--target-latency", target_latency))
             if v is not None]
    if len(given) > 1:
        fail("give only one of --ratio, --target-sparsity, --target-macs, --target-memory or "
             f"--target-latency (got {' and '.join(given)}).")
    _check_ratio("--ratio", ratio)
    _check_ratio("--target-sparsity", target_sparsity)
    _check_ratio("--target-macs", target_macs)
    _check_ratio("--target-latency", target_latency)
    _check_positive("--target-memory", target_memory)
    rounding: int | str | None = round_to
    if round_to is not None and round_to != "auto":
        try:
            rounding = int(round_to)
        except ValueError:
            fail(f"--round-to {round_to!r} must be a positive integer or auto.")
    shape = _parse_shape(input_shape)
    cfg = _fold_config(config, {"ratio": ratio, "target_sparsity": target_sparsity,
                                "target_macs": target_macs, "target_memory": target_memory,
                                "target_latency": target_latency,
                                "seed": seed, "clusterer": clusterer, "repair": repair,
                                "round_to": rounding, "allocation": allocation,
                                "self_calibrate": True if self_calibrate else None}, di_preset)
    if cfg.repair == "data" and calibration is None:
        fail("--repair data needs --calibration (a tensor file, .safetensors or .pt, or "
             "'fashion-mnist').")
    calibration_data = load_calibration(calibration) if calibration else None
    base = load_checkpoint(checkpoint, model, model_kwargs, trust_factory)
    ignored = []
    for name in [n.strip() for n in (ignore or "").split(",") if n.strip()]:
        try:
            ignored.append(base.get_submodule(name))
        except AttributeError:
            fail(f"--ignore {name}: the model has no module {name!r}.")
    example = torch.zeros(shape)
    with console.status("folding..."):
        folded = mf.fold(base, example, config=cfg, calibration=calibration_data,
                         ignored=ignored)
    mf.save(folded, out)
    typer.echo(str(mf.summary(base, folded, example)))
    console.print(f"[green]saved[/] {out}")


def _unfolded(folded, folder: Path, trust_factory: bool):
    """The unfolded architecture a loaded folder came from (for its MACs), or None."""
    from modelfold.io.folder import build_from_factory
    from modelfold.record import FACTORY_ATTR, get_record

    spec = getattr(folded, FACTORY_ATTR, None)
    record = get_record(folded)
    if spec is None or record is None:
        return None
    base = build_from_factory(spec, folder, trust=trust_factory)
    params = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    return base.eval() if params == record.params_before else None  # folded more than once


@app.command()
def summary(
    folder: Annotated[Path, typer.Argument(help="Folder written by `modelfold fold`.")],
    latency: Annotated[bool, typer.Option(
        help="Also time both models on the recorded example input (median of 20 runs).")]
    = False,
    trust_factory: TrustFactory = False,
) -> None:
    """Print parameters, MACs (and latency) and every channel group n -> k of a folded model."""
    import modelfold as mf
    from modelfold.record import get_llm_record, get_record

    folded = mf.load(folder, trust_factory=trust_factory)
    if get_record(folded) is None and get_llm_record(folded) is None:
        params = sum(p.numel() for p in {id(p): p for p in folded.parameters()}.values())
        typer.echo(f"parameters : {params:>14,}  (an unfolded model: no fold record)")
        return
    typer.echo(str(mf.summary(_unfolded(folded, folder, trust_factory), folded,
                              latency=latency)))


@app.command()
def demo(
    width: Annotated[int, typer.Option(help="ResNet18 base width.")] = 16,
    epochs: Annotated[int, typer.Option(help="Training epochs when no cached model exists.")]
    = 2,
    out: Annotated[Path, typer.Option(help="Where the table and plot go.")]
    = Path("out/demo"),
) -> None:
    """Train (or load cached) ResNet18 on Fashion-MNIST, fold it at several ratios, report."""
    _check_positive("--width", width)
    _check_positive("--epochs", epochs)
    _experiments("demo", "modelfold demo").run_demo(width=width, epochs=epochs, out_dir=out)


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


@app.command()
def sweep(
    preset: Annotated[str, typer.Option(
        help=f"Preset: {', '.join(_sweep_presets())} (quick takes under 5 min).")] = "quick",
    out: Annotated[Path, typer.Option(help="Folder for CSV, markdown and PNG.")]
    = Path("benchmarks/results"),
    name: Annotated[str | None, typer.Option(help="File stem (default: sweep_<preset>).")]
    = None,
    methods: Annotated[str | None, typer.Option(
        help="Comma-separated method ids (default: the preset's).")] = None,
    ratios: Annotated[str | None, typer.Option(
        help="Comma-separated ratios, or targets of --budget.")] = None,
    budget: Annotated[str, typer.Option(
        help="What --ratios are: ratio (every group's share of channels), or the share to "
             "remove of the parameters (sparsity), MACs (macs), weight bytes (memory) or "
             "measured latency (latency).")] = "ratio",
    seeds: Annotated[str | None, typer.Option(help="Comma-separated clustering seeds.")]
    = None,
    ray: Annotated[str | None, typer.Option(
        "--ray", metavar="ADDRESS",
        help="Run the cells as Ray tasks: 'local' starts a local Ray instance (one CPU per "
             "core), anything else is a cluster address (e.g. auto, ray://head:10001). "
             "Needs pip install 'modelfold[ray]'.")] = None,
) -> None:
    """Models x methods x ratios x seeds on Fashion-MNIST -> CSV, table, plots (resumable)."""
    import dataclasses

    experiment = _experiments("sweep", "modelfold sweep")
    known_methods, presets = experiment.METHODS, experiment.PRESETS
    if preset not in presets:
        fail(f"--preset {preset!r} is unknown; presets: {', '.join(presets)}.")
    cfg = dataclasses.replace(presets[preset])
    if methods:
        cfg.methods = _split(methods)
        unknown = [m for m in cfg.methods if m not in known_methods]
        if unknown:
            fail(f"--methods: unknown method(s) {', '.join(unknown)}; known: "
                 f"{', '.join(known_methods)}.")
    try:
        if ratios:
            cfg.ratios = [float(r) for r in _split(ratios)]
    except ValueError:
        fail(f"--ratios {ratios!r} must be comma-separated numbers, e.g. 0.3,0.5.")
    try:
        if seeds:
            cfg.seeds = [int(s) for s in _split(seeds)]
    except ValueError:
        fail(f"--seeds {seeds!r} must be comma-separated integers, e.g. 0,1,2.")
    for r in cfg.ratios:
        _check_ratio("--ratios", r)
    if budget not in experiment.BUDGETS:
        fail(f"--budget {budget!r} is unknown; budgets: {', '.join(experiment.BUDGETS)}.")
    cfg.budget = budget
    if budget != "ratio":
        cfg.protocols = ["whole"]  # a budget is spent over the whole model
    experiment.run_sweep(cfg, out, name or f"sweep_{preset.replace('-', '_')}",
                         log=lambda line: console.print(line), ray=ray)
    console.print(f"[green]wrote[/] {out}")


# --- LLM commands -----------------------------------------------------------------------------

def _quiet_transformers() -> None:
    """No download/loading progress bars: the commands print their own results."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        fail("LLM commands need transformers: pip install 'modelfold[llm]'.")


def check_llm_folder(path: Path, command: str) -> None:
    """A folder holding a Hugging Face causal LM, judged from its files before loading."""
    from modelfold.files import read_json

    if not path.is_dir():
        fail(f"{path} is not a folder holding a Hugging Face model (config.json + weights).")
    manifest_path = path / "modelfold.json"
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        if isinstance(manifest, dict) and manifest.get("format") == "modelfold":
            factory = manifest.get("factory")
            target = factory.get("target") if isinstance(factory, dict) else None
            kind = f" (built by {target})" if isinstance(target, str) else ""
            fail(f"{path} is a modelfold folder of a graph-folded model{kind}, not a Hugging "
                 f"Face ({LLM_FAMILIES}) LLM folder; `{command}` takes LLM folders. Use "
                 "`modelfold fold` or `modelfold summary` for it.")
    config = path / "config.json"
    if not config.is_file():
        fail(f"{path} holds no config.json: it is not a Hugging Face ({LLM_FAMILIES}) LLM "
             "folder.")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        fail(f"{config} is not valid JSON ({' '.join(str(exc).split())[:200]}); the folder is "
             "damaged.")
    except OSError as exc:
        fail(f"cannot read {config} ({exc.strerror or exc}).")
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        fail(f"{config} names no model_type: it is not a Hugging Face model config.")


def load_llm(path: Path, trust_factory: bool = False):
    """(model, tokenizer or None) from a modelfold or Hugging Face folder."""
    import modelfold as mf

    _require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    if (path / "modelfold.json").is_file():
        model = mf.load(path, trust_factory=trust_factory)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path).eval()
        except (OSError, ValueError, KeyError) as exc:
            fail(f"cannot load a causal LM from {path} ({type(exc).__name__}: "
                 f"{' '.join(str(exc).split())[:300]}).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    return model, tokenizer


def load_tokenizer(option_path: Path):
    _require_transformers()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(option_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"--tokenizer {option_path}: no tokenizer can be loaded from it "
             f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}).")


@app.command("fold-llm")
def fold_llm_command(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face (or modelfold) model folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the folded model to.")],
    ratio: Annotated[float | None, typer.Option(help="Fraction of channels/heads removed.")]
    = None,
    target_sparsity: Annotated[float | None, typer.Option(
        help="Fraction of all parameters to remove (uniform ratio solved for).")] = None,
    recipe: Annotated[str | None, typer.Option(
        help="Preset name (llama-7b-paper) or JSON {part: {layer or 'a-b': ratio}}.")] = None,
    parts: Annotated[str, typer.Option(help="Comma-separated: mlp, attention.")] = "mlp",
    seed: Annotated[int | None, typer.Option(help="Clustering seed (default 0).")] = None,
    clusterer: Annotated[str, typer.Option(
        help="kmeans, hartigan (k-means + Hartigan moves: lower inertia), ward or activation "
             "(MLP channels clustered by their outputs on text the model generates itself)."
    )] = "kmeans",
    round_to: Annotated[int, typer.Option(
        help="Round kept MLP widths to multiples of this (8 or 64 for fast GPU kernels).")] = 1,
    allocation: Annotated[str, typer.Option(
        help="uniform (same MLP ratio in every layer), inertia (same parameter count spread "
             "over the layers by clustering distortion) or sensitivity (layers whose output "
             "error on self-generated text is over twice the median stay whole).")] = "uniform",
    repair: Annotated[str, typer.Option(
        help="none or self_generated (least-squares refit of the folded down projections on "
             "text the model generates itself; no external data).")] = "none",
    self_calibrated: Annotated[bool, typer.Option(
        "--self-calibrated", "--self-calibrate",
        help="The data-free recipe that survives on small LLMs: --clusterer activation "
             "--allocation sensitivity --repair self_generated.")] = False,
    stream: Annotated[bool, typer.Option(
        help="Fold layer by layer from the safetensors shards (bounded memory; with "
             "--self-calibrated the text is generated with the layers streamed too).")] = False,
    device: Annotated[str | None, typer.Option(help="Where to fold, e.g. cuda.")] = None,
    trust_factory: TrustFactory = False,
) -> None:
    """Fold a LLaMA / Qwen2 / Mistral model and save it as a Hugging Face folder."""
    import modelfold as mf
    from modelfold.llm.fold import PARTS, RECIPES
    from modelfold.record import get_llm_record

    if sum(x is not None for x in (ratio, target_sparsity, recipe)) != 1:
        fail("give exactly one of --ratio, --target-sparsity or --recipe.")
    _check_ratio("--ratio", ratio)
    _check_ratio("--target-sparsity", target_sparsity)
    plan: Any = recipe
    if recipe is not None and recipe.lstrip().startswith("{"):
        try:
            plan = json.loads(recipe)
        except (json.JSONDecodeError, RecursionError) as exc:
            fail(f"--recipe is not valid JSON ({exc}).")
    elif recipe is not None and recipe not in RECIPES:
        fail(f"--recipe {recipe!r} is neither a preset ({', '.join(RECIPES)}) nor JSON "
             "{part: {layer or 'a-b': ratio}}.")
    part_list = _split(parts)
    if not part_list or any(p not in PARTS for p in part_list):
        fail(f"--parts {parts!r} must be a comma-separated subset of {', '.join(PARTS)}.")
    if self_calibrated:
        clusterer, allocation, repair = "activation", "sensitivity", "self_generated"
    if repair not in ("none", "self_generated"):
        fail(f"--repair {repair!r}: LLM folding takes none or self_generated.")
    cfg = mf.LLMFoldConfig(ratio=ratio, target_sparsity=target_sparsity, recipe=plan,
                           parts=tuple(part_list), clusterer=clusterer, round_to=round_to,
                           allocation=allocation, repair=repair,
                           **({} if seed is None else {"seed": seed}))
    _check_device(device)
    if stream and model_dir.resolve() == out.resolve():
        fail("--out must differ from the model folder: --stream reads its shards while "
             "writing the folded ones.")
    check_llm_folder(model_dir, "fold-llm")
    if stream:
        from modelfold.llm.stream import fold_checkpoint

        _require_transformers()
        _quiet_transformers()
        record = fold_checkpoint(model_dir, out, config=cfg, device=device)
    else:
        model, tokenizer = load_llm(model_dir, trust_factory)
        with console.status("folding..."):
            folded = mf.fold(model, config=cfg, device=device)
        mf.save(folded, out, tokenizer=tokenizer)
        record = get_llm_record(folded)
        assert record is not None  # fold attaches it to every folded LLM
    console.print(f"parameters {record.params_before:,} -> {record.params_after:,} "
                  f"({1 - record.params_after / record.params_before:.1%} removed)")
    console.print(f"[green]wrote[/] {out}")


def _check_windows(windows: str) -> list[str]:
    specs = _split(windows)
    if not specs:
        fail("--windows names no window set; use all, head:N, tail:N or mid:N.")
    for spec in specs:
        name, _, count = spec.partition(":")
        if spec == "all":
            continue
        if name not in ("head", "tail", "mid") or not count.isdigit() or int(count) < 1:
            fail(f"--windows {spec!r}: use all, head:N, tail:N or mid:N (N >= 1).")
    return specs


@app.command("export-gguf")
def export_gguf_command(
    model_dir: Annotated[Path, typer.Argument(
        help="Folder written by `modelfold fold-llm` / `mf.save`, or a Hugging Face folder.")],
    out: Annotated[Path, typer.Argument(help="GGUF file to write.")],
    outtype: Annotated[str, typer.Option(help="Tensor type: f16, bf16, f32 or q8_0.")] = "f16",
    trust_factory: TrustFactory = False,
) -> None:
    """Write a (folded) Llama model and its tokenizer as a GGUF file for llama.cpp."""
    import modelfold as mf
    from modelfold.io.gguf import DTYPES

    if outtype not in DTYPES:
        fail(f"--outtype {outtype!r}: choose one of {', '.join(DTYPES)}.")
    check_llm_folder(model_dir, "export-gguf")
    model, tokenizer = load_llm(model_dir, trust_factory)
    if tokenizer is None:
        fail(f"no tokenizer in {model_dir}; GGUF files carry the vocabulary.")
    path = mf.export_gguf(model, tokenizer, out, dtype=outtype)
    console.print(f"wrote {path} ({outtype}, {path.stat().st_size / 2**20:.1f} MiB)")


@app.command("eval-ppl")
def eval_ppl(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face (or modelfold) model folder.")],
    text: Annotated[Path | None, typer.Option(
        help="UTF-8 text file (default: the Wikipedia text of the exllamav2 wheel).")] = None,
    wikitext2: Annotated[Path | None, typer.Option(
        help="WikiText-2 raw folder (wiki.test.raw) instead of --text.")] = None,
    tokenizer_dir: Annotated[Path | None, typer.Option(
        "--tokenizer", help="Tokenizer folder (default: the model folder).")] = None,
    seq_len: Annotated[int, typer.Option(help="Window length in tokens.")] = 512,
    windows: Annotated[str, typer.Option(
        help="Comma-separated window sets: all, head:N, tail:N, mid:N.")] = "tail:40",
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    trust_factory: TrustFactory = False,
) -> None:
    """Perplexity over non-overlapping windows (protocol in modelfold.eval.perplexity)."""
    from modelfold.errors import FoldError
    from modelfold.eval.perplexity import (
        load_wikitext2,
        make_windows,
        offline_wiki_text,
        perplexity,
        pick_windows,
        tokenize_text,
    )

    if text is not None and wikitext2 is not None:
        fail("give either --text or --wikitext2, not both.")
    _check_file("--text", text)
    if wikitext2 is not None and not (wikitext2.is_file() or (wikitext2 / "wiki.test.raw")
                                      .is_file()):
        fail(f"--wikitext2 {wikitext2}: neither wiki.test.raw nor a folder holding it.")
    _check_folder("--tokenizer", tokenizer_dir)
    _check_positive("--seq-len", seq_len, 2)
    _check_positive("--batch-size", batch_size)
    specs = _check_windows(windows)
    if text is None and wikitext2 is None:
        try:
            source = offline_wiki_text()
        except FileNotFoundError as exc:
            fail(f"give --text or --wikitext2: the default text is unavailable ({exc})")
    else:
        source = text
    check_llm_folder(model_dir, "eval-ppl")
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    model, own_tokenizer = load_llm(model_dir, trust_factory)
    tokenizer = tokenizer or own_tokenizer
    if tokenizer is None:
        fail(f"no tokenizer in {model_dir}; pass --tokenizer.")
    content = load_wikitext2(wikitext2) if wikitext2 is not None else Path(source).read_text(
        encoding="utf-8")
    try:
        stream = make_windows(tokenize_text(tokenizer, content), seq_len)
    except FoldError as exc:
        fail(f"{wikitext2 or source}: {exc} Lower --seq-len or give a longer text.")
    for spec in specs:
        chosen = pick_windows(stream, spec)
        ppl = perplexity(model, chosen, batch_size=batch_size)
        console.print(f"{spec}: perplexity {ppl:.4f} ({chosen.shape[0]} x {seq_len} tokens)")


@app.command("eval-zero-shot")
def eval_zero_shot(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face (or modelfold) model folder.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval task names.")],
    include_path: Annotated[Path | None, typer.Option(
        help="Folder of extra task YAML files (e.g. local datasets).")] = None,
    limit: Annotated[int | None, typer.Option(help="Documents per task (default all).")] = None,
    batch_size: Annotated[int, typer.Option(help="lm-eval batch size.")] = 1,
    trust_factory: TrustFactory = False,
) -> None:
    """Zero-shot accuracy through lm-eval on the (folded) model (needs modelfold[eval])."""
    import logging

    task_list = _split(tasks)
    if not task_list:
        fail("--tasks names no task; give comma-separated lm-eval task names.")
    _check_folder("--include-path", include_path)
    _check_positive("--limit", limit)
    _check_positive("--batch-size", batch_size)
    check_llm_folder(model_dir, "eval-zero-shot")
    from modelfold.eval.zero_shot import zero_shot

    model, tokenizer = load_llm(model_dir, trust_factory)
    if tokenizer is None:
        fail(f"no tokenizer in {model_dir}.")
    # lm-eval's notes and the Hub's download retries would bury the results (or the one error)
    for name in ("lm_eval", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with console.status("running lm-eval (datasets are downloaded on first use)..."):
        results = zero_shot(model, tokenizer, task_list, include_path=include_path, limit=limit,
                            batch_size=batch_size)
    for task, metrics in results.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
        console.print(f"{task}: {shown}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
