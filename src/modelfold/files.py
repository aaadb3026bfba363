"""The files of a saved folder: names, checksums, manifest reading, atomic replacement.

Shared by saving and loading (`modelfold.io`) and the streamed LLM fold (`modelfold.llm.stream`),
which writes the same Hugging Face folder; it imports only the package's foundation (errors,
record, version).

Replace a folder atomically, without ever losing it or deleting files we did not write:
`atomic_folder(path)` yields a temporary folder beside `path`; when the block succeeds its files
are fsync'ed and it takes `path`'s place, when it fails it is removed.

* One writer at a time: `.NAME.lock` beside the folder is locked (`fcntl.flock`, released by
  the kernel if the process dies); a second saver gets a FoldError at once.
* An existing folder is replaced only if `our_files` (by default `folder_files`) recognises it
  (a modelfold folder) and it holds nothing else; otherwise the save is refused, naming the
  extra files.
* On Linux the new folder and the old one swap places in one `renameat2(RENAME_EXCHANGE)`, so no
  moment exists without a complete folder at `path`. Elsewhere the old folder is first moved to
  `.NAME.old-*`; a save killed between the two renames is repaired by the next save (the old
  folder is moved back), and `load` reads the `.old-*` copy meanwhile (`interrupted_copy`).
* Temporary and old folders left by killed saves are removed by the next save.
* A symbolic link to a folder is followed: the folder it points to is replaced, the link stays.

The standard library has no directory swap and no lock that can be removed safely, hence the
hand-written helpers below.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from modelfold.errors import FoldError
from modelfold.record import LLMFoldRecord
from modelfold.version import __version__

FORMAT = "modelfold"  # `modelfold.save` of any module
HF_FORMAT = "modelfold-hf"  # a Hugging Face LLM folder
HF_FORMAT_VERSION = 2
MANIFEST = "modelfold.json"
WEIGHTS = "model.safetensors"
PLAIN_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$"  # file names a manifest may list
MAX_MANIFEST_BYTES = 64 << 20

_SUFFIX = r"[0-9a-f]{8}"


def _scratch(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


def _scratch_dirs(path: Path, kind: str) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{kind}-{_SUFFIX}")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    found = [p for p in entries if pattern.fullmatch(p.name) and p.is_dir()
             and not p.is_symlink()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def interrupted_copy(path: Path) -> Path | None:
    """The previous version of `path` when a save was killed between its two renames."""
    if path.exists():
        return None
    olds = _scratch_dirs(path, "old")
    return olds[0] if olds else None


def resolve_target(path: Path) -> Path:
    """Follow a symbolic link, so the folder it points to is replaced and the link kept."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextlib.contextmanager
