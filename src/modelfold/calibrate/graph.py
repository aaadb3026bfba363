"""Self-calibrated folding of graph models (CNNs, encoders, any traceable model).

On calibration inputs the model synthesised itself (`modelfold.calibrate.synthetic`):

1. **Observe** every foldable channel group where its channels are read: the inputs of the
   group's consumer layers (Linear, Conv with groups=1). Per group, the Gram matrix of the
   channel activations (summed over consumers and positions) and each channel's contribution
   to the consumers' outputs (activation energy x consumer column norm).
2. **Allocate** one parameter budget over the groups by sensitivity: the model's relative
   output error when the group alone is merged to k channels (or heads), measured on a few
   calibration inputs at a grid of k and interpolated, is the group's error curve; the curves
   and the parameters a channel costs go to the Lagrangian allocation of
   `modelfold.cluster.allocation`. Groups
   that cannot lose channels without damage (depthwise stages, the stem, the classifier input)
   keep them because their curves rise steeply.
3. **Merge** by activation (`centre_merge`): the highest-contributing channels stay, every
   other channel is folded into the centre it is most correlated with at its least-squares
   scale. Attention heads are channels too, observed at the output projection's input (one
   head = head_dim inputs). Groups whose channels are not observable (consumers that are not
   Linear/Conv) keep their uniform k and are clustered on their weights.
4. **Refit** every consumer of a folded group, in execution order, by ridge least squares:
   on the folded model's inputs towards the original layer's outputs (on the channels the
   folded layer still writes), each layer seeing the refitted layers before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modelfold.calibrate.activation import centre_merge, merge_maps, ridge_refit
from modelfold.graph.groups import ChannelGroup, GroupDiscovery, Slot
from modelfold.merge.apply import ChannelMap, apply_channel_maps, predicted_parameter_count
from modelfold.merge.plan import FoldPlan, GroupPlan

RIDGE = 0.05  # shrinkage of the refit towards the merged weights (x mean diag of the Gram)
REFIT_ROWS = 8192  # sampled positions per refitted layer
SENSITIVITY_SAMPLES = 8  # calibration inputs used to measure the error curves
KEEP_GRID = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)  # kept fractions measured
MAX_RATIO = 0.9  # no group loses more than this fraction of its channels


class _Captured(Exception):
    """Raised by a hook to stop the forward pass once the wanted input is captured."""


def _is_dense(module: Any) -> bool:
    """A layer whose input channels mix linearly into every output (refit and observable)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1 \
        and not module.transposed and module.padding_mode == "zeros"


@dataclass
class _Reader:
    """One consumer slot of a group: which input positions hold which channel."""

    name: str
    module: nn.Module
    index: torch.Tensor  # (n, m): local input indices of every group channel

    def channels(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, n) activations of the group's channels in the layer input `x`."""
        flat = x.movedim(1, -1) if isinstance(self.module, nn.modules.conv._ConvNd) else x
        flat = flat.reshape(-1, flat.shape[-1])
        n = self.index.shape[0]
        return flat[:, self.index.to(x.device)].transpose(1, 2).reshape(-1, n)

    def column_energy(self) -> torch.Tensor:
        """(n,) squared norm of the weights reading every channel."""
        w = self.module.weight.detach().float()
        w = w.movedim(1, 0).reshape(w.shape[1], -1)
        return w[self.index.to(w.device)].pow(2).sum((1, 2))


def _reader(slot: Slot, n: int) -> _Reader | None:
    if slot.role != "consumer" or not _is_dense(slot.module):
        return None
    per: list[list[int]] = [[] for _ in range(n)]
    for local, root in zip(slot.idxs, slot.root_idxs, strict=True):
        per[root].append(local)
    if len({len(p) for p in per}) != 1 or not per[0]:
        return None
    return _Reader(slot.name, slot.module, torch.tensor(per, dtype=torch.long))


def _head_reader(group: ChannelGroup, names: dict[int, str]) -> _Reader | None:
    """The output projection of a head group, reading head h on inputs [h d, (h + 1) d)."""
    handler, module, out = group.attention()
    if out is None and handler.o is not None:
        out = getattr(module, handler.o, None)
    if not isinstance(out, nn.Linear) or id(out) not in names:
        return None
    d = handler.head_dim(module)
    if out.in_features != group.n * d:
        return None
    return _Reader(names[id(out)], out, torch.arange(group.n * d).reshape(group.n, d))


