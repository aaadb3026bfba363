"""Derive coupled channel groups from the traced graph with Torch-Pruning's DependencyGraph.

Torch-Pruning already propagates "same channel index" through residual adds, norms, flatten
(channel -> channel x spatial block), concat/split and depthwise convs. We reuse its groups and
only add what folding needs on top: each slot's role (producer rows are averaged, consumer
columns are summed), the root channel every local index belongs to, attention-head groups, and
the check Torch-Pruning lacks: that every op on a group's channels keeps channel identity (it
treats ops it does not map as element-wise; see `channel_ops`), else the group is `unsafe`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from modelfold.errors import FoldError
from modelfold.graph.channel_ops import (
    Step,
    layer_internal,
    module_axis,
    op_name,
    out_shape,
    through,
)
from modelfold.graph.handlers import (
    AttentionHandler,
    attention_pruners,
    find_attention_handler,
    find_layer_handler,
    slot_role,
)
from modelfold.graph.layout import SlotLayout

Role = Literal["producer", "consumer"]


@dataclass
class Slot:
    """One module (or bare parameter) whose axis is indexed by a group's channels."""

    name: str
    module: Any  # nn.Module or nn.Parameter
    role: Role
    idxs: list[int]  # local indices along the folded axis
    root_idxs: list[int]  # group channel of every local index (flatten repeats a channel)


@dataclass
class ChannelGroup:
    """n channels shared by several tensor slots; folded with one clustering.

    kind="channels": a Torch-Pruning group rooted at `root` (its output channels).
    kind="heads": the heads of one attention module (units of head_dim rows); its first slot is
    the attention module, a second one its output projection when the module does not own it.
    """

    name: str
    n: int
    kind: Literal["channels", "heads"] = "channels"
    slots: list[Slot] = field(default_factory=list)
    folds_output: bool = False  # touches the network output: never folded
    ignored_by: str | None = None  # name of an ignored module inside the group
    unsafe: str | None = None  # why merging this group would not be a valid fold

    @property
    def foldable(self) -> bool:
        return (not self.folds_output and self.ignored_by is None and self.unsafe is None
                and self.n > 1)

    def module_names(self) -> list[str]:
        return [s.name for s in self.slots]

    def attention(self) -> tuple[AttentionHandler, nn.Module, nn.Module | None]:
        """(rule, attention module, output projection found in the graph or None) of a head
        group."""
        module = self.slots[0].module
        handler = find_attention_handler(module)
        if self.kind != "heads" or handler is None:
            raise FoldError(f"group {self.name!r} is not a head group of a known attention rule")
        out = self.slots[1].module if len(self.slots) > 1 else None
        return handler, module, out

    def head_blocks(self) -> list[tuple[torch.Tensor, int, str]]:
        """(tensor, axis, reduce) triples of a head group, each axis heads x head_dim."""
        handler, module, out = self.attention()
        return handler.head_blocks(module, out)

    def head_dim(self) -> int:
        handler, module, _ = self.attention()
        return handler.head_dim(module)


@dataclass
class GroupDiscovery:
    """The dependency graph and every channel group of a model."""

    graph: tp.DependencyGraph
    groups: list[ChannelGroup]
    module_names: dict[int, str]

    def refresh(self, group: ChannelGroup) -> ChannelGroup:
        """Re-derive a channel group's slots on the model's current shapes.

        Folding another group may have shifted local indices (e.g. concat offsets), so the slots
        are recomputed right before a group is merged.
        """
        if group.kind != "channels":
            return group
        root = group.slots[0]
        fresh = _slots_of(self.graph, self.graph.get_pruning_group(
            root.module, _root_fn(self.graph, root.module), list(range(group.n))
        ), self.module_names)
        return ChannelGroup(group.name, group.n, group.kind, fresh, group.folds_output,
                            group.ignored_by, group.unsafe)


def _root_fn(graph: tp.DependencyGraph, module: nn.Module):
    return graph.get_pruner_of_module(module).prune_out_channels


