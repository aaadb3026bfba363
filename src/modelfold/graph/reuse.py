"""One trace for many folds of the same model: `reuse_traces()`.

Tracing the dependency graph is a forward pass plus a walk over the autograd graph (5-15 % of
a CNN fold). Folding one model at many ratios (a sweep, a `target_latency` search) traced the
same graph every time. Inside `with reuse_traces():` the graph path traces a model once per
(structure, example-input shapes, ignored modules, device) and gives every later fold a copy of
the model together with its channel groups, copied in one `copy.deepcopy` so that the groups
point at the copy's modules. Written here because Torch-Pruning cannot re-bind a
`DependencyGraph` to a copied model.

A model whose weights change inside the block is folded with its current weights (they are
loaded into the copy); a change of structure that keeps every module's name, type and
parameter shapes (a replaced `forward`, say) is not seen, so leave the block first.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from modelfold.graph.groups import GroupDiscovery

# key -> (the model, an unfolded traced copy, its groups); None outside reuse_traces()
_CACHE: ContextVar[dict[tuple, tuple[nn.Module, nn.Module, GroupDiscovery]] | None] = \
    ContextVar("modelfold_traces", default=None)


@contextmanager
def reuse_traces() -> Iterator[None]:
    """Trace each model once for all the folds inside the block (graph path and structured
    baselines; nested blocks share the outer one's traces). The traces, with a copy of every
    traced model, are dropped when the block ends."""
    if _CACHE.get() is not None:
        yield
        return
    token = _CACHE.set({})
    try:
        yield
    finally:
        _CACHE.reset(token)


def reused_trace(model: nn.Module, inputs: Any, ignored_names: list[str],
                 device: torch.device) -> tuple[nn.Module, GroupDiscovery] | None:
    """(a fresh copy of `model` on `device`, its groups) from a trace kept by `keep_trace`, or
    None outside `reuse_traces()` or when none fits."""
    cache = _CACHE.get()
    entry = None if cache is None else cache.get(_key(model, inputs, ignored_names, device))
    if entry is None:
        return None
    work, discovery = _copy_together(entry[1], entry[2])
    with torch.no_grad():
        work.load_state_dict(model.state_dict())
    return work, discovery


def keep_trace(model: nn.Module, inputs: Any, ignored_names: list[str], device: torch.device,
               work: nn.Module, discovery: GroupDiscovery) -> None:
    """Keep an unfolded copy of `work` (a copy of `model`) and its groups `discovery` for the
    next fold of `model` inside `reuse_traces()`; nothing outside it."""
    cache = _CACHE.get()
    if cache is None:
        return
    try:
        kept = _copy_together(work, discovery)
    except Exception:  # an object in the graph deepcopy cannot copy: trace again next time
        return
    # the model itself is held so that its id is not reused while the entry lives
    cache[_key(model, inputs, ignored_names, device)] = (model, *kept)


def _copy_together(model: nn.Module, discovery: GroupDiscovery
                   ) -> tuple[nn.Module, GroupDiscovery]:
    """Deep copies of `model` and `discovery` in which the groups and the graph refer to the
    copied modules. The graph's pruning rules, op table and autograd nodes are shared (they
    identify ops, hold no per-model state)."""
    graph = discovery.graph
    shared: list[Any] = [graph.ops, *graph.REGISTERED_PRUNERS.values(),
                         *graph.CUSTOMIZED_PRUNERS.values()]
    shared += [node.grad_fn for node in graph.module2node.values() if node.grad_fn is not None]
    memo = {id(obj): obj for obj in shared}
    work, copied = copy.deepcopy((model, discovery), memo)
    names = {id(m): n for n, m in work.named_modules()}
    names.update({id(p): n for n, p in work.named_parameters()})
    copied.module_names = names
    return work, copied


def _key(model: nn.Module, inputs: Any, ignored_names: list[str], device: torch.device
         ) -> tuple:
    """What a trace depends on: the model (identity and structure), the inputs' shapes and
    types, the ignored modules and the device."""
    structure = tuple(
        (name, type(m).__qualname__,
         tuple((k, tuple(t.shape), t.dtype) for k, t in (*m._parameters.items(),
                                                         *m._buffers.items()) if t is not None))
        for name, m in model.named_modules())
    return (id(model), structure, _spec(inputs), tuple(sorted(ignored_names)), str(device))


def _spec(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype)
    if isinstance(x, dict):
        return tuple((k, _spec(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return tuple(_spec(v) for v in x)
    return repr(x)
