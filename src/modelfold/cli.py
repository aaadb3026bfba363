"""Command line: `modelfold fold`, `fold-llm`, `eval-ppl`, `summary`, `sweep`, `demo`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from modelfold.errors import FoldError

app = typer.Typer(
    help="Compress trained PyTorch models by folding (cluster -> merge), no data needed.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}")
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
        # the user named this factory on the command line: trusted
        model = build_from_factory(factory_spec(model_name, kwargs), checkpoint, trust=True)
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
    clusterer: Annotated[str | None, typer.Option(
        help="kmeans, hartigan or ward (default kmeans).")]
    = None,
    round_to: Annotated[int | None, typer.Option(
        help="Round kept channel counts to multiples of this (default 1).")] = None,
    allocation: Annotated[str | None, typer.Option(
        help="uniform (same ratio in every group) or inertia (same parameter count spread by "
             "clustering distortion) (default uniform).")] = None,
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
        flags = {"seed": seed, "clusterer": clusterer, "repair": repair, "round_to": round_to,
                 "allocation": allocation}
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
    ray: Annotated[str | None, typer.Option(
        "--ray", metavar="ADDRESS",
        help="Run the cells as Ray tasks: 'local' starts a local Ray instance (one CPU per "
             "core), anything else is a cluster address (e.g. auto, ray://head:10001). "
             "Needs pip install 'modelfold[ray]'.")] = None,
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
                  log=lambda line: console.print(line), ray=ray)
        console.print(f"[green]wrote[/] {out}")
    except (FoldError, FileNotFoundError) as exc:
        _fail(str(exc))


def load_llm(path: Path):
    """(model, tokenizer or None) from a modelfold or Hugging Face folder."""
    import modelfold as mf

    if not path.is_dir():
        _fail(f"{path} is not a folder holding a Hugging Face model (config.json + weights).")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        _fail("LLM commands need transformers: pip install 'modelfold[llm]'.")
    try:
        if (path / "modelfold.json").is_file():
            model = mf.load(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path).eval()
    except (OSError, ValueError) as exc:
        _fail(f"cannot load a causal LM from {path} ({type(exc).__name__}: {exc}).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


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
        help="The data-free recipe that survives on small LLMs: --clusterer activation "
             "--allocation sensitivity --repair self_generated.")] = False,
    stream: Annotated[bool, typer.Option(
        help="Fold layer by layer from the safetensors shards (bounded memory).")] = False,
    device: Annotated[str | None, typer.Option(help="Where to fold, e.g. cuda.")] = None,
) -> None:
    """Fold a LLaMA / Qwen2 / Mistral model and save it as a Hugging Face folder."""
    import modelfold as mf

    plan = recipe
    if recipe is not None and recipe.lstrip().startswith("{"):
        try:
            plan = json.loads(recipe)
        except json.JSONDecodeError as exc:
            _fail(f"--recipe is not valid JSON ({exc}).")
    part_list = [p.strip() for p in parts.split(",") if p.strip()]
    if sum(x is not None for x in (ratio, target_sparsity, recipe)) != 1:
        _fail("give exactly one of --ratio, --target-sparsity or --recipe.")
    if self_calibrated:
        clusterer, allocation, repair = "activation", "sensitivity", "self_generated"
    try:  # clustering settings only: the budget comes from the flags above
        cfg = mf.FoldConfig(ratio=0.0, clusterer=clusterer, round_to=round_to,
                            allocation=allocation, repair=repair)
    except FoldError as exc:
        _fail(str(exc))
    if stream:
        from modelfold.llm.stream import fold_checkpoint

        try:
            record = fold_checkpoint(model_dir, out, ratio=ratio, target_sparsity=target_sparsity,
                                     recipe=plan, parts=part_list, config=cfg, seed=seed,
                                     device=device)
        except (FoldError, OSError) as exc:
            _fail(str(exc))
    else:
        model, tokenizer = load_llm(model_dir)
        try:
            folded = mf.fold(model, ratio=ratio, target_sparsity=target_sparsity, recipe=plan,
                             parts=part_list, config=cfg, seed=seed, device=device)
            mf.save(folded, out, tokenizer=tokenizer)
        except FoldError as exc:
            _fail(str(exc))
        record = folded._modelfold_llm_record
    console.print(f"parameters {record['params_before']:,} -> {record['params_after']:,} "
                  f"({1 - record['params_after'] / record['params_before']:.1%} removed)")
    console.print(f"[green]wrote[/] {out}")


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
) -> None:
    """Perplexity over non-overlapping windows (protocol in modelfold.eval.perplexity)."""
    from modelfold.eval.perplexity import (
        load_wikitext2,
        make_windows,
        offline_wiki_text,
        perplexity,
        pick_windows,
        tokenize_text,
    )

    model, tokenizer = load_llm(model_dir)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer is None:
        _fail(f"no tokenizer in {model_dir}; pass --tokenizer.")
    try:
        if wikitext2 is not None:
            content = load_wikitext2(wikitext2)
        else:
            source = text if text is not None else offline_wiki_text()
            if not Path(source).is_file():
                _fail(f"--text {source}: no such file.")
            content = Path(source).read_text(encoding="utf-8")
        stream = make_windows(tokenize_text(tokenizer, content), seq_len)
        for spec in [w.strip() for w in windows.split(",") if w.strip()]:
            chosen = pick_windows(stream, spec)
            ppl = perplexity(model, chosen, batch_size=batch_size)
            console.print(f"{spec}: perplexity {ppl:.4f} ({chosen.shape[0]} x {seq_len} tokens)")
    except (FoldError, FileNotFoundError) as exc:
        _fail(str(exc))


@app.command("eval-zero-shot")
def eval_zero_shot(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face (or modelfold) model folder.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval task names.")],
    include_path: Annotated[Path | None, typer.Option(
        help="Folder of extra task YAML files (e.g. local datasets).")] = None,
    limit: Annotated[int | None, typer.Option(help="Documents per task (default all).")] = None,
    batch_size: Annotated[int, typer.Option(help="lm-eval batch size.")] = 1,
) -> None:
    """Zero-shot accuracy through lm-eval on the (folded) model (needs modelfold[eval])."""
    from modelfold.eval.zero_shot import zero_shot

    model, tokenizer = load_llm(model_dir)
    if tokenizer is None:
        _fail(f"no tokenizer in {model_dir}.")
    try:
        results = zero_shot(model, tokenizer, [t.strip() for t in tasks.split(",") if t.strip()],
                            include_path=include_path, limit=limit, batch_size=batch_size)
    except FoldError as exc:
        _fail(str(exc))
    for task, metrics in results.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
        console.print(f"{task}: {shown}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