@dataclass
class _GroupStats:
    group: ChannelGroup
    readers: list[_Reader]
    gram: torch.Tensor | None = None
    energy: torch.Tensor | None = None  # (n,) contribution^2 to the consumers' outputs

    def scores(self) -> torch.Tensor:
        return self.energy.clamp_min(0).sqrt()


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _slice(inputs: Any, n: int) -> Any:
    return {k: (v[:n] if isinstance(v, torch.Tensor) and v.ndim else v)
            for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:n]


@torch.no_grad()
def observe(model: nn.Module, discovery: GroupDiscovery, inputs: Any
            ) -> tuple[dict[str, _GroupStats], list[str]]:
    """Activation statistics of every observable foldable group, and the names of the
    Linear/Conv layers in the order the forward pass runs them."""
    stats: dict[str, _GroupStats] = {}
    by_module: dict[int, list[tuple[_GroupStats, _Reader]]] = {}
    for group in discovery.groups:
        if not group.foldable:
            continue
        if group.kind == "heads":
            readers = [_head_reader(group, discovery.module_names)]
        else:
            readers = [_reader(s, group.n) for s in group.slots if s.role == "consumer"]
        if not readers or any(r is None for r in readers):
            continue
        st = _GroupStats(group, readers)
        stats[group.name] = st
        for r in readers:
            by_module.setdefault(id(r.module), []).append((st, r))
    order: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}

    def hook(module, args):
        name = names.get(id(module))
        if name is not None and name not in order:
            order.append(name)
        x = args[0].detach().float()
        for st, r in by_module.get(id(module), []):
            z = r.channels(x).double()
            gram = z.T @ z / z.shape[0]
            energy = gram.diagonal() * r.column_energy().double()
            st.gram = gram if st.gram is None else st.gram + gram
            st.energy = energy if st.energy is None else st.energy + energy

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if _is_dense(m)]
    try:
        _call(model.eval(), inputs)
    finally:
        for h in handles:
            h.remove()
    return {k: v for k, v in stats.items() if v.gram is not None}, order


