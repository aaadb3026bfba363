"""save -> load round trips, manifests, checksums and atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

import modelfold as mf
from conftest import ZOO, make_model
from modelfold.io.folder import MANIFEST, WEIGHTS


def zoo_factory(name: str) -> tuple[str, dict]:
    return "modelfold.zoo:create_model", {"name": name, **ZOO[name]}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_save_load_round_trip_is_exact(name, example, tmp_path):
    model = make_model(name)
    folded = mf.fold(model, example, ratio=0.5)
    target, kwargs = zoo_factory(name)
    mf.save(folded, tmp_path / "out", factory=target, factory_kwargs=kwargs)
    again = mf.load(tmp_path / "out")
    assert type(again) is type(folded)
    assert torch.equal(again(example), folded.eval()(example))
    sd_a, sd_b = folded.state_dict(), again.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["record"]["params_after"] == sum(p.numel() for p in again.parameters())
    for key, info in manifest["tensors"].items():
        assert list(sd_b[key].shape) == info["shape"]
    s = mf.summary(None, again)
    assert s.params_after == manifest["record"]["params_after"]
    assert s.params_before == sum(p.numel() for p in model.parameters())


def test_summary_of_a_loaded_folder_prints_only_the_macs_it_knows(example, tmp_path):
    mf.save(mf.fold(make_model("lenet5"), example, ratio=0.5), tmp_path / "f")
    text = str(mf.summary(None, mf.load(tmp_path / "f")))
    macs = [line for line in text.splitlines() if line.startswith("MACs")]
    assert len(macs) == 1 and macs[0].startswith("MACs after :") and "->" not in macs[0]


def test_zoo_models_remember_their_factory(example, tmp_path):
    from modelfold.zoo import create_model

    model = create_model("vgg11_bn", width=8).eval()
    folded = mf.fold(model, example, ratio=0.25)
    mf.save(folded, tmp_path / "f")  # no factory argument needed
    assert torch.equal(mf.load(tmp_path / "f")(example), folded(example))


def build_resnet18() -> torch.nn.Module:
    """A user's own factory: importable, but not registered with modelfold."""
    return make_model("resnet18", seed=5)


def test_untrusted_factories_need_trust_or_a_skeleton(example, tmp_path):
    model = make_model("resnet18")
    folded = mf.fold(model, example, ratio=0.5)
    with pytest.warns(UserWarning, match="trust_factory=True"):
        mf.save(folded, tmp_path / "f", factory="test_io:build_resnet18")
    with pytest.raises(mf.FoldError, match=r"test_io:build_resnet18.*trust_factory=True"):
        mf.load(tmp_path / "f")
    for again in (mf.load(tmp_path / "f", model=make_model("resnet18", seed=5)),
                  mf.load(tmp_path / "f", trust_factory=True)):
        assert torch.equal(again(example), folded(example))
    with pytest.raises(mf.FoldError, match="cannot import the factory"):
        mf.save(folded, tmp_path / "g", factory="not.a.module:nothing")
    assert not (tmp_path / "g").exists()


def test_tampered_or_truncated_weights_are_refused(example, tmp_path):
    model = make_model("lenet5")
    mf.save(mf.fold(model, example, ratio=0.5), tmp_path / "f",
            factory="modelfold.zoo:create_model", factory_kwargs={"name": "lenet5"})
    weights = tmp_path / "f" / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(mf.FoldError, match="checksum"):
        mf.load(tmp_path / "f")
    weights.unlink()
    with pytest.raises(mf.FoldError, match="missing"):
        mf.load(tmp_path / "f")


def test_bad_manifests_are_refused(tmp_path):
    with pytest.raises(mf.FoldError, match="not a folder"):
        mf.load(tmp_path / "nothing")
    (tmp_path / "d").mkdir()
    with pytest.raises(mf.FoldError, match="missing"):
        mf.load(tmp_path / "d")
    (tmp_path / "d" / MANIFEST).write_text("{not json")
    with pytest.raises(mf.FoldError, match="not valid JSON"):
        mf.load(tmp_path / "d")
    (tmp_path / "d" / MANIFEST).write_text(json.dumps({"format": "modelfold",
                                                       "format_version": 99}))
    with pytest.raises(mf.FoldError, match="format version 99"):
        mf.load(tmp_path / "d")


def test_save_replaces_atomically_and_keeps_foreign_folders(example, tmp_path):
    model = make_model("lenet5")
    kwargs = {"factory": "modelfold.zoo:create_model", "factory_kwargs": {"name": "lenet5"}}
    mf.save(mf.fold(model, example, ratio=0.5), tmp_path / "f", **kwargs)
    second = mf.fold(model, example, ratio=0.25)
    mf.save(second, tmp_path / "f", **kwargs)  # replaces the earlier save
    assert torch.equal(mf.load(tmp_path / "f")(example), second(example))
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temporary folders left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(mf.FoldError, match="refusing"):
        mf.save(second, foreign, **kwargs)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_unwritable_destination_is_a_clear_error(example, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(mf.FoldError, match="cannot write"):
        mf.save(make_model("lenet5"), blocker / "sub" / "out")


def test_unfolded_models_save_and_load_too(example, tmp_path):
    model = make_model("densenet_small")
    mf.save(model, tmp_path / "dense", factory="modelfold.zoo:create_model",
            factory_kwargs={"name": "densenet_small"})
    assert torch.equal(mf.load(tmp_path / "dense")(example), model(example))
