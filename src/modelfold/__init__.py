"""modelfold: compress trained PyTorch models by folding (cluster -> merge -> repair).

Public API: `fold`, `save`, `load`, `register_factory`, `summary`, `FoldConfig`, `FoldError`.
"""

from modelfold.api import fold
from modelfold.config import FoldConfig
from modelfold.errors import FoldError
from modelfold.io import load, register_factory, save
from modelfold.summary import FoldSummary, summary
from modelfold.version import __version__

__all__ = [
           "FoldConfig",
           "FoldError",
           "FoldSummary",
           "__version__",
           "fold",
           "load",
           "register_factory",
           "save",
           "summary",
]
