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
    """Torch-Pruning rule for the model-width (embedding) axis of an attention block that owns
    its output projection (Torch-Pruning then treats the whole block as one layer).

    Output channels are output-projection rows; input channels are q/k/v columns. The two are
    distinct, so Torch-Pruning couples them only through the residual stream, as it should. The
    head axis is folded separately (`AttentionHandler`).
    """

    def prune_out_channels(self, layer: nn.Module, idxs):
        tp.prune_linear_out_channels(_handler(layer).output(layer), idxs)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs):
        for proj in _handler(layer).projections(layer):
            tp.prune_linear_in_channels(proj, idxs)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return _handler(layer).output(layer).out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return _handler(layer).projections(layer)[0].in_features


def _attention_embed_tensors(m: nn.Module, role: str) -> list[TensorAxis]:
    handler = _handler(m)
    if role == "producer":
        return _weight_bias(handler.output(m), 0)
    return [(p.weight, 1) for p in handler.projections(m)]


@dataclass(frozen=True)
class AttentionHandler:
    """Folds whole heads of a self-attention module, described by its attribute names.

    The module holds the q/k/v projections (Linear attributes `q`, `k`, `v`), its number of
    heads (`heads_attr`) and head size (`dim_attr`). Head h owns rows [h*d, (h+1)*d) of q, k, v
    and the same columns of the output projection. Heads of a cluster are averaged on the q/k/v
    side and summed on the output side, so duplicated heads fold exactly and rotary embeddings
    (which act inside a head) stay consistent.

    The output projection is the module's attribute `o` when the module owns it (Torch-Pruning
    then sees the whole module as one layer, see `AttentionEmbedPruner`). With `o=None` the
    module ends at the attention output (BERT's BertSelfAttention, whose output projection is
    BertSelfOutput.dense): its projections are traced as plain Linears and the output projection
    is the Linear that consumes the attention output in the traced graph (`graph.groups`).
    `width_attrs` are attributes equal to heads x head size, updated with the head count.
    """

    name: str
    matches: Callable[[Any], bool]
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str | None = "o_proj"
    heads_attr: str = "num_heads"
    dim_attr: str = "head_dim"
    width_attrs: tuple[str, ...] = ()

    @property
    def owns_output(self) -> bool:
        return self.o is not None

    def num_heads(self, m: nn.Module) -> int:
        return int(getattr(m, self.heads_attr))

    def head_dim(self, m: nn.Module) -> int:
        return int(getattr(m, self.dim_attr))

    def projections(self, m: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return getattr(m, self.q), getattr(m, self.k), getattr(m, self.v)

    def output(self, m: nn.Module, out: nn.Module | None = None) -> nn.Linear:
        """The output projection: `out` (found in the traced graph) or the attribute `o`."""
        if out is not None:
            return out
        if self.o is None:
            raise FoldError(f"{type(m).__name__}: its output projection is found in the traced "
                            "graph (a head group's second slot); pass it as `out`.")
        return getattr(m, self.o)

    def head_blocks(self, m: nn.Module, out: nn.Module | None = None
                    ) -> list[tuple[torch.Tensor, int, str]]:
        """(tensor, axis, reduce) triples whose axis is heads x head_dim."""
        blocks = [(t, axis, "mean") for proj in self.projections(m)
                  for t, axis in _weight_bias(proj, 0)]
        blocks.append((self.output(m, out).weight, 1, "sum"))
        return blocks

    def remove_heads(self, m: nn.Module, drop: list[int], out: nn.Module | None = None) -> None:
        """Physically drop heads `drop` (their q/k/v rows and output-projection columns)."""
        d = self.head_dim(m)
        rows = [h * d + j for h in drop for j in range(d)]
        for proj in self.projections(m):
            tp.prune_linear_out_channels(proj, rows)
        tp.prune_linear_in_channels(self.output(m, out), rows)
        heads = self.num_heads(m) - len(drop)
        setattr(m, self.heads_attr, heads)
        for attr in self.width_attrs:
            setattr(m, attr, heads * d)


def _linears(m: Any, names: tuple[str, ...]) -> bool:
    return isinstance(m, nn.Module) and all(
        isinstance(getattr(m, n, None), nn.Linear) for n in names)


def _is_mha_like(m: Any) -> bool:
    if not _linears(m, ("q_proj", "k_proj", "v_proj", "o_proj")):
        return False
    heads, head_dim = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        return False
    kv_heads = getattr(m, "num_key_value_heads", heads)
    return kv_heads == heads and m.q_proj.out_features == heads * head_dim


def _is_bert_like(m: Any) -> bool:
    """BERT-style self-attention (BERT, RoBERTa, ELECTRA, ... in transformers): query/key/value
    Linears, num_attention_heads x attention_head_size == all_head_size, no output projection
    of its own and no grouped key/value heads."""
    if not _linears(m, ("query", "key", "value")) or hasattr(m, "num_key_value_groups"):
        return False
    heads, size = getattr(m, "num_attention_heads", None), getattr(m, "attention_head_size", None)
    if not isinstance(heads, int) or not isinstance(size, int) or isinstance(heads, bool):
        return False
    width = heads * size
    return (getattr(m, "all_head_size", width) == width
            and all(p.out_features == width for p in (m.query, m.key, m.value)))


_ATTENTION_HANDLERS: list[AttentionHandler] = [
    AttentionHandler("multi-head attention (q_proj/k_proj/v_proj/o_proj, num_heads, head_dim)",
                     _is_mha_like),
    AttentionHandler("BERT-style self-attention (query/key/value, num_attention_heads, "
                     "attention_head_size; output projection: the Linear reading its output)",
                     _is_bert_like, q="query", k="key", v="value", o=None,
                     heads_attr="num_attention_heads", dim_attr="attention_head_size",
                     width_attrs=("all_head_size",)),
]


def register_attention_handler(handler: AttentionHandler) -> None:
    """Add a head-folding rule; user rules go first so they win over the built-in ones."""
    _ATTENTION_HANDLERS.insert(0, handler)


def find_attention_handler(module: Any) -> AttentionHandler | None:
    for handler in _ATTENTION_HANDLERS:
        if handler.matches(module):
            return handler
    return None


def supported_attention() -> str:
    """The attention layouts whose heads are folded, for messages."""
    return "; ".join(h.name for h in _ATTENTION_HANDLERS)


def head_count_attrs() -> set[str]:
    """Attribute names holding a head count under some attention rule."""
    return {h.heads_attr for h in _ATTENTION_HANDLERS}


def _handler(m: nn.Module) -> AttentionHandler:
    handler = find_attention_handler(m)
    if handler is None:
        raise FoldError(f"{type(m).__name__} matches no attention rule; supported: "
                        f"{supported_attention()}.")
    return handler


def _owns_output(m: Any) -> bool:
    handler = find_attention_handler(m)
    return handler is not None and handler.owns_output


def attention_pruners(model: nn.Module) -> dict[type, tp.pruner.BasePruningFunc]:
    """Torch-Pruning rules for the attention module types in `model` that own their output
    projection (the others' projections are traced as plain Linears)."""
    return {type(m): AttentionEmbedPruner() for m in model.modules() if _owns_output(m)}


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
    LayerHandler("attention block (model width)", _owns_output, _attention_embed_tensors),
    LayerHandler("bare nn.Parameter (last dim)", lambda m: isinstance(m, nn.Parameter),
                 _param_tensors),
])


def slot_role(module: Any, handler_fn: Callable, graph: tp.DependencyGraph) -> str:
    """Producer if the dependency writes the channel (rows), consumer if it only reads it."""
    if graph.is_out_channel_pruning_fn(handler_fn):
        return "producer"
    return "consumer"