def _merged_input(r: _Reader, x: torch.Tensor, centres: torch.Tensor, owner: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
    """The layer input `x` with the group's channels replaced by what the merge leaves: every
    channel becomes its centre's activation times its scale."""
    z = r.channels(x)
    approx = z[:, centres][:, owner] * scale.to(z.dtype)
    conv = isinstance(r.module, nn.modules.conv._ConvNd)
    last = (x.movedim(1, -1) if conv else x).contiguous().clone()
    flat = last.view(-1, last.shape[-1])
    n, m = r.index.shape
    flat[:, r.index.flatten().to(x.device)] = approx.reshape(-1, m, n).transpose(1, 2) \
        .reshape(flat.shape[0], -1).to(flat.dtype)
    return last.movedim(-1, 1) if conv else last


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    if hasattr(out, "to_tuple"):
        values = out.to_tuple()
    return next(t for t in values if isinstance(t, torch.Tensor))


@torch.no_grad()
def relative_error(model: nn.Module, probe: Any, reference: torch.Tensor, st: _GroupStats,
                   k: int) -> float:
    """||model output error||^2 / ||output||^2 on the probe inputs when the group alone is
    merged by activation to k channels (no refit): the merge is simulated by rewriting the
    consumers' inputs, so no weight changes."""
    centres, owner, scale = centre_merge(st.gram, st.scores(), k)
    modules = {id(r.module): r for r in st.readers}

    def hook(module, args):
        r = modules[id(module)]
        return (_merged_input(r, args[0], centres, owner, scale), *args[1:])

    handles = [r.module.register_forward_pre_hook(hook) for r in st.readers]
    try:
        out = _first_tensor(_call(model, probe)).float()
    finally:
        for h in handles:
            h.remove()
    return float((out - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))


def error_curve(model: nn.Module, probe: Any, reference: torch.Tensor, st: _GroupStats
                ) -> np.ndarray:
    """Relative output error at k = 1..n (index k - 1), interpolated between measured points."""
    n = st.group.n
    ks = sorted({max(1, min(n - 1, round(n * f))) for f in KEEP_GRID} | {1})
    measured = [relative_error(model, probe, reference, st, k) for k in ks] + [0.0]
    ks = [*ks, n]
    curve = np.interp(np.arange(1, n + 1), ks, measured)
    return np.maximum.accumulate(curve[::-1])[::-1]  # never lower for fewer channels


def allocate_by_sensitivity(model: nn.Module, discovery: GroupDiscovery,
                            stats: dict[str, _GroupStats], uniform: dict[str, int],
                            probe: Any, round_to: int = 1,
                            count: Callable[[dict[str, int]], int] | None = None
                            ) -> dict[str, int]:
    """k per group: the amount of `uniform` spread by the groups' error curves, in the unit
    `count` measures (default: predicted parameters). Groups without statistics keep their
    uniform k."""
    from modelfold.cluster.allocation import allocate

    if count is None:
        def count(ks: dict[str, int]) -> int:
            return predicted_parameter_count(model, discovery, ks)

    measure = count
    budget = measure(uniform)
    fixed = {g: k for g, k in uniform.items() if g not in stats}
    full = measure({})
    curves, costs = {}, {}
    with torch.no_grad():
        reference = _first_tensor(_call(model.eval(), probe)).float()
    for name, st in stats.items():
        if st.group.n < 2:
            continue
        curves[name] = error_curve(model, probe, reference, st)
        costs[name] = max(full - measure({name: st.group.n - 1}), 1) / full

    def total(ks: dict[str, int]) -> int:
        return measure({**fixed, **ks})

    ks = allocate(curves, costs, total, budget, max_ratio=MAX_RATIO, round_to=round_to)
    return {**fixed, **{g: k for g, k in ks.items() if k < stats[g].group.n}}


def activation_map(st: _GroupStats, k: int) -> ChannelMap:
    centres, owner, scale = centre_merge(st.gram, st.scores(), k)
    producer, consumer = merge_maps(centres, owner, scale)
    return ChannelMap(centres.cpu(), producer.double().cpu(), consumer.double().cpu())


def _producer_slot(module: nn.Module, discovery: GroupDiscovery, maps: dict[str, ChannelMap]
                   ) -> tuple[ChannelGroup, Slot] | None:
    for group in discovery.groups:
        if group.name not in maps:
            continue
        for slot in group.slots:
            if slot.module is module and slot.role == "producer":
                return group, slot
    return None


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(batch, features, positions) layer input as the rows a Linear/Conv multiplies."""
    if isinstance(module, nn.Linear):
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        return flat.transpose(1, 2)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-1)
        k, d, p, s = ((module.kernel_size[0], 1), (module.dilation[0], 1),
                      (module.padding[0], 0), (module.stride[0], 1))
    elif isinstance(module, nn.Conv2d):
        k, d, p, s = module.kernel_size, module.dilation, module.padding, module.stride
    else:
        raise TypeError(f"{type(module).__name__} is not refitted")
    return F.unfold(x, k, dilation=d, padding=p, stride=s)


def _rows(module: nn.Module, x: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """(rows, features) at the sampled (batch x position) indices `pick`."""
    cols = _patches(module, x)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])[pick]


def _outputs(y: torch.Tensor, module: nn.Module, pick: torch.Tensor) -> torch.Tensor:
    flat = y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2) \
        if isinstance(module, nn.modules.conv._ConvNd) else y.reshape(y.shape[0], -1,
                                                                       y.shape[-1])
    return flat.reshape(-1, flat.shape[-1])[pick]


@torch.no_grad()
def refit_consumers(original: nn.Module, folded: nn.Module, discovery: GroupDiscovery,
                    maps: dict[str, ChannelMap], inputs: Any, order: list[str], *,
                    ridge: float = RIDGE, rows: int = REFIT_ROWS, seed: int = 0) -> list[str]:
    """Ridge least-squares refit of every Linear/Conv that reads a folded group (see the
    module docstring); returns the names of the layers refitted."""
    readers = {s.name for g in discovery.groups if g.name in maps for s in g.slots
               if s.role == "consumer" and _is_dense(s.module)}
    todo = [n for n in order if n in readers]
    orig_modules = dict(original.named_modules())
    fold_modules = dict(folded.named_modules())
    gen = torch.Generator().manual_seed(seed)
    picks: dict[str, torch.Tensor] = {}
    targets: dict[str, torch.Tensor] = {}

    def keep_target(name: str):
        def hook(module, args, output):
            if not _refittable(module):
                return
            total = output.numel() // _out_features(module)
            picks[name] = torch.randperm(total, generator=gen)[:rows].to(output.device)
            targets[name] = _outputs(output.detach().float(), module, picks[name])
        return hook

    handles = [orig_modules[n].register_forward_hook(keep_target(n)) for n in todo]
    try:
        _call(original.eval(), inputs)
    finally:
        for h in handles:
            h.remove()
    done = []
    folded.eval()
    for name in todo:
        if name not in targets:
            continue
        module = fold_modules[name]
        target = targets[name]
        found = _producer_slot(module, discovery, maps)
        if found is not None:
            group, slot = found
            plain = list(slot.idxs) == list(range(group.n)) == list(slot.root_idxs)
            if not plain:
                continue
            cmap = maps[group.name]
            target = target @ cmap.producer.T.to(target)
            target = target[:, torch.argsort(cmap.keep).to(target.device)]
        if target.shape[1] != _out_features(module):
            continue
        got: dict[str, torch.Tensor] = {}

        def catch(_module, args, got=got):
            got["x"] = args[0].detach().float()
            raise _Captured

        handle = module.register_forward_pre_hook(catch)
        try:
            _call(folded, inputs)
        except _Captured:
            pass
        finally:
            handle.remove()
        x = _rows(module, got["x"], picks[name])
        weight = module.weight.detach().float().reshape(module.weight.shape[0], -1)
        if module.bias is not None:
            x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
            weight = torch.cat([weight, module.bias.detach().float()[:, None]], 1)
        new = ridge_refit((x.T @ x).double(), (x.T @ target).double(), weight, ridge)
        if not torch.isfinite(new).all():
            continue
        if module.bias is not None:
            module.bias.copy_(new[:, -1].to(module.bias))
            new = new[:, :-1]
        module.weight.copy_(new.reshape(module.weight.shape).to(module.weight))
        done.append(name)
    return done


def _refittable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, (nn.Conv1d, nn.Conv2d)) and not isinstance(module.padding, str))


def _out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels



def _labels(cmap: ChannelMap) -> list[int]:
    """The survivor each channel is folded into (for the record and summaries)."""
    return cmap.consumer.abs().argmax(0).tolist()


def self_calibrated_fold(work: nn.Module, original: nn.Module, discovery: GroupDiscovery,
                         config, uniform: dict[str, int], example: Any,
                         count: Callable[[dict[str, int]], int] | None = None
                         ) -> tuple[FoldPlan, int, dict[str, Any]]:
    """Fold `work` in place (see the module docstring). `uniform` holds the k of every group
    at the uniform ratio: its amount is the budget, in the unit `count` measures (default:
    predicted parameters). Returns the plan, the predicted
    parameter count and a report (synthetic input shape, groups observed, layers refitted)."""
    from modelfold.calibrate.synthetic import synthetic_inputs
    from modelfold.cluster import cluster_channels, group_features

    synthetic = synthetic_inputs(work, example, seed=config.seed)
    stats, order = observe(work, discovery, synthetic)
    ks = allocate_by_sensitivity(work, discovery, stats, uniform,
                                 _slice(synthetic, SENSITIVITY_SAMPLES), config.round_to, count)
    predicted = predicted_parameter_count(work, discovery, ks)
    maps: dict[str, ChannelMap] = {}
    plan = FoldPlan(ratio=0.0)
    for group in discovery.groups:
        k = ks.get(group.name, group.n)
        if not group.foldable or k >= group.n:
            continue
        if group.name in stats:
            maps[group.name] = activation_map(stats[group.name], k)
        else:  # not observable: cluster the weights
            x = group_features(group, features=config.features,
                               normalize_blocks=config.normalize_blocks)
            labels = cluster_channels(x, k, config).cpu().tolist()
            maps[group.name] = ChannelMap.from_labels(GroupPlan(group.name, group.kind,
                                                                group.n, k, labels))
        plan.groups[group.name] = GroupPlan(group.name, group.kind, group.n, k,
                                            _labels(maps[group.name]))
    apply_channel_maps(discovery, maps)
    refitted = refit_consumers(original, work, discovery, maps, synthetic, order,
                               seed=config.seed)
    report = {"calibration_inputs": _shape_of(synthetic), "observed_groups": sorted(stats),
              "refitted_layers": refitted}
    return plan, predicted, report


def _shape_of(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: list(v.shape) for k, v in x.items() if isinstance(v, torch.Tensor)}
    return list(x.shape)
