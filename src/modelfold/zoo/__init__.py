"""Model zoo: plain ``nn.Module`` definitions and a name -> constructor registry.

Register extra models from any module with the :func:`register_model` decorator::

    from modelfold.zoo import register_model

    @register_model("my_net")
    def my_net(num_classes: int = 10, in_channels: int = 3, width: int = 32) -> nn.Module: ...

"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from modelfold.record import FACTORY_ATTR
from modelfold.zoo import cnn

__all__ = ["MODEL_ZOO", "cnn", "create_model", "register_model", "vit"]

ModelFactory = Callable[..., nn.Module]
_F = TypeVar("_F", bound=ModelFactory)

MODEL_ZOO: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[_F], _F]:
    """Decorator adding a model constructor to :data:`MODEL_ZOO` under ``name``."""

    def decorator(fn: _F) -> _F:
        existing = MODEL_ZOO.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"model {name!r} is already registered")
        MODEL_ZOO[name] = fn
        return fn

    return decorator


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Instantiate the zoo model ``name`` with constructor keyword arguments ``kwargs``."""
    try:
        factory = MODEL_ZOO[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_ZOO))
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None
    model = factory(**kwargs)
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

# Imported after the registry exists so its decorator can register the model.
from modelfold.zoo import vit  # noqa: E402
