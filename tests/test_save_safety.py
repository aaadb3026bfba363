"""Saving never deletes a user's files, never loses the previous version, and leaves no litter:
foreign folders, interrupted and concurrent saves, symbolic links, a full disk."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import modelfold as mf
from conftest import make_model
from modelfold import files as atomic
from modelfold.io.folder import MANIFEST, WEIGHTS

SRC = Path(__file__).parent.parent / "src"
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def scratch(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_folder_with_a_stray_manifest_is_not_ours(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / MANIFEST).write_text("{}")
    (proj / "thesis.tex").write_text("years of work")
    with pytest.raises(mf.FoldError, match="not a modelfold folder"):
        mf.save(make_model("lenet5"), proj)
    assert (proj / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in proj.iterdir()) == [MANIFEST, "thesis.tex"]


def test_extra_files_in_a_modelfold_folder_are_never_deleted(tmp_path):
    model = make_model("lenet5")
    mf.save(model, tmp_path / "f")
    (tmp_path / "f" / "notes.md").write_text("mine")
    with pytest.raises(mf.FoldError, match=r"notes\.md"):
        mf.save(model, tmp_path / "f")
    assert (tmp_path / "f" / "notes.md").read_text() == "mine"
    (tmp_path / "f" / "notes.md").unlink()
    mf.save(model, tmp_path / "f")  # a clean modelfold folder is replaced
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == sorted([MANIFEST, WEIGHTS])
    assert scratch(tmp_path) == []


def test_an_empty_folder_is_filled(tmp_path):
    (tmp_path / "empty").mkdir()
    mf.save(make_model("lenet5"), tmp_path / "empty")
    assert (tmp_path / "empty" / WEIGHTS).is_file()


def test_a_symlinked_folder_keeps_its_link(tmp_path):
    real = tmp_path / "disk" / "models"
    mf.save(make_model("lenet5"), real)
    link = tmp_path / "latest"
    link.symlink_to(real, target_is_directory=True)
    second = make_model("lenet5", seed=3)
    mf.save(second, link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert torch.equal(mf.load(real)(X), second(X))


def test_stale_scratch_folders_of_killed_saves_are_cleaned(tmp_path):
    model = make_model("lenet5")
    mf.save(model, tmp_path / "f")
    for name in (".f.tmp-0123abcd", ".f.old-89abcdef"):
        (tmp_path / name).mkdir()
        (tmp_path / name / WEIGHTS).write_bytes(b"x" * 1000)
    (tmp_path / ".f.tmp-notours").mkdir()  # not our naming: never touched
    mf.save(model, tmp_path / "f")
    assert scratch(tmp_path) == [".f.tmp-notours"]


def test_a_kill_between_the_two_renames_never_loses_the_model(tmp_path, monkeypatch):
    """Where the directory swap is unavailable, a save killed after moving the old version
    aside leaves it as .NAME.old-*: load reads it, the next save restores and replaces it."""
    first, second = make_model("lenet5"), make_model("lenet5", seed=1)
    mf.save(first, tmp_path / "f")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def die_after_first_rename(src, dst):
        real_replace(src, dst)
        if ".old-" in str(dst):
            raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(atomic.os, "replace", die_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        mf.save(second, tmp_path / "f")
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert not (tmp_path / "f").exists()
    with pytest.warns(UserWarning, match="interrupted save"):
        assert torch.equal(mf.load(tmp_path / "f")(X), first(X))
    mf.save(second, tmp_path / "f")
    assert torch.equal(mf.load(tmp_path / "f")(X), second(X))
    assert scratch(tmp_path) == []


def test_data_is_fsynced_before_it_replaces_the_folder(tmp_path, monkeypatch):
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    mf.save(make_model("lenet5"), tmp_path / "f")
    assert len(synced) >= 4  # weights, manifest, the new folder, its parent


@pytest.mark.parametrize("where", ["weights", "manifest"])
def test_a_full_disk_is_a_fold_error_and_keeps_the_old_version(tmp_path, monkeypatch, where):
    import modelfold.io.folder as folder

    first = make_model("lenet5")
    mf.save(first, tmp_path / "f")
    if where == "weights":
        def full(*_, **__):
            raise SafetensorError("No space left on device (os error 28)")

        monkeypatch.setattr(folder, "save_model", full)
    else:
        def full(self, *_, **__):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(mf.FoldError, match=r"(?i)no space left|disk"):
        mf.save(make_model("lenet5", seed=1), tmp_path / "f")
    monkeypatch.undo()
    assert torch.equal(mf.load(tmp_path / "f")(X), first(X))
    assert scratch(tmp_path) == []


SAVER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    import modelfold as mf
    from modelfold.zoo import create_model

    path, start = Path(sys.argv[1]), int(sys.argv[2])
    model = create_model("lenet5", width=6)
    print("ready", flush=True)
    version = start
    while True:
        with torch.no_grad():
            model.fc3.bias.fill_(version)
        try:
            mf.save(model, path)
        except mf.FoldError as exc:  # another saver holds the lock
            print("busy" if "another process is saving" in str(exc) else exc, flush=True)
            continue
        print(version, flush=True)
        version += 1
""")


def _spawn(path: Path, start: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-c", SAVER, str(path), str(start)],
                            stdout=subprocess.PIPE, text=True, env=env)


def test_kill_9_at_random_points_keeps_the_last_completed_version(tmp_path):
    """A saver is killed at random moments 24 times; every time the folder loads, at the last
    version the saver reported (or the one it finished but had not reported yet)."""
    path, rng, version = tmp_path / "f", random.Random(0), 0
    for _ in range(24):
        proc = _spawn(path, version)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        done = [int(v) for v in out.split()]
        if done:
            version = done[-1] + 1
        if not path.exists() and atomic.interrupted_copy(path) is None:
            assert version == 0  # killed during the very first save
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an interrupted copy is announced
            saved = int(mf.load(path).fc3.bias[0].item())
        assert saved in (version - 1, version), (saved, version)
        version = saved + 1
    mf.save(make_model("lenet5"), path)  # the next save leaves no litter
    assert scratch(tmp_path) == []


def test_concurrent_saves_end_consistent_and_the_loser_is_told(tmp_path):
    path = tmp_path / "f"
    # a second writer is refused at once, naming the lock
    with atomic._exclusive(path), pytest.raises(
            mf.FoldError, match=r"another process is saving.*\.f\.lock"):
        mf.save(make_model("lenet5"), path)
    procs = [_spawn(path, start) for start in (0, 10_000)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    time.sleep(3.0)
    outputs = []
    for p in procs:
        p.send_signal(signal.SIGKILL)
        outputs.append(p.communicate()[0].split())
    assert all(line == "busy" or line.isdigit() for out in outputs for line in out)
    bias = mf.load(path).fc3.bias[0].item()
    assert bias == int(bias)  # one whole version, whichever writer finished last
    mf.save(make_model("lenet5"), path)
    assert scratch(tmp_path) == []
