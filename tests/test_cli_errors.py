"""Every command fails like a command line tool should: one line on stderr ("error: ..."), exit
code 2, no traceback, naming the option or file at fault, and never Python-API advice.

CASES holds at least one bad input for every registered command (checked against the app, so
a new command without a case fails here), then the help output and the `--trust-factory` flag.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

import modelfold as mf
from conftest import make_model
from forge import edit_manifest, resign_hf
from modelfold.cli import app
from test_bad_inputs import Branchy

runner = CliRunner()
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
SRC = Path(__file__).parent.parent / "src"
# Python-API wording that must never reach a command line user
API_ADVICE = ("Traceback", "trust_factory=", "calibration=", "DataLoader", "model=", "ignored=",
              "example_inputs", "factory=", "=`", "register_factory", "modelfold.fold",
              "include_path=")
HAS_CUDA = torch.cuda.is_available()




def build_user_net() -> nn.Module:
    """An importable factory that is neither the zoo nor registered: loading needs trust."""
    return make_model("lenet5")


# --- fabricated folders ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    cnn = root / "cnn"
    mf.save(mf.fold(make_model("lenet5"), X, ratio=0.5), cnn)
    save_file(make_model("lenet5").state_dict(), str(root / "lenet.safetensors"))
    torch.save(Branchy().state_dict(), root / "branchy.pt")
    out = {"root": root, "cnn": cnn, "weights": root / "lenet.safetensors",
           "branchy": root / "branchy.pt"}
    transformers = pytest.importorskip("transformers")
    from test_llm import tiny
    from test_llm_eval import _tokenizer

    text = " ".join(f"w{i % 40} w{i % 7}" for i in range(300))
    (root / "text.txt").write_text(text)
    tokenizer = _tokenizer(text)
    hf = root / "hf"  # plain save_pretrained folder
    tiny(vocab_size=64).save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    llm = root / "llm"  # modelfold's Hugging Face folder (checksummed)
    mf.save(tiny(vocab_size=64), llm, tokenizer=tokenizer)
    assert isinstance(transformers.AutoConfig.from_pretrained(hf), transformers.LlamaConfig)
    out.update(hf=hf, llm=llm, text=root / "text.txt")
    return out


def copy_of(folder: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(folder, dest)
    return dest


def damaged(f: dict, t: Path, edit: Callable[[dict], object], name: str = "cnn") -> Path:
    folder = copy_of(f[name], t / f"damaged-{name}")
    edit_manifest(folder, edit)
    return folder


def hostile(f: dict, t: Path) -> Path:
    marker = t / "marker"
    return damaged(f, t, lambda m: m.update(
        factory={"target": "os:system", "kwargs": {"command": f"touch {marker}"}}))


def huge_tensor_missing_from_file(f: dict, t: Path) -> Path:
    folder = copy_of(f["cnn"], t / "huge")
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    del state["conv1.weight"]
    save_file(state, str(weights))
    edit_manifest(folder, lambda m: m["tensors"]["conv1.weight"].update(shape=[1 << 40, 3, 5, 5]))
    return folder


def deep_manifest(f: dict, t: Path) -> Path:
    folder = copy_of(f["cnn"], t / "deep")
    (folder / "modelfold.json").write_text("[" * 100_000 + "]" * 100_000)
    return folder


def hf_config(f: dict, t: Path, damage: Callable[[Path], object], name: str = "llm") -> Path:
    folder = copy_of(f[name], t / f"config-{name}")
    if name == "llm":
        resign_hf(folder, damage)
    else:
        damage(folder)
    return folder


def truncate_config(folder: Path) -> None:
    config = folder / "config.json"
    config.write_text(config.read_text()[:40])


def full_disk_weights(mp: pytest.MonkeyPatch) -> None:
    import modelfold.io.folder as folder

    def full(*_, **__):
        raise SafetensorError("No space left on device (os error 28)")

    mp.setattr(folder, "save_model", full)


def full_disk_manifest(mp: pytest.MonkeyPatch) -> None:
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "modelfold.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    mp.setattr(Path, "write_text", full)


def full_disk_hf(mp: pytest.MonkeyPatch) -> None:
    import transformers

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr(transformers.PreTrainedModel, "save_pretrained", full)


def offline_task(t: Path) -> Path:
    """An lm-eval task whose dataset lives on the Hugging Face Hub."""
    (t / "tasks").mkdir()
    (t / "tasks" / "hub_choice.yaml").write_text("""task: hub_choice
