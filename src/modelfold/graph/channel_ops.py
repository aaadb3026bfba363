"""Which autograd ops keep channel identity on a folded axis, and where that axis lies.

Folding averages the producer rows of a cluster of channels and sums their consumer columns. That
is only valid if channel i written by a producer is still channel i when a consumer reads it.
Torch-Pruning's DependencyGraph maps modules, concat/split/slice/expand/unbind and reshapes, but
it has no notion of an op that reorders or mixes channels: every other autograd node becomes an
`_ElementWiseOp` that it assumes keeps channel i at index i. A flip, roll, gather, sort or custom
autograd Function between two layers then looks element-wise and the fold goes silently wrong.

So the ops a folded channel may pass through are listed here by hand, by autograd node name
(without the trailing overload number), and anything not listed makes its group unfoldable:

* point-wise ops (`_POINTWISE`) keep every element in place, whatever the axis;
* ops acting along given dims (flip, roll, sort, softmax, reductions, pooling, padding, ...)
  keep channel identity only when the channel axis is not one of those dims, so the channel
  axis is tracked through the graph (`Step`) from the layers that write it;
* layout ops (permute, transpose, (un)squeeze, select, stack, repeat) move the channel axis;
* Torch-Pruning's own concat/split/slice/expand/unbind/reshape nodes map channel indices, so
  they are trusted; only the axis is followed through them.

Axes are kept negative (counted from the end), which broadcasting leaves unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch_pruning as tp
from torch import nn

_OP = tp.ops.OPTYPE

# Element-wise maths, activations, casts and copies: every output element depends on the input
# elements at the same position (after broadcasting) only.
_POINTWISE = frozenset({
    # arithmetic
    "AddBackward", "SubBackward", "RsubBackward", "MulBackward", "DivBackward", "NegBackward",
    "PowBackward", "SqrtBackward", "RsqrtBackward", "ReciprocalBackward", "ExpBackward",
    "Exp2Backward", "Expm1Backward", "LogBackward", "Log2Backward", "Log10Backward",
    "Log1pBackward", "AbsBackward", "SignBackward", "SgnBackward", "ClampBackward",
    "ClampMinBackward", "ClampMaxBackward", "MaximumBackward", "MinimumBackward", "FmaxBackward",
    "FminBackward", "WhereBackward", "MaskedFillBackward", "AddcmulBackward", "AddcdivBackward",
    "LerpBackward", "FloorBackward", "CeilBackward", "RoundBackward", "TruncBackward",
    "FracBackward", "NanToNumBackward", "FmodBackward", "RemainderBackward", "HypotBackward",
    "Atan2Backward", "XlogyBackward", "SinBackward", "CosBackward", "TanBackward",
    "AsinBackward", "AcosBackward", "AtanBackward", "SinhBackward", "CoshBackward",
    "AsinhBackward", "AcoshBackward", "AtanhBackward", "ErfBackward", "ErfcBackward",
    "ErfinvBackward", "LogitBackward",
    # activations
    "ReluBackward", "GeluBackward", "SiluBackward", "SigmoidBackward", "TanhBackward",
    "HardtanhBackward", "HardsigmoidBackward", "HardswishBackward", "LeakyReluBackward",
    "EluBackward", "CeluBackward", "MishBackward", "SoftplusBackward", "SoftshrinkBackward",
    "HardshrinkBackward", "ThresholdBackward", "LogSigmoidBackward", "RreluWithNoiseBackward",
    "PreluKernelBackward",
    # dropout, copies, casts
    "NativeDropoutBackward", "FusedDropoutBackward", "CloneBackward", "ToCopyBackward",
    "AliasBackward",
})

# What torch.nn's own layers (Linear, Conv, norms, Embedding) run inside: a layer subclass with
# its own forward that runs anything else (besides point-wise ops) may reorder its channels.
_LAYER_INTERNALS = frozenset({
    "AddmmBackward", "MmBackward", "TBackward", "ViewBackward", "UnsafeViewBackward",
    "ReshapeAliasBackward", "ExpandBackward", "SqueezeBackward", "UnsqueezeBackward",
    "ConvolutionBackward", "ConvolutionBackwardOverrideable", "CudnnConvolutionBackward",
    "MkldnnConvolutionBackward", "NativeLayerNormBackward", "NativeBatchNormBackward",
    "CudnnBatchNormBackward", "MiopenBatchNormBackward", "NativeGroupNormBackward",
    "EmbeddingBackward",
})

# Ops acting independently along the dims they are given (`_saved_dim` / `_saved_dims`); the
# shape is unchanged.
_ALONG_DIMS = frozenset({
    "FlipBackward", "RollBackward", "IndexSelectBackward", "GatherBackward", "SortBackward",
    "TopkBackward", "CumsumBackward", "CumprodBackward", "CummaxBackward", "CumminBackward",
    "LogcumsumexpBackward", "SoftmaxBackward", "LogSoftmaxBackward", "GluBackward",
})

# Reductions over `_saved_dim` (all dims when absent), dropped unless `_saved_keepdim`.
_REDUCTIONS = frozenset({
    "MeanBackward", "SumBackward", "NansumBackward", "AmaxBackward", "AminBackward",
    "MaxBackward", "MinBackward", "StdBackward", "VarBackward", "StdMeanBackward",
    "VarMeanBackward", "LogsumexpBackward", "ProdBackward", "LinalgVectorNormBackward",
    "NormBackward", "MedianBackward", "NanmedianBackward", "ModeBackward", "KthvalueBackward",
})

# Pooling, upsampling and padding over the last 1, 2 or 3 (spatial) dims.
_SPATIAL = re.compile(r"^_?\w*?(Pool|Upsample|Pad)\w*?([123])D")


def op_name(grad_fn: Any) -> str:
    """The autograd node's name, e.g. "FlipBackward0" ("an unnamed autograd node" if none)."""
    try:
        return str(grad_fn.name())
    except Exception:
        return "an unnamed autograd node"