def atomic_folder(path: Path, our_files: Callable[[Path], set[str]] | None = None
                  ) -> Iterator[Path]:
    """Write into the yielded folder; on success it replaces `path` (see the module doc).

    `our_files(folder)` returns the file names a modelfold folder's manifest accounts for, and
    raises FoldError when `folder` is not one; `folder_files` by default.
    """
    our_files = our_files or folder_files
    path = resolve_target(Path(path))
    if path.exists() and not path.is_dir():
        raise FoldError(f"save: {path} is a file; give a folder path.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FoldError(f"save: cannot write to {path.parent} ({exc.strerror}).") from exc
    with _exclusive(path):
        _repair(path)
        check_replaceable(path, our_files)
        try:
            tmp = _scratch(path, "tmp")
            tmp.mkdir()
        except OSError as exc:
            raise FoldError(f"save: cannot write to {path.parent} ({exc.strerror}).") from exc
        try:
            yield tmp
            _fsync_tree(tmp)
            check_replaceable(path, our_files)
            _swap_in(tmp, path)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FoldError(f"save: writing {path} failed ({exc.strerror or exc}); the previous "
                            "contents are unchanged.") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def check_replaceable(path: Path, our_files: Callable[[Path], set[str]]) -> None:
    """Refuse to replace a folder that is not ours or holds files we did not write."""
    if not path.exists():
        return
    present = {p.name for p in path.iterdir()}
    if not present:
        return
    try:
        ours = our_files(path)
    except FoldError as exc:
        raise FoldError(f"save: {path} exists and is not a modelfold folder ({exc}); refusing "
                        "to replace it. Choose another folder or remove it yourself.") from exc
    extra = sorted(present - ours)
    if extra:
        raise FoldError(f"save: {path} holds files modelfold did not write ({', '.join(extra[:5])}"
                        f"{', ...' if len(extra) > 5 else ''}); refusing to replace it. Move "
                        "them away or choose another folder.")


def _repair(path: Path) -> None:
    """Under the lock: bring back a folder lost between two renames, drop stale scratch."""
    olds = _scratch_dirs(path, "old")
    if olds and not path.exists():
        os.replace(olds.pop(0), path)
    for stale in olds + _scratch_dirs(path, "tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _swap_in(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous version
    else:
        old = _scratch(path, "old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside `path`, or raise FoldError if another process holds it."""
    lock = path.parent / f".{path.name}.lock"
    try:
        import fcntl
    except ImportError:  # Windows: filelock's portable lock (the lock file stays)
        from filelock import FileLock, Timeout

        try:
            with FileLock(lock, timeout=0):
                yield
        except Timeout:
            raise _busy(path, lock) from None
        return
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise FoldError(f"save: cannot write to {path.parent} ({exc.strerror}).") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _busy(path, lock) from None
        try:  # the previous holder may have removed the file between our open and flock
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _busy(path: Path, lock: Path) -> FoldError:
    return FoldError(f"save: another process is saving to {path} right now (it holds {lock}); "
                     "try again when it has finished.")


# --- names, checksums and manifests ----------------------------------------------------------


def sha256_file(file: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(file: Path, what: str = "load") -> Any:
    """Parse a JSON file; any failure (size, encoding, syntax, nesting) is a FoldError."""
    try:
        size = file.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise FoldError(f"{what}: {file} is {size:,} bytes, too large for a manifest.")
        return json.loads(file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FoldError(f"{what}: {file} is not valid JSON ({exc}).") from exc
    except RecursionError:
        raise FoldError(f"{what}: {file} is nested too deeply to be a manifest.") from None
    except OSError as exc:
        raise FoldError(f"{what}: cannot read {file} ({exc.strerror or exc}).") from exc


def hf_files(manifest: dict[str, Any]) -> set[str]:
    """Plain file names a Hugging Face manifest accounts for (see `folder_files`)."""
    files = manifest.get("files_sha256")
    if not isinstance(files, dict):
        raise FoldError("the manifest lists no files")
    return {name for name in files if isinstance(name, str) and re.match(PLAIN_NAME, name)}


def folder_files(folder: Path) -> set[str]:
    """The files of a modelfold (or Hugging Face) folder; FoldError if it is not one."""
    manifest = read_json(folder / MANIFEST, "save")
    if isinstance(manifest, dict) and manifest.get("format") == HF_FORMAT:
        return {MANIFEST, *hf_files(manifest)}
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
        return {MANIFEST, WEIGHTS}
    raise FoldError(f"{folder / MANIFEST} is not a modelfold manifest")


def write_hf_manifest(folder: Path, shapes: list[dict[str, int]],
                      record: LLMFoldRecord | None) -> None:
    """modelfold.json beside the weights: per-layer shapes, record, SHA-256 of every file."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format": HF_FORMAT,
        "format_version": HF_FORMAT_VERSION,
        "modelfold_version": __version__,
        "torch_version": torch.__version__,
        "layers": shapes,
        "files_sha256": {name: sha256_file(folder / name) for name in files},
        "record": record.to_dict() if record is not None else None,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
