"""The catalogue of bad inputs: each raises `FoldError` naming the culprit and the fix (or, on
the command line, one clean line with exit code 2), and the guarantees that nothing is lost.

Every row of CASES is one bad input; the README's reliability section counts them.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import modelfold as mf
from conftest import make_model
from forge import edit_manifest
from modelfold.cli import app
from modelfold.io.folder import WEIGHTS

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def lenet() -> nn.Module:
    return make_model("lenet5")


def with_tensor(name: str, value: float) -> nn.Module:
    model = lenet()
    with torch.no_grad():
        model.get_parameter(name).view(-1)[0] = value
    return model


class Branchy(nn.Module):
    """Data-dependent control flow: `c` only runs for inputs with a negative sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 2), nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) if x.sum() > 0 else self.c(h)


class Reused(nn.Module):
    """One Linear applied twice in a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.c(torch.relu(self.a(torch.relu(self.a(self.b(x))))))


class TiedEmbedding(nn.Module):
    """Embedding and output layer share one matrix (as LMs tie embed_tokens and lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight
        self.mix = nn.Linear(20, 20)

    def forward(self, ids):
        return self.mix(self.head(torch.relu(self.hidden(self.embed(ids)))))


def meta_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8, device="meta"), nn.ReLU(), nn.Linear(8, 2))


def int_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].weight = nn.Parameter(torch.zeros(8, 4, dtype=torch.int8), requires_grad=False)
    return model


def fold(model: nn.Module, x=X, **kw) -> Callable[[], object]:
    return lambda: mf.fold(model, x, **kw)


def load_after(tmp_path, damage: Callable) -> Callable[[], object]:
    """Save a folded LeNet, damage the folder, return the load call."""
    folder = tmp_path / "saved"
    mf.save(mf.fold(lenet(), X, ratio=0.5), folder, factory="modelfold.zoo:create_model",
            factory_kwargs={"name": "lenet5", "width": 6})
    damage(folder)
    return lambda: mf.load(folder)


def _truncate(folder) -> None:
    path = folder / WEIGHTS
    path.write_bytes(path.read_bytes()[:100])


def _flip_byte(folder) -> None:
    path = folder / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same length, one value changed
    path.write_bytes(bytes(data))


def _save_under_a_file(tmp_path) -> Callable[[], object]:
    (tmp_path / "file").write_text("x")
    return lambda: mf.save(lenet(), tmp_path / "file" / "sub" / "out")


def _save_over_foreign(tmp_path) -> Callable[[], object]:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    return lambda: mf.save(lenet(), tmp_path / "mine")


def _sweep_with(tmp_path, **changes) -> object:
    import dataclasses

    sweep = mf_sweep()
    return sweep.run_sweep(dataclasses.replace(sweep.preset("quick"), **changes), tmp_path)


def _summary_after(tmp_path, edit: Callable) -> Callable[[], object]:
    """Save a folded LeNet, edit its fold record (re-signed), return the summary call."""
    folder = tmp_path / "recorded"
    mf.save(mf.fold(lenet(), X, ratio=0.5), folder)
    edit_manifest(folder, lambda m: edit(m["record"]))
    loaded = mf.load(folder)
    return lambda: mf.summary(None, loaded)


def _tiny_llm():
    from test_llm import tiny

    return tiny("llama")


