"""modelfold: compress trained PyTorch models by folding (cluster -> merge -> repair).

Public API: `fold`, `save`, `load`, `summary`, `FoldConfig`, `FoldError`.
"""

from modelfold.api import fold
from modelfold.config import FoldConfig
from modelfold.errors import FoldError
from modelfold.io import load, save
from modelfold.summary import FoldSummary, summary

__version__ = "0.1.0"
__all__ = [
           "FoldConfig",
           "FoldError",
           "FoldSummary",
           "__version__",
           "fold",
           "load",
           "save",
           "summary",
]