def layer_internal(grad_fn: Any) -> bool:
    """An op torch.nn layers run inside (or a point-wise one)."""
    base = _base(op_name(grad_fn))
    return base in _LAYER_INTERNALS or base in _POINTWISE


def _base(name: str) -> str:
    return name.rstrip("0123456789")


def _int(v: Any) -> int:
    """A saved int (negative dims are saved as unsigned 64-bit values)."""
    v = int(v)
    return v - (1 << 64) if v >= 1 << 63 else v


def _ints(v: Any) -> list[int]:
    if isinstance(v, (tuple, list)):
        return [_int(d) for d in v]
    return [_int(v)]


def _saved(grad_fn: Any, attr: str, default: Any = None) -> Any:
    try:
        return getattr(grad_fn, attr)
    except Exception:  # not saved by this op, or freed
        return default


def out_shape(grad_fn: Any) -> tuple[int, ...] | None:
    """Shape of the (first) tensor the op produced."""
    try:
        return tuple(int(s) for s in grad_fn._input_metadata[0].shape)
    except Exception:
        return None


def _in_shape(grad_fn: Any) -> tuple[int, ...] | None:
    sizes = _saved(grad_fn, "_saved_self_sym_sizes")
    if sizes is not None:
        return tuple(int(s) for s in sizes)
    this = _saved(grad_fn, "_saved_self")
    return tuple(this.shape) if this is not None and hasattr(this, "shape") else None


