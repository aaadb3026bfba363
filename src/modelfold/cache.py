"""modelfold's cache folder: ``$MODELFOLD_CACHE`` or ``~/.cache/modelfold``, one subfolder per use.

Subfolders: ``deep_inversion/`` (synthesised images), ``smollm2-135m-instruct-hf/`` (the
converted SmolLM2 folder) and, for the experiments of a source checkout, ``checkpoints/``
(trained Fashion-MNIST models). The former name ``MODELFOLD_CACHE_ROOT`` is still read, with a
DeprecationWarning, when ``MODELFOLD_CACHE`` is not set.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

__all__ = ["CACHE_ENV_VAR", "cache_root", "cache_subdir"]

CACHE_ENV_VAR = "MODELFOLD_CACHE"
_DEPRECATED_ENV_VAR = "MODELFOLD_CACHE_ROOT"


def cache_root() -> Path:
    """The cache root: ``$MODELFOLD_CACHE``, else (deprecated) ``$MODELFOLD_CACHE_ROOT``, else
    ``~/.cache/modelfold``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    old = os.environ.get(_DEPRECATED_ENV_VAR)
    if old:
        warnings.warn(f"{_DEPRECATED_ENV_VAR} is deprecated; set {CACHE_ENV_VAR} (the same "
                      "root folder) instead.", DeprecationWarning, stacklevel=2)
        return Path(old).expanduser()
    return Path.home() / ".cache" / "modelfold"


def cache_subdir(name: str) -> Path:
    """``cache_root() / name`` (not created)."""
    return cache_root() / name
