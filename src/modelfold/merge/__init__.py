"""Merging: apply a fold plan to a model (cluster means for producers, sums for consumers).

The per-layer rules live in `modelfold.graph.handlers` (group discovery needs them too); the
registration functions are re-exported here.
"""

from modelfold.graph.handlers import register_attention_handler, register_layer_handler

__all__ = ["register_attention_handler", "register_layer_handler"]
