"""The installable package stays light: `import modelfold` loads no optional dependency, the
command line names its extra when typer/rich are missing, and the cache folder has one name."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import modelfold
from modelfold.cache import cache_root, cache_subdir

SRC = Path(modelfold.__file__).resolve().parents[1]
# Optional dependencies (extras) and the heavy ones only some paths need, by import name.
OPTIONAL = ("matplotlib", "ot", "PIL", "scipy", "typer", "rich", "ray", "transformers",
            "sklearn", "h5py", "onnx", "onnxruntime", "gguf", "accelerate", "lm_eval",
            "pandas", "experiments")


def _loaded_after(statement: str) -> list[str]:
    """The OPTIONAL top-level modules in sys.modules after `statement` in a fresh interpreter."""
    code = (f"import json, sys\n{statement}\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & "
            f"set({list(OPTIONAL)!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
                         cwd=SRC)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_modelfold_loads_no_optional_dependency() -> None:
    assert _loaded_after("import modelfold") == []


def test_the_check_sees_optional_dependencies() -> None:
    # The command line needs typer and rich: the same check must report them.
    assert {"typer", "rich"} <= set(_loaded_after("import modelfold.cli"))


def _run_cli_without(blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    code = ("import sys\n"
            + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
            + "sys.argv = ['modelfold', '--help']\n"
            "from modelfold.__main__ import main\nmain()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, cwd=SRC)


@pytest.mark.parametrize("blocked", [("typer",), ("rich",), ("typer", "rich")])
def test_cli_without_its_extra_names_it(blocked: tuple[str, ...]) -> None:
    result = _run_cli_without(blocked)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "pip install 'modelfold[cli]'" in result.stderr
    for name in blocked:
        assert name in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_with_its_extra_runs() -> None:
    result = _run_cli_without(())
    assert result.returncode == 0, result.stderr
    assert "fold" in result.stdout


def test_cache_root_default_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MODELFOLD_CACHE", raising=False)
    monkeypatch.delenv("MODELFOLD_CACHE_ROOT", raising=False)
    assert cache_root() == Path.home() / ".cache" / "modelfold"
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache_root() == tmp_path
    assert cache_subdir("deep_inversion") == tmp_path / "deep_inversion"


def test_old_cache_variable_still_works_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    from modelfold.repair.deep_inversion import cache_dir
    from modelfold.zoo.llm import smollm2_folder

    monkeypatch.delenv("MODELFOLD_CACHE", raising=False)
    monkeypatch.setenv("MODELFOLD_CACHE_ROOT", str(tmp_path))
    with pytest.warns(DeprecationWarning, match="MODELFOLD_CACHE"):
        assert cache_dir() == tmp_path / "deep_inversion"
    # the new name wins over the old one, silently
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path / "new"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache_dir() == tmp_path / "new" / "deep_inversion"
    (tmp_path / "new" / "smollm2-135m-instruct-hf").mkdir(parents=True)
    (tmp_path / "new" / "smollm2-135m-instruct-hf" / "config.json").write_text("{}")
    assert smollm2_folder() == tmp_path / "new" / "smollm2-135m-instruct-hf"


def test_experiment_checkpoints_live_under_the_cache_root(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    from experiments.train import checkpoint_path

    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path))
    path = checkpoint_path("resnet18", width=16, epochs=2)
    assert path == tmp_path / "checkpoints" / "fashion_mnist-resnet18-w16-e2-s0.safetensors"
    pinned = checkpoint_path("resnet18", width=16, epochs=2, threads=2)
    assert pinned.name == "fashion_mnist-resnet18-w16-e2-s0-t2.safetensors"