def _slots_of(graph: tp.DependencyGraph, tp_group, names: dict[int, str]) -> list[Slot]:
    slots: list[Slot] = []
    for item in tp_group.items:
        target = item.dep.target
        if target.type in _DUMMY_OPS:
            continue
        module = target.module
        name = names.get(id(module), target.name or repr(module))
        role = slot_role(module, item.dep.handler, graph)
        if target.type == tp.ops.OPTYPE.PARAMETER:
            # Torch-Pruning's channel dim of a bare parameter; read by its merge rule
            module._modelfold_dim = target.pruning_dim % module.ndim
        slots.append(Slot(name, module, role, list(item.idxs), list(item.root_idxs)))
    return slots


_DUMMY_OPS = {
    tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.RESHAPE,
    tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.EXPAND, tp.ops.OPTYPE.SLICE, tp.ops.OPTYPE.OUTPUT,
}


def _touches_output(graph: tp.DependencyGraph, tp_group, output_fns: set) -> bool:
    """True when a tensor written by the group is (part of) the network output, including
    outputs that are also consumed inside the model."""
    for item in tp_group.items:
        node = item.dep.target
        if not graph.is_out_channel_pruning_fn(item.dep.handler):
            continue
        if len(node.outputs) == 0 or node.grad_fn in output_fns:
            return True
    return False


# Layers fed by the network input that fold their *output* channels only; any other op there
# (depthwise conv, BN, LayerNorm on the input) ties the group to the input channels.
_INPUT_PRODUCERS = {tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR, tp.ops.OPTYPE.EMBED,
                    tp.ops.OPTYPE.PARAMETER}


def _touches_input(tp_group) -> bool:
    for item in tp_group.items:
        node = item.dep.target
        if node.inputs or node.type in _DUMMY_OPS:
            continue
        fn = item.dep.handler
        if node.type not in _INPUT_PRODUCERS or getattr(fn, "__name__", "") != "prune_out_channels":
            return True
    return False


# A flatten after these scatters a channel over non-contiguous positions of the flat axis.
_LAYOUT_OPS = ("permutebackward", "transposebackward")


def _op_name(node) -> str:
    return str(getattr(node.module, "_grad_fn", "") or "").lower()


def _internal_ops(graph: tp.DependencyGraph, handled: list[nn.Module]) -> set[int]:
    """Dummy-op nodes inside handled attention modules (their head mixing is folded per head)."""
    inside: set[int] = set()
    for module in handled:
        node = graph.module2node.get(module)
        stack = list(node.inputs) if node is not None else []
        while stack:
            n = stack.pop()
            if n.type not in _DUMMY_OPS or id(n) in inside:
                continue
            inside.add(id(n))
            stack.extend(n.inputs)
    return inside


def _unsafe_reason(graph: tp.DependencyGraph, tp_group, slots: list[Slot], n: int,
                   internal: set[int], owners: dict[Any, nn.Module],
                   names: dict[int, str]) -> str | None:
    for slot in slots:
        if len(set(slot.idxs)) < len(slot.idxs):
            return f"an op combines several channels into one input position of {slot.name!r}"
    problem = _flow_problem(graph, tp_group, internal, owners, names)
    if problem is not None:
        return problem
    ops = [item.dep.target for item in tp_group.items
           if item.dep.target.type in _DUMMY_OPS and id(item.dep.target) not in internal]
    if any(len(s.idxs) > n for s in slots):  # a channel spans several positions (flatten)
        for node in ops:
            name = _op_name(node)
            if name.startswith(_LAYOUT_OPS):
                return (f"channels are flattened after a {name.removesuffix('backward0')}, so "
                        "their positions are not contiguous blocks")
    return None


