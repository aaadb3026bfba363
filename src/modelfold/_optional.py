"""Imports of optional dependencies that name the extra to install when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from modelfold.errors import FoldError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise a FoldError naming ``pip install 'modelfold[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise FoldError(f"{purpose} needs {module.split('.')[0]} (the {extra} extra): "
                        f"pip install 'modelfold[{extra}]'.") from exc
