"""Save and load folded models: safetensors weights + a JSON manifest, no pickled classes."""

from modelfold.io.folder import load, save

__all__ = ["load", "save"]
