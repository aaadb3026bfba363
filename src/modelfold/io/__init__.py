"""Save and load folded models: safetensors weights + a JSON manifest, no pickled classes, no
code named by a file run unless trusted (`register_factory`, `trust_factory=True`)."""

from modelfold.io.folder import load, save
from modelfold.io.trust import register_factory

__all__ = ["load", "register_factory", "save"]
