"""Merge step: per-layer merge rules and applying a fold plan to the model.

Register a rule for a new kind of layer with `register_layer_handler(LayerHandler(...))`, or for
a new attention module with `register_attention_handler(AttentionHandler(...))`.
"""

from modelfold.graph.handlers import (
    AttentionHandler,
    LayerHandler,
    register_attention_handler,
    register_layer_handler,
)

__all__ = ["AttentionHandler", "LayerHandler", "register_attention_handler",
           "register_layer_handler"]
