"""Edit a saved folder as an attacker would: change the manifest, then recompute every checksum
(the manifest digest in the weights' safetensors header and the weights' SHA-256), so that only
modelfold's validation — not the checksums — stands between the edit and the model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from modelfold.io.folder import DIGEST_KEY, MANIFEST, WEIGHTS
from modelfold.io.manifest import canonical_sha256


def edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], Any], *, resign: bool = True
                  ) -> None:
    """Apply `edit` to the manifest; with `resign`, make every checksum agree again."""
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    if resign:
        resign_manifest(folder, manifest)
    path.write_text(json.dumps(manifest))


def resign_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    weights = folder / WEIGHTS
    try:
        digest = canonical_sha256(manifest)
    except (TypeError, ValueError):  # not JSON-able as canonical text: left unsigned
        return
    save_file(load_file(str(weights)), str(weights), metadata={DIGEST_KEY: digest})
    manifest["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()


def resign_hf(folder: Path, edit: Callable[[Path], Any], extra_files: list[str] = (),
              manifest_edit: Callable[[dict[str, Any]], Any] | None = None) -> None:
    """Edit a Hugging Face folder's files, then recompute the manifest's file checksums (and
    list `extra_files` too)."""
    edit(folder)
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    names = [*manifest["files_sha256"], *extra_files]
    manifest["files_sha256"] = {
        n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names
        if (folder / n).is_file()}
    if manifest_edit is not None:
        manifest_edit(manifest)
    path.write_text(json.dumps(manifest))
