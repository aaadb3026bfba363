"""`modelfold sweep --ray local`: cells as Ray tasks, streamed to the CSV, resumable."""

from __future__ import annotations

import dataclasses
import os

import pytest

from modelfold.eval.sweep import FIELDS, _key, preset, read_rows, run_sweep, write_rows

ray = pytest.importorskip("ray")

METHODS = ["fold-naive", "sp-l1", "ifm"]


def test_ray_sweep_matches_serial_streams_rows_and_resumes(tmp_path, monkeypatch):
    # the workers see these through the runtime_env that run_sweep gives a local instance
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("MODELFOLD_CACHE_ROOT", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # a local instance with num_cpus=2
    cfg = dataclasses.replace(preset("quick"), ratios=[0.5], methods=METHODS)
    # serial reference; it also trains the checkpoint into the temporary cache
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

    # resume: drop the dense row and one cell; the rerun computes only that cell
    kept = [r for r in read_rows(out / "sweep.csv") if r["method"] not in ("dense", "ifm")]
    write_rows(out / "sweep.csv", kept)
    seen.clear()
    again = run_sweep(cfg, out, "sweep", log=log, ray="local")
    assert not ray.is_initialized()
    assert len(seen) == 1 and " ifm " in seen[0][0]
    assert again[: len(kept)] == kept
    assert sorted(r["method"] for r in again[len(kept):]) == ["dense", "ifm"]
    assert {_key(r) for r in read_rows(out / "sweep.csv")} == {_key(r) for r in serial}
    # nothing missing: no Ray instance is started at all
    seen.clear()
    run_sweep(cfg, out, "sweep", log=log, ray="local")
    assert seen == [] and not ray.is_initialized()
