"""`modelfold sweep --ray local`: cells as Ray tasks, streamed to the CSV, resumable."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch
from typer.testing import CliRunner

from experiments.fashion_mnist import load_fashion_mnist
from experiments.sweep import FIELDS, _key, preset, read_rows, run_sweep, write_rows
from experiments.train import checkpoint_path, train_classifier
from modelfold.cli import app
from modelfold.errors import FoldError
from modelfold.zoo import create_model

ray = pytest.importorskip("ray")

METHODS = ["fold-naive", "sp-l1", "ifm"]


@pytest.fixture
def one_thread():
    """Torch on one thread, like a 1-CPU Ray task: the serial reference computes exactly what
    the workers compute (and does not fight the workers for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plant_checkpoint(name: str, width: int, epochs: int) -> None:
    """A checkpoint (2 epochs on 2,048 images, ~70 % accuracy) where the sweep looks for the
    shipped recipe's: seconds instead of minutes, as this test is about where cells run."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = create_model(name, width=width)
    train = load_fashion_mnist("train")
    subset = torch.utils.data.TensorDataset(train.tensors[0][:2048], train.tensors[1][:2048])
    train_classifier(model, subset, epochs=2, batch_size=64, progress=False)
    path = checkpoint_path(name, width=width, epochs=epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_ray_sweep_matches_serial_streams_rows_and_resumes(tmp_path, monkeypatch,
                                                          one_thread):
    # the workers see these through the runtime_env that run_sweep gives a local instance
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # a local instance with num_cpus=2
    cfg = dataclasses.replace(preset("quick"), ratios=[0.5], methods=METHODS)
    spec = cfg.models[0]
    plant_checkpoint(spec.name, spec.width, spec.epochs)
    serial = run_sweep(cfg, tmp_path / "serial", "sweep", log=lambda line: None)

    out = tmp_path / "ray"
    seen: list[tuple[str, int]] = []

    def log(line: str) -> None:  # rows are in the CSV when a cell is logged
        seen.append((line, len(read_rows(out / "sweep.csv"))))

    rows = run_sweep(cfg, out, "sweep", log=log, ray="local")
    assert not ray.is_initialized()  # the instance run_sweep started is shut down
    assert set(rows[0]) == set(FIELDS)
    assert [n for _, n in seen] == [2, 3, 4]  # dense + first cell, then one row per cell
    assert {_key(r) for r in read_rows(out / "sweep.csv")} == {_key(r) for r in serial}
    by_key = {_key(r): r for r in serial}
    for row in read_rows(out / "sweep.csv"):
        ref = by_key[_key(row)]
        for f in ("params", "macs", "sparsity", "accuracy"):  # all three methods deterministic
            assert float(row[f]) == pytest.approx(float(ref[f]), abs=1e-12), (row, ref)
        assert float(row["latency_ratio"]) > 0
    # a meaningful comparison: a trained dense model, four different accuracies
    assert len({r["accuracy"] for r in serial}) == 4
    assert max(float(r["accuracy"]) for r in serial) > 0.5

    # resume from the command line: drop the dense row and one cell; only that cell is rerun
    kept = [r for r in read_rows(out / "sweep.csv") if r["method"] not in ("dense", "ifm")]
    write_rows(out / "sweep.csv", kept)
    result = CliRunner().invoke(app, ["sweep", "--preset", "quick", "--out", str(out), "--name",
                                      "sweep", "--ratios", "0.5", "--methods", ",".join(METHODS),
                                      "--ray", "local"])
    assert result.exit_code == 0, result.output
    assert not ray.is_initialized()
    assert " ifm " in result.output
    assert " sp-l1 " not in result.output and " fold-naive " not in result.output
    again = read_rows(out / "sweep.csv")
    assert again[: len(kept)] == kept
    assert sorted(r["method"] for r in again[len(kept):]) == ["dense", "ifm"]
    assert {_key(r) for r in read_rows(out / "sweep.csv")} == {_key(r) for r in serial}
    # nothing missing: no cell runs
    seen.clear()
    run_sweep(cfg, out, "sweep", log=log, ray="local")
    assert seen == [] and not ray.is_initialized()


def test_ray_sweep_without_ray_installed_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    cfg = dataclasses.replace(preset("quick"), ratios=[0.5], methods=["sp-l1"])
    with pytest.raises(FoldError, match=r"pip install 'modelfold\[ray\]'"):
        run_sweep(cfg, tmp_path, "sweep", ray="local")
    result = CliRunner().invoke(app, ["sweep", "--out", str(tmp_path), "--ray", "local"])
    assert result.exit_code == 2 and "modelfold[ray]" in result.output
