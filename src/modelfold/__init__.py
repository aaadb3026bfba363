"""modelfold: compress trained PyTorch models by folding (cluster -> merge -> repair).

Public API: `fold`, `save`, `load`, `export_gguf`, `register_factory`, `summary`,
`FoldConfig` (graph path), `LLMFoldConfig` (Hugging Face causal LMs), `register_pipeline`,
`reuse_traces` (one trace for many folds of a model), `FoldError`.
"""

from modelfold.api import fold
from modelfold.config import FoldConfig, register_pipeline
from modelfold.errors import FoldError
from modelfold.graph.reuse import reuse_traces
from modelfold.io import export_gguf, load, register_factory, save
from modelfold.llm.config import LLMFoldConfig
from modelfold.summary import FoldSummary, summary
from modelfold.version import __version__

__all__ = [
           "FoldConfig",
           "FoldError",
           "FoldSummary",
           "LLMFoldConfig",
           "__version__",
           "export_gguf",
           "fold",
           "load",
           "register_factory",
           "register_pipeline",
           "reuse_traces",
           "save",
           "summary",
]