# (case id, builder taking tmp_path and returning the failing call, regex the message must match)
CASES: list[tuple[str, Callable, str]] = [
    ("ratio-string", lambda t: fold(lenet(), ratio="0.5"), r"`ratio` must be a number"),
    ("ratio-bool", lambda t: fold(lenet(), ratio=True), r"`ratio` must be a number"),
    ("ratio-one", lambda t: fold(lenet(), ratio=1.0), r"`ratio` must lie in \[0, 1\)"),
    ("ratio-negative", lambda t: fold(lenet(), ratio=-0.1), r"`ratio` must lie in \[0, 1\)"),
    ("ratio-nan", lambda t: fold(lenet(), ratio=float("nan")), r"`ratio` must lie"),
    ("no-ratio", lambda t: fold(lenet()), r"give `ratio`"),
    ("ratio-and-target", lambda t: fold(lenet(), ratio=0.5, target_sparsity=0.5),
     r"exactly one of .*\(got `ratio` and `target_sparsity`\)"),
    ("target-unreachable", lambda t: fold(nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
                                                        nn.Linear(8, 100)).eval(),
                                          torch.randn(2, 4), target_sparsity=0.9),
     r"target_sparsity=0\.9 is unreachable"),
    ("module-ratio-unknown-module", lambda t: fold(lenet(), ratio=0.5,
                                                   module_ratios={"nope": 0.5}), "'nope'"),
    ("module-ratio-out-of-range", lambda t: fold(lenet(), ratio=0.5,
                                                 module_ratios={"conv1": 1.5}), "conv1"),
    ("nan-weights", lambda t: fold(with_tensor("conv1.weight", float("nan")), ratio=0.5),
     r"conv1\.weight.*NaN"),
    ("inf-weights", lambda t: fold(with_tensor("fc1.bias", float("inf")), ratio=0.5),
     r"fc1\.bias.*Inf"),
    ("meta-device", lambda t: fold(meta_model(), torch.randn(2, 4), ratio=0.5), "meta device"),
    ("quantized-weights", lambda t: fold(int_model(), torch.randn(2, 4), ratio=0.5),
     r"0\.weight.*int8.*quantize"),
    ("unfoldable-op", lambda t: fold(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(),
                                                   nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                                                   nn.Conv2d(8, 4, 1)).eval(), ratio=0.5),
     r"'2'.*ignored="),
    ("data-dependent-branch", lambda t: fold(Branchy().eval(), torch.ones(2, 8), ratio=0.5),
     r"\['c'\] did not run.*ignored="),
    ("module-used-twice", lambda t: fold(Reused().eval(), torch.randn(2, 8), ratio=0.5),
     r"'a' runs 2 times.*ignored=\[model\.a\]"),
    ("tied-embedding-head", lambda t: fold(TiedEmbedding().eval(),
                                           torch.randint(0, 20, (2, 5)), ratio=0.5),
     r"tied weights: embed\.weight and head\.weight"),
    ("example-does-not-fit", lambda t: fold(lenet(), torch.randn(2, 5), ratio=0.5),
     "does not run on `example_inputs`"),
    ("example-wrong-type", lambda t: fold(lenet(), "images", ratio=0.5),
     "`example_inputs` must be a tensor"),
    ("example-missing", lambda t: fold(lenet(), None, ratio=0.5), "`example_inputs` is required"),
    ("not-a-module", lambda t: fold("model", ratio=0.5), r"torch\.nn\.Module"),
    ("ignored-foreign-module", lambda t: fold(lenet(), ratio=0.5, ignored=[nn.Linear(2, 2)]),
     "not part of the model"),
    ("repair-unknown", lambda t: fold(lenet(), ratio=0.5, repair="magic"), "'magic' is unknown"),
    ("repair-data-without-data", lambda t: fold(lenet(), ratio=0.5, repair="data"),
     "needs `calibration=`"),
    ("repair-data-wrong-shape", lambda t: fold(lenet(), ratio=0.5, repair="data",
                                               calibration=torch.randn(8, 1, 28, 28)),
     "calibration data does not fit"),
    ("device-invalid", lambda t: fold(lenet(), ratio=0.5, device="gpu9"),
     "not a valid torch device"),
    ("load-missing-folder", lambda t: lambda: mf.load(t / "nothing"), "not a folder"),
    ("load-missing-manifest", lambda t: load_after(t, lambda f: (f / "modelfold.json").unlink()),
     "modelfold.json is missing"),
    ("load-truncated-weights", lambda t: load_after(t, _truncate), "checksum"),
    ("load-tampered-weights", lambda t: load_after(t, _flip_byte), "checksum"),
    ("load-missing-weights", lambda t: load_after(t, lambda f: (f / WEIGHTS).unlink()),
     "is missing"),
    ("load-version-mismatch", lambda t: load_after(t, lambda f: edit_manifest(
        f, lambda m: m.update(format_version=99))), "format version 99"),
    ("load-shape-mismatch", lambda t: load_after(t, lambda f: edit_manifest(
        f, lambda m: m["tensors"]["conv1.weight"].update(shape=[5, 3, 5, 5]))), "conv1"),
    ("load-edited-manifest", lambda t: load_after(t, lambda f: edit_manifest(
        f, lambda m: m["tensors"]["conv1.weight"].update(shape=[5, 3, 5, 5]), resign=False)),
     "manifest was modified"),
    ("summary-huge-recorded-input", lambda t: _summary_after(t, lambda r: r["input_spec"].update(
        shape=[1 << 20, 1 << 20, 1 << 20])), "too many to count MACs"),
    ("summary-recorded-input-does-not-fit", lambda t: _summary_after(
        t, lambda r: r["input_spec"].update(shape=[0, 3, 32, 32])),
     r"the example input recorded with it \(.*\[0,3,32,32\]\}\) holds no elements"),
    ("save-unwritable", lambda t: _save_under_a_file(t), "cannot write"),
    ("save-over-foreign-folder", lambda t: _save_over_foreign(t), "refusing"),
    ("sweep-unknown-method", lambda t: lambda: _sweep_with(t, methods=["magic"]),
     "unknown method 'magic'"),
    ("sweep-unknown-preset", lambda t: lambda: mf_sweep().preset("huge"),
     "unknown sweep preset 'huge'"),
    ("sp-bad-norm", lambda t: lambda: mf_baselines().magnitude_prune(lenet(), X, ratio=0.5, p=3),
     "p must be 1 or 2"),
    ("neuron-merging-threshold", lambda t: lambda: mf_baselines().neuron_merging(
        lenet(), X, ratio=0.5, threshold=2.0), "threshold"),
    ("llm-pruning-unknown-method", lambda t: lambda: mf_baselines().prune_llm(
        _tiny_llm(), method="magic", ratio=0.2), "magic"),
    ("llm-unknown-recipe", lambda t: lambda: mf.fold(_tiny_llm(), recipe="llama-70b"),
     "unknown recipe 'llama-70b'"),
    ("llm-unknown-part", lambda t: lambda: mf.fold(_tiny_llm(), ratio=0.2, parts=("ffn",)),
     "`parts` must be"),
    ("llm-unreachable-target", lambda t: lambda: mf.fold(_tiny_llm(), target_sparsity=0.95),
     "not reachable"),
    ("llm-unsupported-family", lambda t: lambda: mf.fold(_gpt2()), "supported"),
]


