"""Multiply-accumulates of one forward pass, counted on the aten ops that run.

`count_macs(model, x)` runs the model once under `torch.utils.flop_counter.FlopCounterMode`,
which sees every matrix product, convolution and attention kernel whatever Python code called
it (a conv subclass with its own `forward`, `F.conv2d` in user code, `@`, ...). FlopCounterMode
reports 2 FLOPs per multiply-accumulate for these ops, so MACs = FLOPs / 2. Bias additions,
normalisations and element-wise ops are not counted (as in the usual MAC tables).

`profile_macs` also says which MACs scale with which weight: an op taking a parameter (or a view
of one) as an operand does numel(parameter) x (positions it is applied at) MACs, so its count
follows the parameter's size when channels are removed; the other ops (attention products of
activations) are kept per innermost module. `modelfold.merge.apply.predicted_mac_count` reads
the folded model's MACs from that profile and the folded shapes, without running it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


@dataclass
class MacProfile:
    """MACs of one forward pass: `total`, split into `by_parameter` (id of a parameter -> MACs
    of the ops taking it as an operand) and `free` (innermost module name -> MACs of ops on
    activations only; "" = outside every submodule)."""

    total: int = 0
    by_parameter: dict[int, int] = field(default_factory=dict)
    free: dict[str, int] = field(default_factory=dict)


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass of `model` on `example_inputs` (a tensor, a
    tuple/list of tensors or a dict of keyword tensors), in eval mode, without gradients."""
    return profile_macs(model, example_inputs).total


def profile_macs(model: nn.Module, example_inputs: Any) -> MacProfile:
    """`count_macs` with the MACs attributed to parameters and modules (see `MacProfile`)."""
    profile = MacProfile()
    owners = _parameter_storages(model)
    stack = [""]

    def operands_counted(operands: tuple[Any, ...], macs: int) -> None:
        profile.total += macs
        ids = {owners.get(_storage(t)) for t in operands if isinstance(t, torch.Tensor)}
        ids.discard(None)
        if len(ids) == 1:  # a weight times activations: MACs follow the weight's size
            pid = ids.pop()
            profile.by_parameter[pid] = profile.by_parameter.get(pid, 0) + macs
        else:
            profile.free[stack[-1]] = profile.free.get(stack[-1], 0) + macs

    mapping = {op: _raw(formula, select, operands_counted)
               for op, (formula, select) in _formulas().items()}
    modes = [(m, m.training) for m in model.modules()]

    def enter(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            stack.append(name)
        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        with torch.no_grad(), _slow_attention(), FlopCounterMode(display=False,
                                                                  custom_mapping=mapping):
            run_model(model.eval(), example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return profile


def run_model(model: nn.Module, inputs: Any) -> Any:
    """`model` called on example inputs: a dict as keywords, a tuple / list as positional
    arguments, anything else as the one argument."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (list, tuple)) else model(inputs)


@contextlib.contextmanager
def _slow_attention() -> Iterator[None]:
    """nn.MultiheadAttention / nn.Transformer*Layer in eval mode under no_grad run one fused
    native kernel FlopCounterMode has no formula for; their unfused path is counted op by op."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _storage(t: torch.Tensor) -> int | None:
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return None
    return ptr or None  # meta tensors all report 0


def _parameter_storages(model: nn.Module) -> dict[int | None, int]:
    """Storage pointer -> id of the one parameter living there (shared storages map nowhere)."""
    owners: dict[int | None, int] = {}
    shared: set[int | None] = set()
    for p in {id(p): p for p in model.parameters()}.values():
        key = _storage(p)
        if key is None:
            continue
        if key in owners:
            shared.add(key)
        owners[key] = id(p)
    for key in shared:
        del owners[key]
    return owners


def _sdpa_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                **kwargs: Any) -> int:
    return sdpa_flop_count(tuple(query.shape), tuple(key.shape), tuple(value.shape))


def _formulas() -> dict[Any, tuple[Any, slice]]:
    """op -> (FLOP formula on the op's arguments and `out_val`, the arguments that are the
    multiplied operands)."""
    from torch.utils.flop_counter import flop_registry

    table = {}
    for op, select in ((aten.mm, slice(0, 2)), (aten.bmm, slice(0, 2)),
                       (aten.addmm, slice(1, 3)), (aten.baddbmm, slice(1, 3)),
                       (aten.convolution, slice(0, 2)), (aten._convolution, slice(0, 2)),
                       (aten.cudnn_convolution, slice(0, 2)),
                       (aten._slow_conv2d_forward, slice(0, 2)),
                       (aten.convolution_overrideable, slice(0, 2)),
                       (aten._scaled_dot_product_efficient_attention, slice(0, 3)),
                       (aten._scaled_dot_product_flash_attention, slice(0, 3)),
                       (aten._scaled_dot_product_cudnn_attention, slice(0, 3))):
        if op in flop_registry:
            table[op] = (flop_registry[op], select)
    # CPU attention kernels FlopCounterMode does not know (they would count nothing)
    for name in ("_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(aten, name, None)
        if op is not None:
            table.setdefault(op, (_sdpa_flops, slice(0, 3)))
    return table


def _raw(formula: Any, select: slice, counted: Any) -> Any:
    """A FlopCounterMode formula on the raw arguments: the FLOPs of `formula`, with the MACs
    (FLOPs / 2) reported to `counted` together with the operand tensors."""

    def count(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        flops = int(formula(*args, out_val=out_val, **kwargs))
        counted(tuple(args[select]), flops // 2)
        return flops

    count._get_raw = True  # type: ignore[attr-defined]
    return count