dataset_path: modelfold-tests/not-downloadable
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    return t / "tasks"


def offline(mp: pytest.MonkeyPatch) -> None:
    """No internet: the Hub refuses every download at once (as without a network)."""
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- the bad inputs --------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    args: Callable[[Path, dict], list]  # (tmp_path, folders) -> command line
    mentions: tuple[str, ...]  # the message must name these (option, file, value)
    patch: Callable[[pytest.MonkeyPatch], object] | None = None
    skip: str | None = None

    @property
    def command(self) -> str:
        return self.id.split(":")[0]


def fold_weights(kwargs: str | None, model: str = "lenet5") -> Callable:
    extra = ["--model-kwargs", kwargs] if kwargs is not None else []
    return lambda t, f: ["fold", f["weights"], "--model", model, *extra, "--ratio", "0.5",
                         "--out", t / "o"]


ABSENT = "absent-model"
CASES = [
    # fold
    Case("fold:model-kwargs-unknown-key", fold_weights('{"bogus": 4}'),
         ("--model-kwargs", "bogus")),
    Case("fold:model-kwargs-not-an-object", fold_weights("[1]"),
         ("--model-kwargs", "JSON object")),
    Case("fold:model-kwargs-invalid-json", fold_weights("{width: 8"), ("--model-kwargs", "JSON")),
    Case("fold:model-kwargs-bad-value", fold_weights('{"width": -1}'), ("--model-kwargs",)),
    Case("fold:unknown-model", fold_weights(None, model="nosuchnet"),
         ("--model", "nosuchnet", "lenet5", "resnet18", "vit_tiny")),
    Case("fold:weights-of-another-width", fold_weights('{"width": 8}'),
         ("lenet.safetensors", "conv1.weight", "--model-kwargs")),
    Case("fold:missing-checkpoint", lambda t, f: ["fold", t / "nothing", "--ratio", "0.5",
                                                  "--out", t / "o"], ("nothing",)),
    Case("fold:junk-weights", lambda t, f: ["fold", f["root"] / "text.txt", "--model", "lenet5",
                                            "--ratio", "0.5", "--out", t / "o"], ("text.txt",)),
    Case("fold:round-to-not-a-number", lambda t, f: ["fold", f["cnn"], "--ratio", "0.5",
                                                     "--round-to", "fast", "--out", t / "o"],
         ("--round-to", "auto")),
    Case("fold:ratio-out-of-range", lambda t, f: ["fold", f["cnn"], "--ratio", "1.5", "--out",
                                                  t / "o"], ("--ratio",)),
    Case("fold:ratio-and-target", lambda t, f: ["fold", f["cnn"], "--ratio", "0.5",
                                                "--target-sparsity", "0.5", "--out", t / "o"],
         ("--ratio", "--target-sparsity")),
    Case("fold:target-macs-and-target-sparsity",
         lambda t, f: ["fold", f["cnn"], "--target-macs", "0.3", "--target-sparsity", "0.5",
                       "--out", t / "o"], ("--target-macs", "--target-sparsity")),
    Case("fold:target-macs-out-of-range", lambda t, f: ["fold", f["cnn"], "--target-macs", "1",
                                                        "--out", t / "o"], ("--target-macs",)),
    Case("fold:target-memory-not-positive", lambda t, f: ["fold", f["cnn"], "--target-memory",
                                                          "0", "--out", t / "o"],
         ("--target-memory",)),
    Case("fold:target-memory-and-ratio", lambda t, f: ["fold", f["cnn"], "--target-memory",
                                                       "1000", "--ratio", "0.5", "--out",
                                                       t / "o"], ("--target-memory", "--ratio")),
    Case("fold:bad-input-shape", lambda t, f: ["fold", f["cnn"], "--ratio", "0.5",
                                               "--input-shape", "1,x", "--out", t / "o"],
         ("--input-shape",)),
    Case("fold:input-shape-does-not-fit", lambda t, f: ["fold", f["cnn"], "--ratio", "0.5",
                                                        "--input-shape", "2,5", "--out",
                                                        t / "o"], ("--input-shape",)),
    Case("fold:untrusted-factory", lambda t, f: ["fold", hostile(f, t), "--ratio", "0.5",
                                                 "--out", t / "o"],
         ("--trust-factory", "os:system")),
    Case("fold:repair-data-without-calibration",
         lambda t, f: ["fold", f["cnn"], "--ratio", "0.5", "--repair", "data", "--out", t / "o"],
         ("--calibration", "--repair")),
    Case("fold:unknown-repair", lambda t, f: ["fold", f["cnn"], "--ratio", "0.5", "--repair",
                                              "magic", "--out", t / "o"], ("--repair", "magic")),
    Case("fold:missing-calibration-file",
         lambda t, f: ["fold", f["cnn"], "--ratio", "0.5", "--repair", "data", "--calibration",
                       t / "calib.pt", "--out", t / "o"], ("--calibration", "calib.pt")),
    Case("fold:config-not-json", lambda t, f: [
        "fold", f["cnn"], "--config", f["root"] / "text.txt", "--out", t / "o"],
         ("--config", "text.txt")),
    Case("fold:unknown-deep-inversion-preset", lambda t, f: [
        "fold", f["cnn"], "--ratio", "0.5", "--di-preset", "gpu", "--out", t / "o"],
         ("--di-preset", "gpu")),
    Case("fold:missing-config", lambda t, f: ["fold", f["cnn"], "--config", t / "cfg.json",
                                              "--out", t / "o"], ("--config", "cfg.json")),
    Case("fold:module-that-never-runs", lambda t, f: [
        "fold", f["branchy"], "--model", "test_bad_inputs:Branchy", "--input-shape", "2,8",
        "--ratio", "0.5", "--out", t / "o"], ("--ignore b", "--input-shape")),
    Case("fold:unknown-ignored-module", lambda t, f: [
        "fold", f["cnn"], "--ratio", "0.5", "--ignore", "conv9", "--out", t / "o"],
         ("--ignore", "conv9")),
    Case("fold:full-disk-weights", lambda t, f: ["fold", f["cnn"], "--ratio", "0.5", "--out",
                                                 t / "o"], ("No space left", "model.safetensors"),
         patch=full_disk_weights),
    Case("fold:full-disk-manifest", lambda t, f: ["fold", f["cnn"], "--ratio", "0.5", "--out",
                                                  t / "o"], ("No space left",),
         patch=full_disk_manifest),
    # summary
    Case("summary:missing-folder", lambda t, f: ["summary", t / "nothing"], ("nothing",)),
    Case("summary:negative-shape", lambda t, f: ["summary", damaged(f, t, lambda m: m["tensors"][
        "conv1.weight"].update(shape=[-3, 3, 5, 5]))], ("modelfold.json", "conv1.weight")),
    Case("summary:huge-shape", lambda t, f: ["summary", huge_tensor_missing_from_file(f, t)],
         ("conv1",)),
    Case("summary:huge-attribute", lambda t, f: ["summary", damaged(f, t, lambda m: m[
        "module_attrs"].setdefault("conv1", {}).update(out_channels=1 << 40))], ("conv1",)),
    Case("summary:huge-example-input", lambda t, f: ["summary", damaged(f, t, lambda m: m[
        "record"]["input_spec"].update(shape=[1 << 20, 1 << 20, 1 << 20]))], ("input",)),
    Case("summary:empty-example-batch", lambda t, f: ["summary", damaged(f, t, lambda m: m[
        "record"]["input_spec"].update(shape=[0, 3, 32, 32]))], ("input",)),
    Case("summary:example-input-of-no-tensors", lambda t, f: ["summary", damaged(
        f, t, lambda m: m["record"].update(input_spec={"dict": {}}))], ("input",)),
    Case("summary:example-input-of-bools", lambda t, f: ["summary", damaged(f, t, lambda m: m[
        "record"]["input_spec"].update(dtype="bool"))], ("input",)),
    Case("summary:record-parameter-count", lambda t, f: ["summary", damaged(f, t, lambda m: m[
        "record"].update(params_after=7))], ("record",)),
    Case("summary:record-negative-count", lambda t, f: ["summary", damaged(f, t, lambda m: m[
        "record"]["groups"][0].update(n=-5))], ("record/groups/0/n",)),
    Case("summary:deeply-nested-manifest", lambda t, f: ["summary", deep_manifest(f, t)],
         ("modelfold.json", "nested")),
    Case("summary:deeply-nested-factory-arguments", lambda t, f: ["summary", damaged(
        f, t, lambda m: m["factory"]["kwargs"].update(x=json.loads("[" * 900 + "]" * 900)))],
         ("modelfold.zoo:create_model",)),
    Case("summary:untrusted-factory", lambda t, f: ["summary", hostile(f, t)],
         ("--trust-factory", "os:system")),
    Case("summary:hf-truncated-config", lambda t, f: ["summary", hf_config(f, t,
                                                                          truncate_config)],
         ("config.json",)),
    Case("summary:hf-missing-config", lambda t, f: ["summary", hf_config(
        f, t, lambda d: (d / "config.json").unlink())], ("config.json",)),
    Case("summary:plain-hf-folder", lambda t, f: ["summary", f["hf"]], ("modelfold.json",)),
    # demo
    Case("demo:negative-width", lambda t, f: ["demo", "--width", "-1", "--out", t / "o"],
         ("--width", "-1")),
    Case("demo:zero-epochs", lambda t, f: ["demo", "--epochs", "0", "--out", t / "o"],
         ("--epochs",)),
    # sweep
    Case("sweep:unknown-preset", lambda t, f: ["sweep", "--preset", "huge", "--out", t / "o"],
         ("--preset", "huge", "beyond-cnn", "quick")),
    Case("sweep:bad-ratios", lambda t, f: ["sweep", "--ratios", "half", "--out", t / "o"],
         ("--ratios", "half")),
    Case("sweep:unknown-method", lambda t, f: ["sweep", "--methods", "magic", "--out", t / "o"],
         ("--methods", "magic")),
    # fold-llm: the options are checked before the model folder is even looked at
    Case("fold-llm:cuda-without-a-gpu", lambda t, f: [
        "fold-llm", t / ABSENT, "--ratio", "0.2", "--device", "cuda", "--out", t / "o"],
         ("--device", "cuda"), skip="a CUDA GPU is available" if HAS_CUDA else None),
    Case("fold-llm:bogus-device", lambda t, f: [
        "fold-llm", t / ABSENT, "--ratio", "0.2", "--device", "bogus", "--out", t / "o"],
         ("--device", "bogus")),
    Case("fold-llm:ratio-out-of-range", lambda t, f: [
        "fold-llm", t / ABSENT, "--ratio", "1.5", "--out", t / "o"], ("--ratio", "1.5")),
    Case("fold-llm:no-budget", lambda t, f: ["fold-llm", t / ABSENT, "--out", t / "o"],
         ("--ratio", "--target-sparsity", "--recipe")),
    Case("fold-llm:unknown-part", lambda t, f: [
        "fold-llm", t / ABSENT, "--ratio", "0.2", "--parts", "ffn", "--out", t / "o"],
         ("--parts", "ffn")),
    Case("fold-llm:unknown-recipe", lambda t, f: [
        "fold-llm", t / ABSENT, "--recipe", "llama-70b", "--out", t / "o"],
         ("--recipe", "llama-70b", "llama-7b-paper")),
    Case("fold-llm:recipe-not-json", lambda t, f: [
        "fold-llm", t / ABSENT, "--recipe", "{mlp: 1", "--out", t / "o"], ("--recipe", "JSON")),
    Case("fold-llm:stream-into-itself", lambda t, f: [
        "fold-llm", t / ABSENT, "--ratio", "0.2", "--stream", "--out", t / ABSENT],
         ("--out", "--stream")),
    Case("fold-llm:unknown-clusterer", lambda t, f: [
        "fold-llm", t / ABSENT, "--ratio", "0.2", "--clusterer", "magic", "--out", t / "o"],
         ("--clusterer", "magic")),
    Case("fold-llm:meta-device", lambda t, f: [
        "fold-llm", t / ABSENT, "--ratio", "0.2", "--device", "meta", "--out", t / "o"],
         ("--device", "meta")),
    Case("fold-llm:missing-folder", lambda t, f: [
        "fold-llm", t / ABSENT, "--ratio", "0.2", "--out", t / "o"], (ABSENT,)),
    Case("fold-llm:cnn-folder", lambda t, f: ["fold-llm", f["cnn"], "--ratio", "0.2", "--out",
                                              t / "o"], ("cnn", "not a Hugging Face", "LLM")),
    Case("fold-llm:truncated-config", lambda t, f: [
        "fold-llm", hf_config(f, t, truncate_config, name="hf"), "--ratio", "0.2", "--out",
        t / "o"], ("config.json",)),
    Case("fold-llm:full-disk", lambda t, f: ["fold-llm", f["hf"], "--ratio", "0.2", "--out",
                                             t / "o"], ("No space left",), patch=full_disk_hf),
    # export-gguf
    Case("export-gguf:bad-outtype", lambda t, f: [
        "export-gguf", t / ABSENT, t / "out.gguf", "--outtype", "q4"], ("--outtype", "q4")),
    Case("export-gguf:missing-folder", lambda t, f: [
        "export-gguf", t / ABSENT, t / "out.gguf"], (ABSENT,)),
    Case("export-gguf:cnn-folder", lambda t, f: ["export-gguf", f["cnn"], t / "out.gguf"],
         ("export-gguf",)),
    # eval-ppl: likewise
    Case("eval-ppl:missing-tokenizer", lambda t, f: [
        "eval-ppl", t / ABSENT, "--tokenizer", "/nope"], ("--tokenizer", "/nope")),
    Case("eval-ppl:missing-text", lambda t, f: [
        "eval-ppl", t / ABSENT, "--text", t / "none.txt"], ("--text", "none.txt")),
    Case("eval-ppl:missing-wikitext2", lambda t, f: [
        "eval-ppl", t / ABSENT, "--wikitext2", t / "wt2"], ("--wikitext2", "wt2")),
    Case("eval-ppl:bad-window-set", lambda t, f: [
        "eval-ppl", t / ABSENT, "--text", f["text"], "--windows", "middle:3"],
         ("--windows", "middle:3")),
    Case("eval-ppl:short-windows", lambda t, f: [
        "eval-ppl", t / ABSENT, "--text", f["text"], "--seq-len", "1"], ("--seq-len",)),
    Case("eval-ppl:zero-batch", lambda t, f: [
        "eval-ppl", t / ABSENT, "--text", f["text"], "--batch-size", "0"], ("--batch-size",)),
    Case("eval-ppl:cnn-folder", lambda t, f: ["eval-ppl", f["cnn"], "--text", f["text"]],
         ("cnn", "not a Hugging Face")),
    Case("eval-ppl:tokenizer-folder-without-tokenizer", lambda t, f: [
        "eval-ppl", f["llm"], "--text", f["text"], "--tokenizer", f["root"]],
         ("--tokenizer",)),
    Case("eval-ppl:text-shorter-than-a-window", lambda t, f: [
        "eval-ppl", f["llm"], "--text", f["text"], "--seq-len", "100000"], ("--seq-len",)),
    # eval-zero-shot
    Case("eval-zero-shot:offline", lambda t, f: [
        "eval-zero-shot", f["llm"], "--tasks", "hub_choice", "--include-path", offline_task(t),
        "--limit", "2"], ("hub_choice", "download", "modelfold-tests/not-downloadable"),
         patch=offline),
    Case("eval-zero-shot:missing-include-path", lambda t, f: [
        "eval-zero-shot", t / ABSENT, "--tasks", "x", "--include-path", t / "tasks"],
         ("--include-path",)),
    Case("eval-zero-shot:no-tasks", lambda t, f: ["eval-zero-shot", t / ABSENT, "--tasks", ","],
         ("--tasks",)),
    Case("eval-zero-shot:cnn-folder", lambda t, f: ["eval-zero-shot", f["cnn"], "--tasks", "x"],
         ("cnn", "not a Hugging Face")),
]