def _flow_problem(graph: tp.DependencyGraph, tp_group, internal: set[int],
                  owners: dict[Any, nn.Module], names: dict[int, str]) -> str | None:
    """Why the group's channels do not keep their identity from producers to consumers.

    Follows the channel axis from every layer writing the group through the ops Torch-Pruning
    treats as element-wise (see `channel_ops`): an op that is not known to keep channel
    identity, or that acts along the channel axis, refuses the group, and so does a layer that
    reads the channels on another axis than the one they arrive on (e.g. after a transpose).
    Nodes in `internal` (inside handled attention modules or inside a torch.nn layer) are the
    layers' own business and are not checked.
    """
    carriers: dict[int, Any] = {}  # nodes whose output holds the group's channels
    members: set[int] = set()  # modules (and parameters) indexed by the group
    for item in tp_group.items:
        node = item.dep.target
        if node.type not in _DUMMY_OPS:
            members.add(id(node.module))
        if node.type in _DUMMY_OPS or graph.is_out_channel_pruning_fn(item.dep.handler):
            carriers[id(node)] = node
    axis: dict[int, int | None] = {}
    moved: dict[int, str | None] = {}  # last op that moved the channel axis on the way
    for node in _post_order(carriers):
        key = id(node)
        ins = [i for i in node.inputs if id(i) in carriers]
        axis[key], moved[key] = None, None
        if node.type not in _DUMMY_OPS:
            axis[key] = _node_axis(node)
            continue
        if key in internal or not ins:  # a layer's inner op, or fed by no carrier (a weight)
            continue
        known = [i for i in ins if axis.get(id(i)) is not None]
        src = known[0] if known else ins[0]
        step: Step = through(node.grad_fn, node.type, axis[id(src)])
        if not step.ok:
            return (f"{step.why} (between {_around(node, False, owners, names)} and "
                    f"{_around(node, True, owners, names)})")
        axis[key] = step.axis
        moved[key] = op_name(node.grad_fn) if step.moves else moved[id(src)]
    for node in carriers.values():
        here = axis.get(id(node))
        if here is None or id(node) in internal:
            continue
        shape = out_shape(node.grad_fn)
        for out in node.outputs:
            module = _owner(out, owners)
            if module is None or id(module) not in members or isinstance(module, nn.Parameter):
                continue
            reads = module_axis(module, None if shape is None else len(shape))
            if reads is not None and reads != here:
                name = names.get(id(module), type(module).__name__)
                after = f" after {moved[id(node)]}" if moved.get(id(node)) else ""
                return (f"the channels of {_around(out, False, owners, names)} reach {name!r} on "
                        f"axis {here}{after}, but {name!r} reads its channels on axis {reads}")
    return None


def _post_order(nodes: dict[int, Any]) -> list[Any]:
    """`nodes` with every node after its inputs among `nodes` (iterative: graphs are deep)."""
    order: list[Any] = []
    seen: set[int] = set()
    for start in nodes.values():
        stack = [(start, False)]
        while stack:
            node, done = stack.pop()
            if done:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((i, False) for i in node.inputs if id(i) in nodes and id(i) not in seen)
    return order


def _node_axis(node) -> int | None:
    """Negative channel axis of what a layer (or bare parameter) node writes."""
    if node.type == tp.ops.OPTYPE.PARAMETER:
        p = node.module
        return node.pruning_dim % p.ndim - p.ndim if p.ndim else None
    shape = out_shape(node.grad_fn)
    return module_axis(node.module, None if shape is None else len(shape))


def _owner(node, owners: dict[Any, nn.Module]) -> Any:
    """The layer a node is, or whose inner op it is; None for a free-standing op."""
    if node.type == tp.ops.OPTYPE.OUTPUT:
        return None
    if node.type not in _DUMMY_OPS:
        return node.module
    return owners.get(node.grad_fn)


