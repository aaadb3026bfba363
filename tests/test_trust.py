"""Loading a folder never runs code its manifest names unless the user trusts it.

Every hostile manifest is re-signed (checksums recomputed, see `forge`), so the factory
allow-list alone must stop it. The attacks run in a fresh interpreter, as a user's would, and
each checks that its marker file was never created.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import modelfold as mf
from conftest import make_model
from forge import edit_manifest
from helpers import tiny_llama

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"

ATTACKS = {
    "os-system": ("os:system", lambda m: {"command": f"touch {m}"}),
    "subprocess-run": ("subprocess:run", lambda m: {"args": ["touch", str(m)]}),
    "builtins-eval": ("builtins:eval", lambda m: {"source": f"open({str(m)!r}, 'w')"}),
    "import-module": ("importlib:import_module", lambda m: {"name": "evil_module"}),
}
ENTRY_POINTS = ("api-load", "cli-summary", "cli-fold", "cli-eval-ppl", "load-into-model-then-save")

ATTACK_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    from pathlib import Path
    from typer.testing import CliRunner
    import modelfold as mf
    from modelfold.cli import app
    from modelfold.zoo import create_model

    folder, out, marker = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    runner = CliRunner()
    results = {}
    for entry in sys.argv[4:]:
        result = {}
        if entry == "api-load":
            try:
                mf.load(folder)
                result["error"] = None
            except mf.FoldError as exc:
                result["error"] = str(exc)
        elif entry == "load-into-model-then-save":
            model = mf.load(folder, model=create_model("lenet5", width=6))
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                try:
                    mf.save(model, out / entry)
                    result["error"] = None
                except mf.FoldError as exc:
                    result["error"] = str(exc)
        else:
            args = {"cli-summary": ["summary", str(folder)],
                    "cli-fold": ["fold", str(folder), "--ratio", "0.5", "--out",
                                 str(out / entry)],
                    "cli-eval-ppl": ["eval-ppl", str(folder), "--text", str(folder /
                                                                          "modelfold.json")]
                    }[entry]
            res = runner.invoke(app, args)
            result["exit_code"] = res.exit_code
            result["error"] = res.output
        result["marker"] = marker.exists()
        marker.unlink(missing_ok=True)
        results[entry] = result
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def attack_results(tmp_path_factory) -> dict[str, dict]:
    """Every attack through every entry point, one fresh interpreter per attack."""
    results = {}
    for attack, (target, kwargs) in ATTACKS.items():
        tmp = tmp_path_factory.mktemp(attack)
        folder, marker = tmp / "hostile", tmp / "marker"
        mf.save(make_model("lenet5"), folder)
        hostile = {"target": target, "kwargs": kwargs(marker)}
        edit_manifest(folder, lambda m, h=hostile: m.update(factory=h))
        (tmp / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        env = {"PYTHONPATH": f"{SRC}:{tmp}", "PATH": "/usr/bin:/bin", "HOME": str(tmp)}
        proc = subprocess.run(
            [sys.executable, "-c", ATTACK_SCRIPT, str(folder), str(tmp), str(marker),
             *ENTRY_POINTS], capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[attack] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_hostile_factories_never_run(attack, entry, attack_results):
    target = ATTACKS[attack][0]
    result = attack_results[attack][entry]
    assert not result["marker"], f"{target} ran through {entry}"
    if entry == "load-into-model-then-save":
        # the foreign factory is not carried over: the model saves under its own factory
        assert target not in (result["error"] or "")
    elif entry == "cli-eval-ppl":  # refused as not an LLM folder before anything is built
        assert result["exit_code"] == 2
        assert "not a Hugging Face" in result["error"] and "Traceback" not in result["error"]
    elif entry.startswith("cli-"):
        assert result["exit_code"] == 2
        assert target in result["error"] and "--trust-factory" in result["error"]
    else:
        assert target in result["error"] and "trust_factory=True" in result["error"]


def test_trust_is_opt_in_per_call_and_by_registration(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "user_archs.py").write_text(textwrap.dedent("""
        from torch import nn
        CALLS = []
        def build(width=4):
            CALLS.append(width)
            return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))
    """))
    import user_archs

    model = user_archs.build(width=4)
    with pytest.warns(UserWarning, match="register_factory"):
        mf.save(model, tmp_path / "f", factory=user_archs.build, factory_kwargs={"width": 4})
    user_archs.CALLS.clear()
    with pytest.raises(mf.FoldError, match="user_archs:build") as refused:
        mf.load(tmp_path / "f")
    assert refused.value.target == "user_archs:build"  # for callers' own wording (the CLI's)
    assert user_archs.CALLS == []  # refused before anything ran
    x = torch.randn(2, 3)
    assert torch.equal(mf.load(tmp_path / "f", trust_factory=True)(x), model(x))
    mf.register_factory(user_archs.build)
    try:
        again = mf.load(tmp_path / "f")
        assert torch.equal(again(x), model(x))
        mf.save(again, tmp_path / "f")  # registered: no warning, no trust needed
    finally:
        from modelfold.io import trust

        trust._REGISTERED.pop("user_archs:build")


def test_a_model_loaded_with_trust_saves_without_importing_again(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "trusted_arch.py").write_text(
        "from torch import nn\ndef build():\n    return nn.Sequential(nn.Linear(3, 4))\n")
    import trusted_arch

    with pytest.warns(UserWarning):
        mf.save(trusted_arch.build(), tmp_path / "a", factory=trusted_arch.build)
    loaded = mf.load(tmp_path / "a", trust_factory=True)
    with pytest.warns(UserWarning, match="trust_factory"):
        mf.save(loaded, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "modelfold.json").read_text())["factory"]["target"] \
        == "trusted_arch:build"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_models_that_cannot_be_rebuilt_are_not_saved(tmp_path):
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(mf.FoldError, match=r"does not rebuild this model.*factory="):
        mf.save(seq, tmp_path / "seq")

    class Local(Net):
        pass

    main = type("Script", (Net,), {"__module__": "__main__"})
    for model, why in ((Local(), "inside a function"), (main(), "__main__")):
        with pytest.raises(mf.FoldError, match=why):
            mf.save(model, tmp_path / "x")
    assert not (tmp_path / "seq").exists() and not (tmp_path / "x").exists()

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    mf.register_factory(build)  # a local builder is fine once registered in this process
    try:
        mf.save(seq, tmp_path / "seq", factory=build)
        x = torch.randn(3, 4)
        assert torch.equal(mf.load(tmp_path / "seq")(x), seq(x))
    finally:
        from modelfold.io import trust

        trust._REGISTERED.clear()


def test_hf_folders_never_run_remote_code(tmp_path):
    transformers = pytest.importorskip("transformers")
    from forge import resign_hf

    model = tiny_llama(1)
    mf.save(model, tmp_path / "hf")
    marker = tmp_path / "marker"
    (tmp_path / "hf" / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")

    def add_auto_map(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
        (folder / "config.json").write_text(json.dumps(cfg))

    resign_hf(tmp_path / "hf", add_auto_map, extra_files=["evil.py"])
    loaded = mf.load(tmp_path / "hf")  # the config's own model type, never the folder's code
    assert type(loaded) is transformers.LlamaForCausalLM
    assert not marker.exists()