def mf_sweep():
    import experiments.sweep as sweep

    return sweep


def mf_baselines():
    import modelfold.baselines as baselines

    return baselines


def _gpt2():
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_fold_error_naming_the_culprit(case, tmp_path):
    _, build, pattern = case
    call = build(tmp_path)
    with pytest.raises(mf.FoldError, match=pattern):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_gpu_requested_without_one():
    with pytest.raises(mf.FoldError, match="no CUDA GPU"):
        mf.fold(lenet(), X, ratio=0.5, device="cuda")


def test_escape_hatches_named_in_the_errors_work():
    branchy, reused = Branchy().eval(), Reused().eval()
    out = mf.fold(branchy, torch.ones(2, 8), ratio=0.5, ignored=[branchy.c, branchy.b])
    assert out(torch.ones(2, 8)).shape == (2, 2)
    out = mf.fold(reused, torch.randn(2, 8), ratio=0.5, ignored=[reused.a])
    x = torch.randn(3, 8)
    assert torch.equal(out(x), reused(x))  # every group touches `a`: nothing was folded


def test_k_is_never_zero():
    # n (1 - ratio) rounds to 0 for every group here; the paper's rule keeps one channel
    model = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 3)).eval()
    out = mf.fold(model, torch.randn(2, 4), ratio=0.9)
    assert out[0].out_features == 1


