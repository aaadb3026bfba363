"""Save and load folded models: safetensors weights + a JSON manifest, no pickled classes, no
code named by a file run unless trusted (`register_factory`, `trust_factory=True`)."""

from modelfold.io.folder import load, save
from modelfold.io.gguf import export_gguf
from modelfold.io.trust import register_factory

__all__ = ["export_gguf", "load", "register_factory", "save"]