def _around(node, downstream: bool, owners: dict[Any, nn.Module], names: dict[int, str]) -> str:
    """The nearest layers before (or after) an op, for messages."""
    found: list[str] = []
    seen: set[int] = set()
    queue = list(node.outputs if downstream else node.inputs)
    while queue and len(found) < 3:
        n = queue.pop(0)
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.type == tp.ops.OPTYPE.OUTPUT:
            label = "the network output"
        else:
            module = _owner(n, owners)
            label = None if module is None else repr(names.get(id(module)) or "the model")
        if label is not None:
            if label not in found:
                found.append(label)
            continue
        queue.extend(n.outputs if downstream else n.inputs)
    if not found:
        return "the network output" if downstream else "the network input"
    return " / ".join(found)


def _shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return {k: v for k, v in owners.items() if len(v) > 1}


def discover_groups(
    model: nn.Module,
    example_inputs: Any,
    ignored: Iterable[nn.Module] = (),
) -> GroupDiscovery:
    """Trace `model` on `example_inputs` and list its channel groups.

    Every group whose slots include a module of `ignored` (or a child of one) is left unfolded;
    groups that write the network output are never folded.
    """
    names = {id(m): n for n, m in model.named_modules()}
    names.update({id(p): n for n, p in model.named_parameters()})
    ignored_ids = {id(sub) for m in ignored for sub in m.modules()}
    customized = attention_pruners(model)
    graph = tp.DependencyGraph()
    outputs: list[Any] = []

    def capture(out: Any) -> Any:
        outputs.append(out)
        return out

    calls = _CallCounter(model)
    spans = _ModuleSpans(model)
    # the trace follows autograd: frozen parameters would hide their layers from the graph
    frozen = [t for t in model.parameters() if t.is_floating_point() and not t.requires_grad]
    for t in frozen:
        t.requires_grad_(True)
    try:
        with torch.enable_grad():
            graph.build_dependency(
                model, example_inputs=_as_trace_inputs(example_inputs),
                customized_pruners=customized, verbose=False, output_transform=capture,
            )
    except FoldError:
        raise
    except Exception as exc:  # tracing runs arbitrary user code
        raise FoldError(
            f"could not trace the model on `example_inputs` ({type(exc).__name__}: {exc}). "
            "Check that `example_inputs` fit the model's forward()."
        ) from exc
    finally:
        calls.remove()
        spans.remove()
        for t in frozen:
            t.requires_grad_(False)
    calls.check(names, ignored_ids)

    root_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *customized)
    handled = [m for m in model.modules() if isinstance(m, tuple(customized))]
    owners, suspicious = spans.owners(graph, tuple(customized))
    internal = _internal_ops(graph, handled) | {
        id(node) for node in graph.module2node.values()
        if node.type in _DUMMY_OPS and node.grad_fn in owners}
    shared = _shared_parameters(model)
    output_fns = {t.grad_fn for t in tp.utils.flatten_as_list(outputs)
                  if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    groups: list[ChannelGroup] = []
    for tp_group in graph.get_all_groups(root_module_types=root_types):
        slots = _slots_of(graph, tp_group, names)
        if not slots:
            continue
        n = len(tp_group.items[0].idxs)
        group = ChannelGroup(name=slots[0].name, n=n, slots=slots,
                             folds_output=_touches_output(graph, tp_group, output_fns))
        for slot in slots:
            if id(slot.module) in ignored_ids:
                group.ignored_by = slot.name
                break
        if group.foldable and _touches_input(tp_group):
            group.unsafe = "the group holds the network's input channels"
        if group.foldable:
            group.unsafe = _unsafe_reason(graph, tp_group, slots, n, internal, owners, names)
        for slot in slots if group.foldable else ():
            if id(slot.module) in suspicious:
                group.unsafe = (
                    f"{slot.name!r} is a {type(slot.module).__name__} with its own forward(), "
                    f"which runs {suspicious[id(slot.module)]} that may reorder its channels "
                    "(the dependency graph sees a plain layer)")
                break
        if group.foldable:
            _check_tied(group, shared)
            for slot in slots:  # fail early, naming the module, if no merge rule exists
                handler = find_layer_handler(slot.module, slot.name)
                try:
                    pairs = handler.tensors(slot.module, slot.role)
                except FoldError as exc:
                    raise FoldError(f"module {slot.name!r}: {exc}") from exc
                layout = SlotLayout.build(slot.idxs, slot.root_idxs, n, slot.name)
                for tensor, axis in pairs:
                    layout.check(tensor, axis, slot.name)
        groups.append(group)

    for name, module in model.named_modules():
        handler = find_attention_handler(module)
        if handler is None:
            continue
        n = handler.num_heads(module)
        group = ChannelGroup(name=f"{name}.heads", n=n, kind="heads",
                             slots=[Slot(name, module, "producer", list(range(n)),
                                         list(range(n)))])
        if not handler.owns_output:
            _attach_output(group, handler, module, groups)
        parts = [module, *handler.projections(module), *(s.module for s in group.slots[1:])]
        if any(id(p) in ignored_ids for p in parts):
            group.ignored_by = name
        groups.append(group)
    return GroupDiscovery(graph=graph, groups=groups, module_names=names)


def _attach_output(group: ChannelGroup, handler: AttentionHandler, module: nn.Module,
                   groups: list[ChannelGroup]) -> None:
    """Find the output projection of an attention module that does not own it: the Linear
    reading the attention output, i.e. the one consumer of the channel group that q, k and v
    write (Torch-Pruning couples them all through the attention ops). That channel group is
    then folded as whole heads only."""
    qkv = handler.projections(module)
    width = handler.num_heads(module) * handler.head_dim(module)
    found = [g for g in groups if g.kind == "channels" and any(
        s.module is qkv[2] and s.role == "producer" for s in g.slots)]
    if len(found) != 1:
        group.unsafe = "the value projection's output channels are not traced as one group"
        return
    channels = found[0]
    others = [s for s in channels.slots if all(s.module is not p for p in qkv)]
    outs = [s for s in others if s.role == "consumer" and isinstance(s.module, nn.Linear)]
    if len(outs) != 1 or len(others) != 1:
        names = sorted({s.name for s in others}) or ["nothing"]
        group.unsafe = (f"the attention output must reach exactly one Linear (the output "
                        f"projection), but q/k/v share channels with {names[:4]}")
        return
    out = outs[0]
    if out.module.in_features != width:
        group.unsafe = (f"the output projection {out.name!r} reads {out.module.in_features} "
                        f"channels, not heads x head size = {width}")
        return
    n = group.n
    group.slots.append(Slot(out.name, out.module, "consumer", list(range(n)), list(range(n))))
    if not channels.folds_output and channels.ignored_by is None:
        channels.unsafe = (f"channels inside attention heads, folded as whole heads (group "
                           f"{group.name!r})")


class _ModuleSpans:
    """The autograd nodes each layer creates between its inputs and its output.

    Torch-Pruning maps a layer to the node of its output only; the ops inside it (a Linear on a
    3-d input is view -> addmm -> view, its weight goes through a transpose) appear as
    element-wise dummy nodes. They are the layer's own business, so they are told apart here
    and not checked for channel identity. A layer running torch.nn's own forward is trusted; a
    subclass with its own forward (Torch-Pruning still sees a plain Linear, Conv, ...) only if
    it runs nothing but what torch.nn layers run and point-wise ops, else it is `suspicious`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[tuple[nn.Module, set, list]] = []
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True)
                        for m in model.modules()]

    def _hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        inputs = {t.grad_fn for t in _tensors((args, kwargs)) if t.grad_fn is not None}
        outputs = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        self.calls.append((module, inputs, outputs))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def owners(self, graph: tp.DependencyGraph, skip: tuple[type, ...]
               ) -> tuple[dict[Any, nn.Module], dict[int, str]]:
        """(grad_fn -> the innermost layer of `graph` that created it, id(layer) -> an op a
        layer subclass runs that torch.nn layers do not). Modules of types `skip` (attention
        blocks, handled on their own) are left out."""
        owners: dict[Any, nn.Module] = {}
        suspicious: dict[int, str] = {}
        for module, inputs, outputs in self.calls:  # inner layers finish first
            if module not in graph.module2node or isinstance(module, skip):
                continue
            stock = getattr(type(module).forward, "__module__", "").startswith("torch.nn.")
            stack = list(outputs)
            seen: set = set()
            while stack:
                fn = stack.pop()
                if fn is None or fn in inputs or fn in seen or hasattr(fn, "variable"):
                    continue  # hasattr(fn, "variable"): a leaf (AccumulateGrad of a weight)
                seen.add(fn)
                if fn not in owners and not stock and not layer_internal(fn):
                    suspicious.setdefault(id(module), op_name(fn))
                owners.setdefault(fn, module)
                stack.extend(f for f, _ in getattr(fn, "next_functions", ()))
        return owners, suspicious


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class _CallCounter:
    """Counts the calls of every module that owns parameters during the trace.

    A module that never runs (a branch the example inputs did not take, data-dependent control
    flow) is invisible to the dependency graph, so folding would leave it with stale sizes; a
    module that runs more than once (reused) couples its channels in ways a single merge cannot
    represent. Both are refused unless the module is in `ignored`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.counts: dict[int, int] = {}
        # children whose weights their parent uses functionally (never through forward)
        functional = {id(c) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
                      for c in m.modules() if c is not m}
        self.modules = [m for m in model.modules() if m is not model and id(m) not in functional
                        and next(m.parameters(recurse=False), None) is not None]
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]

    def _hook(self, module: nn.Module, *_: Any) -> None:
        self.counts[id(module)] = self.counts.get(id(module), 0) + 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def check(self, names: dict[int, str], ignored_ids: set[int]) -> None:
        # Torch-Pruning runs the forward pass once while tracing
        unused = [names[id(m)] for m in self.modules
                  if id(m) not in ignored_ids and self.counts.get(id(m), 0) == 0]
        if unused:
            raise FoldError(
                f"modules {unused[:5]} did not run on `example_inputs` (data-dependent control "
                "flow, or unused modules), so the graph cannot see which channels they share. "
                "Give example inputs that run every branch, or, if these modules are never "
                f"used, pass them in `ignored=` (e.g. `ignored=[model.{unused[0]}]`)."
            )
        reused = [(names[id(m)], self.counts[id(m)]) for m in self.modules
                  if id(m) not in ignored_ids and self.counts.get(id(m), 0) > 1]
        if reused:
            name, times = reused[0]
            raise FoldError(
                f"module {name!r} runs {times} times in one forward pass; a reused module's "
                "channels are coupled across its uses, which one merge cannot represent. Pass "
                f"`ignored=[model.{name}]` to leave its channel groups unfolded."
            )


