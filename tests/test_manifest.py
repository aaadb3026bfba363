"""Edited or damaged folders load as the saved model or fail with a FoldError, never as a
different model and never with another exception. Edits are re-signed (see `forge`) so that the
validation itself, not the checksums, is what is tested."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import modelfold as mf
from conftest import make_model
from forge import edit_manifest, resign_hf
from helpers import tiny_llama
from modelfold.io.folder import MANIFEST, WEIGHTS

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("saved") / "folded"
    folded = mf.fold(make_model("resnet18"), X, ratio=0.5)
    mf.save(folded, folder)
    return folder, folded


def copy_of(saved, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(saved[0], dst)
    return dst


def set_attr(m: dict, module: str, key: str, value: Any) -> None:
    m["module_attrs"].setdefault(module, {})[key] = value


EDITS = {
    "bn-eps-1000": (lambda m: m["module_attrs"].update({"bn1": {"eps": 1000}}), "eps"),
    "forward-a-string": (lambda m: m["module_attrs"].update({"conv1": {"forward": "x"}}),
                         "forward"),
    "dtype-float16": (lambda m: m["tensors"]["conv1.weight"].update(dtype="float16"),
                      "conv1.weight"),
    "dtype-float64": (lambda m: m["tensors"]["conv1.weight"].update(dtype="float64"),
                      "conv1.weight"),
    "dtype-unknown": (lambda m: m["tensors"]["conv1.weight"].update(dtype="complex128"),
                      "dtype"),
    "shape-negative": (lambda m: m["tensors"]["conv1.weight"].update(shape=[-4, 3, 3, 3]),
                       "shape"),
    "shape-huge": (lambda m: m["tensors"]["conv1.weight"].update(shape=[10 ** 12, 3, 3, 3]),
                   "conv1.weight"),
    "params-10e400": (lambda m: m["record"].update(params_before=10 ** 400), "params_before"),
    "params-after-wrong": (lambda m: m["record"].update(params_after=5), "parameters"),
    "group-bad-status": (lambda m: m["record"]["groups"][0].update(status="pwned"), "status"),
    "attr-inconsistent": (lambda m: set_attr(m, "conv1", "out_channels", 999), "do not fit"),
    "attr-a-list": (lambda m: set_attr(m, "bn1", "num_features", [4]), "num_features"),
    "attr-unknown-module": (lambda m: m["module_attrs"].update({"nope": {"out_channels": 1}}),
                            "nope"),
    "input-spec-huge": (lambda m: m["record"]["input_spec"].update(shape=[10 ** 9] * 4),
                        "input_spec"),
    "record-extra-key": (lambda m: m["record"].update(evil=1), "evil"),
    "factory-reads-a-file": (lambda m: m["factory"]["kwargs"].update(pretrained="/etc/passwd"),
                             "pretrained"),
    "factory-extra-key": (lambda m: m["factory"].update(code="x"), "factory"),
    "nested-deeply": (lambda m: m["record"].update(extra={"a": json.loads(
        "[" * 200 + "]" * 200)}), None),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edited_manifests_are_refused(edit, saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    change, culprit = EDITS[edit]
    edit_manifest(folder, change)
    if culprit is None:  # harmless where it sits: loads as the saved model
        assert torch.equal(mf.load(folder)(X), saved[1](X))
        return
    with pytest.raises(mf.FoldError, match=culprit):
        mf.load(folder)


def test_unsigned_edits_are_caught_by_the_checksum(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    edit_manifest(folder, lambda m: m["record"].update(params_before=10 ** 9), resign=False)
    with pytest.raises(mf.FoldError, match="manifest was modified"):
        mf.load(folder)


def test_non_finite_weights_are_refused(saved, tmp_path):
    folder = copy_of(saved, tmp_path)

    def poison(m: dict) -> None:
        tensors = load_file(str(folder / WEIGHTS))
        tensors["linear.weight"][0, 0] = float("nan")
        save_file(tensors, str(folder / WEIGHTS))

    edit_manifest(folder, poison)
    with pytest.raises(mf.FoldError, match=r"non-finite.*linear\.weight"):
        mf.load(folder)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"format": "modelfold", "x": ' * 50_000,
                                  "\xff\xfe", ""])
def test_unparseable_manifests_are_a_fold_error(text, saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    (folder / MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(mf.FoldError):
        mf.load(folder)


def test_summary_of_a_damaged_folder_is_one_line_exit_2(saved, tmp_path):
    from typer.testing import CliRunner

    from modelfold.cli import app

    folder = copy_of(saved, tmp_path)
    edit_manifest(folder, lambda m: m["tensors"]["conv1.weight"].update(shape=[-1, 3]))
    result = CliRunner().invoke(app, ["summary", str(folder)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "conv1.weight" in result.output


# ---------------------------------------------------------------------------------------------
# Hugging Face folders


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    model = tiny_llama(2)
    folded = mf.fold(model, ratio=0.25)
    folder = tmp_path_factory.mktemp("hf") / "folded"
    mf.save(folded, folder)
    return folder


def hf_copy(hf_saved: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(hf_saved, tmp_path / "hf"))


@pytest.mark.parametrize("name", ["../elsewhere/w.safetensors", "/etc/passwd", "..",
                                  "sub/model.safetensors", "~/.ssh/id_rsa"])
def test_hf_manifests_name_only_files_inside_the_folder(name, hf_saved, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "w.safetensors").write_bytes(b"secret")
    folder = hf_copy(hf_saved, tmp_path)
    resign_hf(folder, lambda f: None,
              manifest_edit=lambda m: m["files_sha256"].update({name: "0" * 64}))
    with pytest.raises(mf.FoldError, match="files_sha256") as exists:
        mf.load(folder)
    (outside / "w.safetensors").unlink()  # the answer does not depend on the file existing
    with pytest.raises(mf.FoldError) as missing:
        mf.load(folder)
    assert str(exists.value) == str(missing.value)


@pytest.mark.parametrize("damage", ["truncated-config", "missing-config", "layers-wrong",
                                    "dtype-edited"])
def test_damaged_hf_folders_are_a_fold_error(damage, hf_saved, tmp_path):
    folder = hf_copy(hf_saved, tmp_path)
    if damage == "truncated-config":
        resign_hf(folder, lambda f: (f / "config.json").write_text(
            (f / "config.json").read_text()[:40]))
    elif damage == "missing-config":
        resign_hf(folder, lambda f: (f / "config.json").unlink())
    elif damage == "layers-wrong":
        resign_hf(folder, lambda f: None, manifest_edit=lambda m: m["layers"][0].update(
            intermediate_size=7))
    else:
        resign_hf(folder, lambda f: (f / "config.json").write_text(json.dumps(
            {**json.loads((f / "config.json").read_text()), "dtype": "float16"})))
    with pytest.raises(mf.FoldError):
        mf.load(folder)


def test_hf_round_trip_still_exact(hf_saved):
    again = mf.load(hf_saved)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(again(ids).logits).all()


# ---------------------------------------------------------------------------------------------
# Fuzz: random edits of a valid manifest


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10 ** 30), 10 ** 30)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=6)


@st.composite
def manifest_edits(draw, manifest: dict) -> list[tuple[tuple, str, Any]]:
    paths = _paths(manifest)
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["replace", "delete", "add-key", "nest", "number"]))
        edits.append((path, kind, draw(JSON_VALUES)))
    return edits


def _apply(manifest: dict, edits: list) -> None:
    for path, kind, value in edits:
        if not path:
            continue
        parent = manifest
        try:
            for key in path[:-1]:
                parent = parent[key]
            leaf = path[-1]
            if kind == "replace":
                parent[leaf] = value
            elif kind == "delete":
                del parent[leaf]
            elif kind == "add-key" and isinstance(parent[leaf], dict):
                parent[leaf][str(value)[:8]] = value
            elif kind == "nest":
                parent[leaf] = [parent[leaf]]
            elif kind == "number" and isinstance(parent[leaf], int):
                parent[leaf] = parent[leaf] + (value if isinstance(value, int) else 1)
        except (KeyError, IndexError, TypeError):
            continue


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), resign=st.booleans())
def test_fuzzed_manifests_load_as_saved_or_raise_fold_error(data, resign, saved, tmp_path):
    import shutil

    folder = tmp_path / "fuzz"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(saved[0], folder)
    original = json.loads((folder / MANIFEST).read_text())
    edits = data.draw(manifest_edits(original), label="edits")
    edit_manifest(folder, lambda m: _apply(m, copy.deepcopy(edits)), resign=resign)
    try:
        model = mf.load(folder)
    except mf.FoldError:
        return
    assert torch.equal(model(X), saved[1](X))
    sd_a, sd_b = model.state_dict(), saved[1].state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