def module_axis(module: Any, ndim: int | None) -> int | None:
    """Negative channel axis of what `module` writes (and reads); None if unknown."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return -(len(module.kernel_size) + 1)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return -module._get_no_batch_dim()
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.PReLU)):
        return None if ndim is None else (1 - ndim if ndim >= 2 else -1)
    if isinstance(module, nn.Parameter):
        return None
    if isinstance(module, nn.Module):
        # Linear, LayerNorm, Embedding, attention (model width last), LSTM/GRU hidden size
        return -1
    return None


@dataclass
class Step:
    """What an op does to the channels flowing through it."""

    ok: bool
    axis: int | None = None  # negative channel axis of the op's output, None if unknown
    why: str = ""  # why not ok
    moves: bool = False  # the op moved the channel axis (permute, transpose, ...)


def _dims_of(grad_fn: Any, ndim: int, attr: str) -> list[int] | None:
    value = _saved(grad_fn, attr)
    if value is None:
        return None
    return [d % ndim for d in _ints(value)] if ndim else []


def through(grad_fn: Any, node_type: Any, axis: int | None) -> Step:
    """How channels on (negative) `axis` of the op's input leave the op `grad_fn`.

    `axis` None means the channel axis is not known there (e.g. after a flatten): ops that act
    along some dims are then refused, since they could act along the channels.
    """
    try:
        return _through(grad_fn, node_type, axis)
    except (IndexError, ValueError, TypeError):  # an axis that does not fit the recorded shapes
        return Step(False, why=f"the channel axis cannot be followed through {op_name(grad_fn)}")


def _through(grad_fn: Any, node_type: Any, axis: int | None) -> Step:
    name = op_name(grad_fn)
    base = _base(name)
    shape = out_shape(grad_fn)
    if node_type in (_OP.CONCAT, _OP.SPLIT, _OP.SLICE, _OP.EXPAND, _OP.OUTPUT):
        return Step(True, axis)  # same rank: the negative axis is unchanged
    if node_type == _OP.UNBIND:
        return _drop_dim(grad_fn, axis, None if shape is None else len(shape) + 1, name)
    if node_type == _OP.RESHAPE:
        return Step(True, _reshaped_axis(_in_shape(grad_fn), shape, axis))
    if node_type != _OP.ELEMENTWISE:
        return Step(False, why=f"{name} is not an op known to keep channel identity")
    if base in _POINTWISE:
        return Step(True, axis)
    if shape is None:
        return Step(False, why=f"the shape {name} produced is unknown")
    ndim = len(shape)
    if base in _ALONG_DIMS:
        dims = _dims_of(grad_fn, ndim, "_saved_dims" if base in ("FlipBackward", "RollBackward")
                        else "_saved_dim")
        if dims is None:
            return Step(False, why=f"{name} acts along dims that are not recorded")
        if base == "RollBackward" and not dims:
            dims = list(range(ndim))  # roll without dims shifts the flattened tensor
        step = _along(name, dims, axis, ndim)
        if step.ok and base == "GatherBackward":
            source = _in_shape(grad_fn)
            if source is None or source[axis] != shape[axis]:
                return Step(False, why=f"{name} changes the number of channels")
        return step
    if base in _REDUCTIONS:
        keep = bool(_saved(grad_fn, "_saved_keepdim", False))
        source = _in_shape(grad_fn)
        raw = _saved(grad_fn, "_saved_dim")
        if source is None:
            if keep:
                source = shape
            elif raw is not None:
                source = (0,) * (ndim + len(set(_ints(raw))))
            else:
                return Step(False, why=f"{name} reduces the whole tensor, channels included")
        dims = [d % len(source) for d in _ints(raw)] if raw is not None else []
        if not dims:  # no dim (or an empty dim list): a reduction over everything
            dims = list(range(len(source)))
        step = _along(name, dims, axis, len(source))
        if step.ok and not keep:
            step.axis = axis + sum(1 for d in set(dims) if d > axis + len(source))
        return step
    match = _SPATIAL.match(base)
    if match:
        k = int(match.group(2))
        return _along(name, list(range(ndim - k, ndim)), axis, ndim)
    if base == "ConstantPadNdBackward":
        pad = _saved(grad_fn, "_saved_pad")
        if pad is None:
            return Step(False, why=f"{name} pads dims that are not recorded")
        return _along(name, list(range(ndim - len(pad) // 2, ndim)), axis, ndim)
    return _layout(grad_fn, name, base, shape, axis)


def _along(name: str, dims: list[int], axis: int | None, ndim: int) -> Step:
    if axis is None:
        return Step(False, why=f"{name} acts along dims {sorted(d - ndim for d in dims)} and the "
                               "channel axis is not known there")
    if not -ndim <= axis < 0:
        raise IndexError(axis)
    if axis + ndim in dims:
        return Step(False, why=f"{name} acts along the channel axis (dim {axis}) and can "
                               "reorder or mix channels")
    return Step(True, axis)


def _drop_dim(grad_fn: Any, axis: int | None, in_ndim: int | None, name: str) -> Step:
    """An op removing one dim (select, unbind): refused if it is the channel axis."""
    if in_ndim is None:
        return Step(False, why=f"the shape {name} acts on is unknown")
    dims = _dims_of(grad_fn, in_ndim, "_saved_dim")
    if dims is None or len(dims) != 1:
        return Step(False, why=f"{name} acts along a dim that is not recorded")
    if axis is None:
        return Step(False, why=f"{name} removes dim {dims[0] - in_ndim} and the channel axis is "
                               "not known there")
    pos = axis + in_ndim
    if pos < 0:
        raise IndexError(axis)
    if dims[0] == pos:
        return Step(False, why=f"{name} takes a single channel out of the channel axis")
    return Step(True, axis + 1 if dims[0] > pos else axis, moves=dims[0] > pos)


def _layout(grad_fn: Any, name: str, base: str, shape: tuple[int, ...], axis: int | None) -> Step:
    ndim = len(shape)
    if base == "SelectBackward":
        source = _in_shape(grad_fn)
        return _drop_dim(grad_fn, axis, None if source is None else len(source), name)
    if base in ("PermuteBackward", "TransposeBackward", "TBackward", "UnsqueezeBackward",
                "SqueezeBackward", "StackBackward", "RepeatBackward"):
        if axis is None:
            if base in ("UnsqueezeBackward", "SqueezeBackward", "StackBackward"):
                return Step(True, None, moves=True)  # adds or drops a size-1 dim
            # after a reshape that split the channel axis, a permute reorders channels (a
            # channel shuffle: view -> transpose -> view), which Torch-Pruning does not map
            return Step(False, why=f"{name} moves dims and the channel axis is not known there "
                                   "(a reshape before it may have split the channels)")
    else:
        return Step(False, why=f"{name} is not an op known to keep channel identity")
    in_ndim = ndim - 1 if base in ("UnsqueezeBackward", "StackBackward") else ndim
    if base in ("SqueezeBackward", "RepeatBackward"):
        source = _in_shape(grad_fn)
        if source is None:
            return Step(False, why=f"the shape {name} acts on is unknown")
        in_ndim = len(source)
    if not -in_ndim <= axis < 0:
        raise IndexError(axis)
    if base == "PermuteBackward":
        dims = _dims_of(grad_fn, ndim, "_saved_dims")
        if dims is None:
            return Step(False, why=f"{name}: permutation not recorded")
        return Step(True, dims.index(axis + ndim) - ndim, moves=True)
    if base in ("TransposeBackward", "TBackward"):
        if base == "TBackward":
            d0, d1 = 0, ndim - 1
        else:
            d0, d1 = (_int(_saved(grad_fn, a, 0)) % ndim for a in ("_saved_dim0", "_saved_dim1"))
        pos = axis + ndim
        pos = d1 if pos == d0 else d0 if pos == d1 else pos
        return Step(True, pos - ndim, moves=True)
    if base == "UnsqueezeBackward":  # dim is counted on the output
        dims = _dims_of(grad_fn, ndim, "_saved_dim")
        if dims is None:
            return Step(False, why=f"{name}: dim not recorded")
        in_pos = axis + ndim - 1
        return Step(True, (in_pos + (dims[0] <= in_pos)) - ndim, moves=True)
    if base == "StackBackward":  # a new dim of the output, channels keep their index
        dims = _dims_of(grad_fn, ndim, "_saved_dim")
        if dims is None:
            return Step(False, why=f"{name}: dim not recorded")
        in_pos = axis + ndim - 1
        return Step(True, (in_pos + (dims[0] <= in_pos)) - ndim, moves=True)
    pos = axis + len(source)
    if base == "RepeatBackward":
        repeats = _ints(_saved(grad_fn, "_saved_repeats", ()))
        if repeats[len(repeats) - len(source) + pos] != 1:
            return Step(False, why=f"{name} repeats the channel axis")
        return Step(True, axis)
    # squeeze: drops size-1 dims (all, one or several)
    raw = _saved(grad_fn, "_saved_dim")
    dims = (list(range(len(source))) if raw is None
            else [d % len(source) for d in _ints(raw)])
    gone = [d for d in dims if source[d] == 1 and d != pos]
    if pos in dims and source[pos] == 1:
        return Step(False, why=f"{name} squeezes the channel axis")
    return Step(True, axis + sum(1 for d in gone if d > pos), moves=True)


def _reshaped_axis(before: tuple[int, ...] | None, after: tuple[int, ...] | None,
                   axis: int | None) -> int | None:
    """Where a reshape leaves the channel axis: kept if the dims up to it, or from it to the end,
    are unchanged; else unknown (e.g. merged into a flattened axis, which Torch-Pruning maps)."""
    if axis is None or before is None or after is None:
        return None
    pos = axis + len(before)
    if pos < 0:
        return None
    if len(after) > pos and tuple(after[:pos + 1]) == tuple(before[:pos + 1]):
        return pos - len(after)
    tail = before[pos:]
    if len(after) >= len(tail) and tuple(after[len(after) - len(tail):]) == tuple(tail):
        return axis
    return None