def _check_tied(group: ChannelGroup, shared: dict[int, list[str]]) -> None:
    for slot in group.slots:
        params = [slot.module] if isinstance(slot.module, nn.Parameter) else list(
            slot.module.parameters(recurse=False))
        for p in params:
            if id(p) in shared:
                raise FoldError(
                    f"tied weights: {' and '.join(shared[id(p)])} are one tensor, and the channel "
                    f"group of {slot.name!r} would fold it differently in each place. Untie them, "
                    f"or pass `ignored=[model.{slot.name}]`."
                )


def _as_trace_inputs(example_inputs: Any) -> Any:
    """Torch-Pruning calls model(*inputs) for sequences and model(**inputs) for dicts.

    A bare tensor is wrapped in a list: Torch-Pruning would first try model(*tensor), which
    unpacks the batch (a batch of one then runs as an unbatched sample until it fails, and the
    retry runs every module a second time)."""
    if isinstance(example_inputs, torch.Tensor):
        return [example_inputs]
    if isinstance(example_inputs, dict):
        return dict(example_inputs)
    if isinstance(example_inputs, Sequence):
        return list(example_inputs)
    raise FoldError(
        "`example_inputs` must be a tensor, a tuple/list of tensors or a dict of tensors, "
        f"got {type(example_inputs).__name__}."
    )
