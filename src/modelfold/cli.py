"""Command line: `modelfold fold`, `modelfold summary`, `modelfold demo`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from modelfold.errors import FoldError

app = typer.Typer(
    help="Compress trained PyTorch models by folding (cluster -> merge), no data needed.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        _fail(f"--input-shape {text!r} must be comma-separated integers, e.g. 1,3,32,32.")
    if not shape or any(v <= 0 for v in shape):
        _fail(f"--input-shape {text!r} must contain positive integers.")
    return shape


def load_checkpoint(checkpoint: Path, model_name: str | None, model_kwargs: str | None):
    """A modelfold folder, or a weights file (.safetensors / .pt) plus --model."""
    import torch

    import modelfold as mf
    from modelfold.io.folder import build_from_factory, factory_spec
    from modelfold.record import FACTORY_ATTR
    from modelfold.zoo import MODEL_ZOO, create_model

    if checkpoint.is_dir():
        return mf.load(checkpoint)
    if not checkpoint.is_file():
        _fail(f"checkpoint {checkpoint} does not exist.")
    if model_name is None:
        _fail(f"{checkpoint} is a weights file: say which architecture with --model "
              f"(a zoo name: {', '.join(sorted(MODEL_ZOO))}; or 'package.module:callable').")
    try:
        kwargs = json.loads(model_kwargs) if model_kwargs else {}
    except json.JSONDecodeError as exc:
        _fail(f"--model-kwargs is not valid JSON ({exc}).")
    if model_name in MODEL_ZOO:
        model = create_model(model_name, **kwargs)
    else:
        model = build_from_factory(factory_spec(model_name, kwargs), checkpoint)
        setattr(model, FACTORY_ATTR, factory_spec(model_name, kwargs))
    try:
        if checkpoint.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(checkpoint))
        else:  # never unpickle arbitrary objects
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
        model.load_state_dict(state)
    except Exception as exc:
        _fail(f"cannot load weights from {checkpoint} into {model_name} "
              f"({type(exc).__name__}: {exc}).")
    return model.eval()


def load_calibration(source: str):
    """A tensor of inputs from a file, or 1,024 Fashion-MNIST training images."""
    import torch

    if source == "fashion-mnist":
        from modelfold.data import load_fashion_mnist

        images = load_fashion_mnist("train").tensors[0]
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:1024]
        return images[pick]
    path = Path(source)
    if not path.is_file():
        _fail(f"--calibration {source}: no such file (or use 'fashion-mnist').")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            data = tensors.get("inputs", next(iter(tensors.values()), None))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        _fail(f"--calibration {source}: cannot read a tensor ({type(exc).__name__}: {exc}).")
    if not isinstance(data, torch.Tensor):
        _fail(f"--calibration {source} must hold one tensor of inputs.")
    return data


@app.command()
def fold(
    checkpoint: Annotated[Path, typer.Argument(help="modelfold folder, or weights file "
                                               "(.safetensors/.pt) together with --model.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the folded model to.")],
    ratio: Annotated[float | None, typer.Option(help="Fraction of channels removed per group.")]
    = None,
    target_sparsity: Annotated[float | None, typer.Option(
        help="Fraction of parameters to remove (solves for the ratio).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="Architecture of a weights file: zoo name or 'package.module:callable'.")]
    = None,
    model_kwargs: Annotated[str | None, typer.Option(
        help='JSON keyword arguments for --model, e.g. \'{"width": 16}\'.')] = None,
    input_shape: Annotated[str, typer.Option(help="Example input shape for tracing.")]
    = "1,3,32,32",
    seed: Annotated[int | None, typer.Option(help="Clustering seed (default 0).")] = None,
    clusterer: Annotated[str | None, typer.Option(help="kmeans or ward (default kmeans).")]
    = None,
    config: Annotated[Path | None, typer.Option(help="FoldConfig JSON file (flags override).")]
    = None,
    repair: Annotated[str | None, typer.Option(
        help="none (Fold-Naive), data (Fold-R, needs --calibration), approx (Fold-AR, "
             "data-free) or deep_inversion (Fold-DIR) (default none).")] = None,
    calibration: Annotated[str | None, typer.Option(
        help="Calibration inputs for --repair data: a tensor file (.safetensors/.pt) or "
             "'fashion-mnist' (1,024 training images).")] = None,
    di_preset: Annotated[str | None, typer.Option(
        help="DeepInversion settings: paper or cpu (default paper).")] = None,
) -> None:
    """Fold a model and save the smaller model to --out."""
    import torch

    import modelfold as mf

    try:
        from dataclasses import asdict

        from modelfold.repair import DeepInversionConfig

        if ratio is not None and target_sparsity is not None:
            _fail("give either --ratio or --target-sparsity, not both.")
        data = mf.FoldConfig.from_json(config.read_text()).to_dict() if config else {}
        if ratio is not None:
            data.update(ratio=ratio, target_sparsity=None)
        if target_sparsity is not None:
            data.update(target_sparsity=target_sparsity, ratio=None)
        flags = {"seed": seed, "clusterer": clusterer, "repair": repair}
        data.update({k: v for k, v in flags.items() if v is not None})
        if di_preset is not None:
            data["deep_inversion"] = asdict(DeepInversionConfig.preset(di_preset))
        cfg = mf.FoldConfig.from_dict(data)
        calibration_data = load_calibration(calibration) if calibration else None
        base = load_checkpoint(checkpoint, model, model_kwargs)
        example = torch.zeros(_parse_shape(input_shape))
        with console.status("folding..."):
            folded = mf.fold(base, example, config=cfg, calibration=calibration_data)
        mf.save(folded, out)
        typer.echo(str(mf.summary(base, folded, example)))
        console.print(f"[green]saved[/] {out}")
    except FoldError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}")


@app.command()
def summary(
    folder: Annotated[Path, typer.Argument(help="Folder written by `modelfold fold`.")],
) -> None:
    """Print parameters, MACs and every channel group n -> k of a folded model."""
    import modelfold as mf

    try:
        folded = mf.load(folder)
        typer.echo(str(mf.summary(None, folded)))
    except FoldError as exc:
        _fail(str(exc))


@app.command()
def demo(
    width: Annotated[int, typer.Option(help="ResNet18 base width.")] = 16,
    epochs: Annotated[int, typer.Option(help="Training epochs when no cached model exists.")]
    = 2,
    out: Annotated[Path, typer.Option(help="Where the table and plot go.")]
    = Path("benchmarks/results"),
) -> None:
    """Train (or load cached) ResNet18 on Fashion-MNIST, fold it at several ratios, report."""
    from modelfold.demo import run_demo

    try:
        run_demo(width=width, epochs=epochs, out_dir=out)
    except (FoldError, FileNotFoundError) as exc:
        _fail(str(exc))


@app.command()
def sweep(
    preset: Annotated[str, typer.Option(help="quick (under 5 min) or paper-cnn.")] = "quick",
    out: Annotated[Path, typer.Option(help="Folder for CSV, markdown and PNG.")]
    = Path("benchmarks/results"),
    name: Annotated[str | None, typer.Option(help="File stem (default: sweep_<preset>).")]
    = None,
    methods: Annotated[str | None, typer.Option(
        help="Comma-separated method ids (default: the preset's).")] = None,
    ratios: Annotated[str | None, typer.Option(help="Comma-separated ratios.")] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated clustering seeds.")]
    = None,
) -> None:
    """Models x methods x ratios x seeds on Fashion-MNIST -> CSV, table, plots (resumable)."""
    import dataclasses

    from modelfold.eval.sweep import preset as get_preset
    from modelfold.eval.sweep import run_sweep

    try:
        cfg = dataclasses.replace(get_preset(preset))
        if methods:
            cfg.methods = [m.strip() for m in methods.split(",") if m.strip()]
        try:
            if ratios:
                cfg.ratios = [float(r) for r in ratios.split(",")]
            if seeds:
                cfg.seeds = [int(s) for s in seeds.split(",")]
        except ValueError:
            _fail("--ratios and --seeds take comma-separated numbers.")
        run_sweep(cfg, out, name or f"sweep_{preset.replace('-', '_')}",
                  log=lambda line: console.print(line))
        console.print(f"[green]wrote[/] {out}")
    except (FoldError, FileNotFoundError) as exc:
        _fail(str(exc))


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