def command_names() -> set[str]:
    import typer.main

    return set(typer.main.get_command(app).commands)


def invoke(args: list) -> object:
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, mentions=()) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert len(line) < 600, line
    for word in mentions:
        assert word in line, (word, line)
    for advice in API_ADVICE:
        assert advice not in line, (advice, line)
    return line


def test_every_command_has_a_bad_input_case():
    covered = {case.command for case in CASES}
    assert command_names() <= covered, f"commands without a bad-input case: " \
                                       f"{sorted(command_names() - covered)}"
    assert covered <= command_names()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clean_line_with_exit_code_2(case, folders, tmp_path, monkeypatch):
    if case.skip:
        pytest.skip(case.skip)
    args = case.args(tmp_path, folders)
    if case.patch is not None:
        case.patch(monkeypatch)
    line = assert_one_line_error(invoke(args), case.mentions)
    if os.environ.get("SHOW_CLI_ERRORS"):
        print(f"\n{case.id}: {line}")
    assert not (tmp_path / "marker").exists()  # no hostile factory ran
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_options_are_checked_before_the_model_is_loaded(folders, tmp_path, monkeypatch):
    import modelfold.cli as cli

    def no_loading(*_, **__):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli, "load_llm", no_loading)
    llm = folders["llm"]
    for args in (["fold-llm", llm, "--ratio", "1.5", "--out", tmp_path / "o"],
                 ["fold-llm", llm, "--ratio", "0.2", "--device", "bogus", "--out",
                  tmp_path / "o"],
                 ["eval-ppl", llm, "--tokenizer", "/nope"],
                 ["eval-ppl", llm, "--text", tmp_path / "none.txt"],
                 ["eval-zero-shot", llm, "--tasks", "x", "--include-path", tmp_path / "none"]):
        assert_one_line_error(invoke(args))


