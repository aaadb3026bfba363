"""Per-layer merge rules, in registries with first-match-wins dispatch (PEFT style).

A `LayerHandler` says which tensors of a module are indexed by a channel group, on which axis,
for each role: producer tensors are averaged over a cluster (the k-means centroid), consumer
tensors are summed (so duplicated channels are reproduced exactly). An `AttentionHandler` folds
whole attention heads. Register new rules with `register_layer_handler` /
`register_attention_handler`; they are tried before the built-in ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from modelfold.errors import FoldError

TensorAxis = tuple[torch.Tensor, int]


@dataclass(frozen=True)
class LayerHandler:
    """Merge rule for one kind of layer.

    `tensors(module, role)` lists (tensor, axis) pairs indexed by the group's channels;
    `merge_extra(module, fold)` handles what is neither a mean nor a sum (BN statistics).
    """

    name: str
    matches: Callable[[Any], bool]
    tensors: Callable[[Any, str], list[TensorAxis]]
    merge_extra: Callable[[Any, Callable[[torch.Tensor, int, str], torch.Tensor]], None] | None = (
        None
    )


_LAYER_HANDLERS: list[LayerHandler] = []


def register_layer_handler(handler: LayerHandler, *, first: bool = True) -> None:
    """Add a merge rule; user rules go first so they win over the built-in ones."""
    if first:
        _LAYER_HANDLERS.insert(0, handler)
    else:
        _LAYER_HANDLERS.append(handler)


def find_layer_handler(module: Any, name: str) -> LayerHandler:
    for handler in _LAYER_HANDLERS:
        if handler.matches(module):
            return handler
    supported = ", ".join(h.name for h in _LAYER_HANDLERS)
    raise FoldError(
        f"module {name!r} ({type(module).__name__}) shares channels with a folded group but "
        f"modelfold has no merge rule for it. Supported: {supported}. Pass "
        f"`ignored=[model.{name}]` to leave its groups unfolded, or register a rule with "
        "modelfold.merge.register_layer_handler."
    )


def _weight_bias(module: nn.Module, w_axis: int) -> list[TensorAxis]:
    out = [(module.weight, w_axis)]
    if getattr(module, "bias", None) is not None:
        out.append((module.bias, 0))
    return out


def _is_conv(m: Any) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd)


def _is_depthwise(m: Any) -> bool:
    return _is_conv(m) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _conv_tensors(m: nn.Module, role: str) -> list[TensorAxis]:
    out_axis, in_axis = (1, 0) if m.transposed else (0, 1)
    if role == "producer":
        return _weight_bias(m, out_axis)
    return [(m.weight, in_axis)]


def _linear_tensors(m: nn.Linear, role: str) -> list[TensorAxis]:
    return _weight_bias(m, 0) if role == "producer" else [(m.weight, 1)]


def _bn_tensors(m: nn.modules.batchnorm._BatchNorm, role: str) -> list[TensorAxis]:
    return _weight_bias(m, 0) if m.affine else []


def _bn_stats(m: nn.modules.batchnorm._BatchNorm, fold) -> None:
    """Average the normalisation maps z -> z/s_i - mu_i/s_i over a cluster (inverse-std rule).

    1/s' = mean(1/s_i) and mu'/s' = mean(mu_i/s_i), with s_i = sqrt(var_i + eps) (the reference
    code omitted eps). s' >= min s_i >= sqrt(eps), so var' = s'^2 - eps is never negative.
    """
    if m.running_var is None:
        return
    std = (m.running_var.double() + m.eps).sqrt()
    inv_std = fold(1.0 / std, 0, "mean")
    shift = fold(m.running_mean.double() / std, 0, "mean")
    new_std = 1.0 / inv_std
    m.running_var.copy_((new_std**2 - m.eps).clamp_min(0).to(m.running_var.dtype))
    m.running_mean.copy_((shift * new_std).to(m.running_mean.dtype))


def _ln_tensors(m: nn.LayerNorm, role: str) -> list[TensorAxis]:
    if len(m.normalized_shape) > 1:
        raise FoldError(f"LayerNorm over {tuple(m.normalized_shape)} normalises across channels "
                        "and positions together; only LayerNorm over the channel dim is supported."
                        " Pass it in `ignored=`.")
    if not m.elementwise_affine:
        return []
    out = [(m.weight, m.weight.ndim - 1)]
    if m.bias is not None:
        out.append((m.bias, m.bias.ndim - 1))
    return out


class AttentionEmbedPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning rule for an attention block's model-width (embedding) axis.

    Output channels are o_proj rows; input channels are q/k/v columns. The two are distinct, so
    Torch-Pruning couples them only through the residual stream, as it should. The head axis is
    folded separately (`AttentionHandler`).
    """

    def prune_out_channels(self, layer: nn.Module, idxs):
        tp.prune_linear_out_channels(layer.o_proj, idxs)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs):
        for proj in (layer.q_proj, layer.k_proj, layer.v_proj):
            tp.prune_linear_in_channels(proj, idxs)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.o_proj.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.q_proj.in_features


