"""Which architecture factories a saved folder may name.

A manifest names the factory that rebuilds the unfolded architecture as "package.module:callable".
Loading never imports a name read from a file unless the user trusts it: modelfold's own zoo
(`modelfold.zoo:create_model`, which only builds registered zoo models) and factories registered
in code with `register_factory` are always allowed; anything else needs `trust_factory=True` at
the call (CLI `--trust-factory`), in the spirit of Hugging Face's `trust_remote_code`.
"""

from __future__ import annotations

import importlib
import reprlib
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from modelfold.errors import FoldError, UntrustedFactoryError

ZOO_TARGET = "modelfold.zoo:create_model"
# The callable that built a model, kept beside its JSON spec so that saving a model that was
# loaded with `trust_factory=True` (or built from an explicit `factory=`) does not import the
# name again; runtime only, never written to a file.
FACTORY_FN_ATTR = "_modelfold_factory_fn"

_F = TypeVar("_F", bound=Callable[..., nn.Module])
_SHORT = reprlib.Repr()  # factory arguments in error messages: nested and long values cut
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxstring = 3, 8, 8, 80
_REGISTERED: dict[str, Callable[..., nn.Module]] = {}


def target_of(factory: Callable[..., Any]) -> str:
    """The "package.module:qualname" a manifest records for a callable."""
    return f"{factory.__module__}:{factory.__qualname__}"


def register_factory(factory: _F) -> _F:
    """Trust `factory` (a function or class building an unfolded model) for `load`.

    Use as a decorator in the module that defines your architecture::

        @modelfold.register_factory
        def build_net(width: int = 64) -> nn.Module: ...

    Folders saved with `save(model, path, factory=build_net)` then load in any process that
    imported that module, without `trust_factory=True`.
    """
    if not callable(factory):
        raise FoldError(f"register_factory: {factory!r} is not callable.")
    _REGISTERED[target_of(factory)] = factory
    return factory


def registered_factories() -> list[str]:
    return sorted(_REGISTERED)


def is_trusted(target: str) -> bool:
    return target == ZOO_TARGET or target in _REGISTERED


def is_importable_target(target: str) -> bool:
    """False for callables `load` in another process could never import (a script's
    `__main__`, a function defined inside another function)."""
    module, _, qualname = target.partition(":")
    return module != "__main__" and "<locals>" not in qualname and bool(module and qualname)


def resolve_factory(spec: dict[str, Any], where: str, *, trust: bool = False
                    ) -> Callable[..., nn.Module]:
    """The callable a manifest's factory spec names, importing it only when trusted."""
    target = spec.get("target")
    if not isinstance(target, str):
        raise FoldError(f"{where}: the factory target must be a string, got {target!r}.")
    if target == ZOO_TARGET:
        from modelfold.zoo import create_model

        kwargs = spec.get("kwargs")
        if isinstance(kwargs, dict) and kwargs.get("pretrained") not in (None, False):
            # the saved weights replace pretrained ones anyway; never read a file a folder names
            raise FoldError(f"{where}: the zoo factory's arguments name pretrained weights "
                            f"({kwargs['pretrained']!r}); a saved folder carries its own weights "
                            "and never reads another file.")

        return create_model
    if target in _REGISTERED:
        return _REGISTERED[target]
    if not trust:
        raise UntrustedFactoryError(
            f"{where} names the factory {target!r}, which is neither modelfold's zoo nor a "
            "registered factory; loading it would import and run that code. If you trust this "
            "folder, load it with trust_factory=True (command line: --trust-factory), register "
            "the builder in code with @modelfold.register_factory, or pass model= an unfolded "
            "instance of the architecture.", target=target, where=where)
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise FoldError(f"{where}: factory {target!r} is not 'package.module:callable'.")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # importing user code can raise anything
        raise FoldError(f"{where}: cannot import the factory {target!r} ({type(exc).__name__}: "
                        f"{exc}).") from exc
    if not callable(obj):
        raise FoldError(f"{where}: factory {target!r} is not callable.")
    return obj


def call_factory(factory: Callable[..., nn.Module], spec: dict[str, Any], where: str
                 ) -> nn.Module:
    """Build the unfolded architecture; any failure is a FoldError naming the factory."""
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise FoldError(f"{where}: the factory arguments must be a JSON object.")
    try:
        model = factory(**kwargs)
    except Exception as exc:  # building runs user code
        raise FoldError(f"{where}: the factory {spec.get('target')!r} failed with these "
                        f"arguments {_SHORT.repr(kwargs)} ({type(exc).__name__}: {exc})."
                        ) from exc
    if not isinstance(model, nn.Module):
        raise FoldError(f"{where}: the factory {spec.get('target')!r} returned "
                        f"{type(model).__name__}, not an nn.Module.")
    return model