runner = CliRunner()
CLI_CASES = [
    ["fold", "{t}/missing", "--ratio", "0.5", "--out", "{t}/o"],
    ["fold", "{t}", "--ratio", "1.5", "--out", "{t}/o"],
    ["fold", "{t}/junk.pt", "--ratio", "0.5", "--out", "{t}/o"],
    ["summary", "{t}/missing"],
    ["sweep", "--preset", "huge", "--out", "{t}/o"],
    ["sweep", "--preset", "quick", "--methods", "magic", "--out", "{t}/o"],
    ["sweep", "--preset", "quick", "--ratios", "half", "--out", "{t}/o"],
    ["eval-ppl", "{t}/missing", "--text", "{t}/none.txt"],
    ["fold-llm", "{t}/missing", "--ratio", "0.2", "--out", "{t}/o"],
]


@pytest.mark.parametrize("args", CLI_CASES, ids=[" ".join(a[:3]) for a in CLI_CASES])
def test_cli_errors_are_one_clean_line_with_exit_code_2(args, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    result = runner.invoke(app, [a.format(t=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "error" in result.output.lower()


# --- guarantees ---------------------------------------------------------------------------

def test_input_model_is_byte_identical_after_fold_and_every_baseline():
    from modelfold.baselines import ifm, inn, intra_fusion, magnitude_prune, neuron_merging

    model = make_model("resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: mf.fold(model, X, ratio=0.5, repair="approx"),
                 lambda: mf.fold(model, X, ratio=0.5, repair="data", calibration=X),
                 lambda: magnitude_prune(model, X, ratio=0.5, reset_bn=X),
                 lambda: ifm(model, X, ratio=0.5), lambda: inn(model, X, ratio=0.5),
                 lambda: neuron_merging(model, X, ratio=0.5),
                 lambda: intra_fusion(model, X, ratio=0.5)):
        call()
        assert model.training
        state = model.state_dict()
        assert state.keys() == before.keys()
        for key, value in before.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


def test_interrupted_save_leaves_the_old_folder_intact(tmp_path, monkeypatch):
    import modelfold.io.folder as folder

    kwargs = {"factory": "modelfold.zoo:create_model", "factory_kwargs": {"name": "lenet5"}}
    first = mf.fold(lenet(), X, ratio=0.5)
    mf.save(first, tmp_path / "f", **kwargs)

    def crash(model, filename, **_):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt  # the user pressed Ctrl-C half way

    monkeypatch.setattr(folder, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        mf.save(mf.fold(lenet(), X, ratio=0.25), tmp_path / "f", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # no temporary leftovers
    assert torch.equal(mf.load(tmp_path / "f")(X), first(X))


def test_same_seed_same_weights_different_seed_may_differ():
    model = make_model("vgg11_bn")
    a, b = (mf.fold(model, X, ratio=0.5, seed=3) for _ in range(2))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_frozen_models_fold_like_trainable_ones():
    model = make_model("resnet18")
    frozen = make_model("resnet18").requires_grad_(False)
    a, b = mf.fold(model, X, ratio=0.5), mf.fold(frozen, X, ratio=0.5)
    assert sum(p.numel() for p in b.parameters()) == sum(p.numel() for p in a.parameters())
    assert torch.equal(a(X), b(X))
    assert not any(p.requires_grad for p in frozen.parameters())  # restored


def test_batch_of_one_example_traces_once():
    # Torch-Pruning's model(*x) would run a batch of one as an unbatched image first
    model = lenet()
    folded = mf.fold(model, X[:1], ratio=0.5)
    assert folded(X).shape == model(X).shape