def _attention_embed_tensors(m: nn.Module, role: str) -> list[TensorAxis]:
    if role == "producer":
        return _weight_bias(m.o_proj, 0)
    return [(p.weight, 1) for p in (m.q_proj, m.k_proj, m.v_proj)]


@dataclass(frozen=True)
class AttentionHandler:
    """Folds whole heads of a self-attention module with q/k/v/o projections.

    Head h owns rows [h*d, (h+1)*d) of q, k, v and the same columns of o. Heads of a cluster are
    averaged on the q/k/v side and summed on the o side, so duplicated heads fold exactly and
    rotary embeddings (which act inside a head) stay consistent.
    """

    name: str
    matches: Callable[[Any], bool]

    @staticmethod
    def num_heads(m: nn.Module) -> int:
        return int(m.num_heads)

    @staticmethod
    def head_dim(m: nn.Module) -> int:
        return int(m.head_dim)

    @staticmethod
    def head_blocks(m: nn.Module) -> list[tuple[torch.Tensor, int, str]]:
        """(tensor, axis, reduce) triples whose axis is heads x head_dim."""
        blocks = [(t, axis, "mean") for proj in (m.q_proj, m.k_proj, m.v_proj)
                  for t, axis in _weight_bias(proj, 0)]
        blocks.append((m.o_proj.weight, 1, "sum"))
        return blocks

    @staticmethod
    def remove_heads(m: nn.Module, drop: list[int]) -> None:
        """Physically drop heads `drop` (their q/k/v rows and o columns)."""
        d = m.head_dim
        rows = [h * d + j for h in drop for j in range(d)]
        for proj in (m.q_proj, m.k_proj, m.v_proj):
            tp.prune_linear_out_channels(proj, rows)
        tp.prune_linear_in_channels(m.o_proj, rows)
        m.num_heads = m.num_heads - len(drop)


def _is_mha_like(m: Any) -> bool:
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if not isinstance(m, nn.Module) or not all(
        isinstance(getattr(m, n, None), nn.Linear) for n in names
    ):
        return False
    heads, head_dim = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        return False
    kv_heads = getattr(m, "num_key_value_heads", heads)
    return kv_heads == heads and m.q_proj.out_features == heads * head_dim


_ATTENTION_HANDLERS: list[AttentionHandler] = [
    AttentionHandler("multi-head attention (q_proj/k_proj/v_proj/o_proj, num_heads, head_dim)",
                     _is_mha_like),
]


def register_attention_handler(handler: AttentionHandler) -> None:
    _ATTENTION_HANDLERS.insert(0, handler)


def find_attention_handler(module: Any) -> AttentionHandler | None:
    for handler in _ATTENTION_HANDLERS:
        if handler.matches(module):
            return handler
    return None


def attention_pruners(model: nn.Module) -> dict[type, tp.pruner.BasePruningFunc]:
    """Torch-Pruning rules for the attention module types present in `model`."""
    return {type(m): AttentionEmbedPruner() for m in model.modules()
            if find_attention_handler(m) is not None}


def _param_tensors(p: nn.Parameter, role: str) -> list[TensorAxis]:
    # Bare parameters (ViT class token, position embedding): channel dim found by Torch-Pruning.
    return [(p, getattr(p, "_modelfold_dim", p.ndim - 1))]


def _unsupported(reason: str) -> Callable[[Any, str], list[TensorAxis]]:
    def fail(m: Any, role: str) -> list[TensorAxis]:
        raise FoldError(f"{type(m).__name__}: {reason}")

    return fail


_LAYER_HANDLERS.extend([
    LayerHandler("depthwise Conv (groups == channels)", _is_depthwise,
                 lambda m, role: _weight_bias(m, 1 if m.transposed else 0)),
    LayerHandler("grouped Conv (unsupported)", lambda m: _is_conv(m) and m.groups > 1,
                 _unsupported("grouped convolutions with 1 < groups < channels cannot be folded "
                              "yet; pass the module in `ignored=`.")),
    LayerHandler("Conv1d/2d/3d, ConvTranspose", _is_conv, _conv_tensors),
    LayerHandler("Linear", lambda m: isinstance(m, nn.Linear), _linear_tensors),
    LayerHandler("BatchNorm1d/2d/3d", lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm),
                 _bn_tensors, _bn_stats),
    LayerHandler("LayerNorm", lambda m: isinstance(m, nn.LayerNorm), _ln_tensors),
    LayerHandler("PReLU", lambda m: isinstance(m, nn.PReLU),
                 lambda m, role: [(m.weight, 0)] if m.num_parameters > 1 else []),
    LayerHandler("Embedding", lambda m: isinstance(m, nn.Embedding),
                 lambda m, role: [(m.weight, 1)]),
    LayerHandler("attention block (model width)", lambda m: find_attention_handler(m) is not None,
                 _attention_embed_tensors),
    LayerHandler("bare nn.Parameter (last dim)", lambda m: isinstance(m, nn.Parameter),
                 _param_tensors),
])


def slot_role(module: Any, handler_fn: Callable, graph: tp.DependencyGraph) -> str:
    """Producer if the dependency writes the channel (rows), consumer if it only reads it."""
    if graph.is_out_channel_pruning_fn(handler_fn):
        return "producer"
    return "consumer"