def test_ignore_named_in_the_error_is_the_escape_hatch(folders, tmp_path):
    result = invoke(["fold", folders["branchy"], "--model", "test_bad_inputs:Branchy",
                     "--input-shape", "2,8", "--ratio", "0.5", "--ignore", "b",
                     "--out", tmp_path / "o"])
    assert result.exit_code == 0, result.output
    line = [w for w in result.stderr.splitlines() if w.strip()]
    assert all(w.startswith("warning: ") and "--trust-factory" in w for w in line), line


def test_wrong_width_is_summarised_not_dumped(folders, tmp_path):
    line = assert_one_line_error(invoke(fold_weights('{"width": 8}')(tmp_path, folders)))
    assert re.search(r"\d+ tensors? (differ|do not fit)", line), line
    assert line.count("conv") <= 3 + 1  # the first three mismatches, not all of them


def test_internal_errors_are_one_line_with_exit_code_1(folders, monkeypatch):
    def bug(*_, **__):
        raise KeyError("a bug in modelfold")

    monkeypatch.setattr(mf.FoldSummary, "__str__", bug)
    result = invoke(["summary", folders["cnn"]])
    assert result.exit_code == 1, result.output
    lines = [w for w in result.stderr.splitlines() if w.strip()]
    assert len(lines) == 1 and "KeyError" in lines[0] and "bug" in lines[0], result.stderr
    assert "Traceback" not in result.output
    monkeypatch.setenv("MODELFOLD_DEBUG", "1")  # developers get the exception itself
    result = invoke(["summary", folders["cnn"]])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def test_a_real_process_prints_one_unwrapped_line(tmp_path):
    long = tmp_path / ("a-long-folder-name-" * 6)
    env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "40"}
    proc = subprocess.run([sys.executable, "-m", "modelfold.cli", "summary", str(long)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert str(long) in proc.stderr


# --- --trust-factory -------------------------------------------------------------------------

WIDE = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}
LOADING_COMMANDS = ("fold", "summary", "fold-llm", "eval-ppl", "eval-zero-shot")


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("user") / "net"
    with pytest.warns(UserWarning):
        mf.save(mf.fold(build_user_net(), X, ratio=0.5), folder, factory=build_user_net)
    return folder


def test_trust_factory_loads_a_folder_the_user_trusts(user_folder, tmp_path):
    assert_one_line_error(invoke(["summary", user_folder]),
                          ("--trust-factory", "test_cli_errors:build_user_net"))
    result = invoke(["summary", user_folder, "--trust-factory"])
    assert result.exit_code == 0, result.output
    result = invoke(["fold", user_folder, "--ratio", "0.25", "--trust-factory", "--out",
                     tmp_path / "again"])
    assert result.exit_code == 0, result.output
    assert mf.load(tmp_path / "again", trust_factory=True)(X).shape == (2, 10)


@pytest.mark.parametrize("command", LOADING_COMMANDS)
def test_every_loading_command_has_trust_factory(command):
    result = runner.invoke(app, [command, "--help"], env=WIDE)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--trust-factory" in text and "only for folders you trust" in text


# --- help and output -------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *sorted(command_names())])
def test_help_has_no_stray_type_labels_on_flags(command):
    result = runner.invoke(app, [command, "--help"] if command else ["--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output


def test_help_keeps_square_brackets():
    result = runner.invoke(app, ["--help"], env=WIDE)
    assert "modelfold[eval]" in result.output
    result = runner.invoke(app, ["sweep", "--help"], env=WIDE)
    assert "modelfold[ray]" in result.output


def test_sweep_help_lists_every_preset():
    from experiments.sweep import PRESETS

    result = runner.invoke(app, ["sweep", "--help"], env=WIDE)
    for name in PRESETS:
        assert name in result.output
    assert "beyond-cnn" in result.output


def test_summary_prints_macs_before_and_after(folders):
    result = invoke(["summary", folders["cnn"]])
    assert result.exit_code == 0, result.output
    macs = [line for line in result.output.splitlines() if line.startswith("MACs")]
    assert len(macs) == 1 and re.search(r"\d[\d,]* +-> +\d[\d,]*", macs[0]), macs
    assert re.search(r"MACs\s*:\s*->", result.output) is None
    timed = invoke(["summary", folders["cnn"], "--latency"])
    assert timed.exit_code == 0, timed.output
    assert re.search(r"latency +: [\d.]+ ms -> [\d.]+ ms +\([\d.]+x faster\)", timed.output)


@pytest.mark.parametrize(("command", "api", "cli"), [
    ("fold", "this repair needs `calibration=` data: a tensor, a DataLoader or an iterable of "
     "input batches.", "this repair needs --calibration (a tensor file, .safetensors or .pt, or "
     "'fashion-mnist')."),
    ("fold", "module 'a' runs 2 times in one forward pass. Pass `ignored=[model.a]` to leave its "
     "channel groups unfolded.", "module 'a' runs 2 times in one forward pass. Pass --ignore a "
     "to leave its channel groups unfolded."),
    ("fold", "`ratio` must lie in [0, 1), got 1.5.", "--ratio must lie in [0, 1), got 1.5."),
    ("fold", "FoldConfig.repair='magic' is unknown", "--repair 'magic' is unknown"),
    ("fold", "FoldConfig.ar_floor must lie in (0, 1]", "'ar_floor' in --config must lie in (0, 1]"),
    ("fold", "`device`='gpu9' is not a valid torch device.",
     "'device'='gpu9' is not a valid torch device."),
    ("fold-llm", "`device`='gpu9' is not a valid torch device.",
     "--device 'gpu9' is not a valid torch device."),
    ("fold-llm", "allocation='inertia' spreads MLP channels only; fold parts=('mlp',).",
     "--allocation 'inertia' spreads MLP channels only; fold --parts mlp."),
    ("fold-llm", "fold_checkpoint: model.layers.0.mlp.up_proj.weight is not in the "
     "checkpoint; this layer layout is not supported for streaming. Load the model and use "
     "modelfold.fold instead.", "--stream: model.layers.0.mlp.up_proj.weight is not in the "
     "checkpoint; this layer layout is not supported for streaming; drop --stream."),
    ("eval-zero-shot", "unknown lm-eval tasks ['x'] (add their YAML folder with "
     "`include_path=`).", "unknown lm-eval tasks ['x'] (add their YAML folder with "
     "--include-path)."),
    ("summary", "`model` must be a torch.nn.Module, got str.",
     "'model' must be a torch.nn.Module, got str."),
    ("summary", "save: shapes=[1, 2] and groups=2 stay", "save: shapes=[1, 2] and groups=2 stay"),
])
def test_api_wording_becomes_command_line_wording(command, api, cli):
    import typer.main

    from modelfold.cli_support import translate

    params = typer.main.get_command(app).commands[command].params
    assert translate(api, params) == cli
