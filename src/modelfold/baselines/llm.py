"""Structured pruning baselines for LLMs, with the same parts, shapes and budgets as folding.

- "magnitude" (data-free, LLM-Pruner-style): an MLP channel scores the L2 norm of [gate row |
  up row | down column]; a query head the L2 norm of its q rows and o columns (plus k and v rows
  with multi-head attention).
- "wanda-sp" (data-driven, Wanda's structured variant as in FLAP's `wanda_sp`): a channel scores
  sum_i |W_down[i, j]| * ||X_j||, X = the input of `down_proj` over calibration tokens; a head
  sums the same score over its `o_proj` input columns. Statistics come from one forward pass of
  the dense model (one-shot).
- "flap" (data-driven; An et al., "Fluctuation-based Adaptive Structured Pruning for LLMs",
  AAAI 2024): a channel scores its fluctuation Var(X_j) * ||W_down[:, j]||^2; scores are
  standardised per layer and part and ranked *globally* (adaptive per-layer widths, FLAP's
  AL-AM structure) until `target_sparsity` is met; the removed channels' mean contribution
  W[:, removed] @ E[X_removed] is added back as a `down_proj` (`o_proj`) bias (FLAP's baseline
  compensation; the config's `mlp_bias` / `attention_bias` is switched on, the other biases are
  zero, so the result still saves and reloads; these biases are outside the budget, ~0.1 % of a
  real model). FLAP removes whole heads of multi-head attention; with grouped-query attention
  a unit is the r-th weakest query head of every KV group (their mean standardised score), so
  every group keeps the same number of query heads and the KV heads stay. LLaMA configs only;
  "flap-no-bias" is the same ranking without the compensation, for configs that cannot hold
  an MLP bias (Gemma 3).
- "llm-pruner" / "llm-pruner-e2" (data-driven; Ma et al., "LLM-Pruner: On the Structural Pruning
  of Large Language Models", NeurIPS 2023, block-wise mode, without the LoRA post-tuning): the
  importance of a coupled group - an MLP channel (its gate and up rows and down column) or a query
  head (its q rows and o columns, plus its k and v rows with multi-head attention) - is the sum
  over the group's weights of a Taylor estimate of the loss change when the weight is zeroed,
  from gradients of the language-modelling loss on the first 10 calibration windows cut to 64
  tokens (the official defaults `num_examples=10`, `seq_len=64`, `grouping_strategy="sum"`).
  "llm-pruner" is Element^1, |w * dL/dw| (`--taylor param_first`, the current default of the
  official `hf_prune.py` and what its example scripts use); "llm-pruner-e2" is Element^2,
  |w * g - 1/2 * w^2 * F| with the diagonal Fisher F = mean_j (dL_j/dw)^2 over the windows j, one
  backward pass each (`param_mix`). Gradients are taken in float32 (a float32 copy of a model in
  another dtype), in eval mode, with `torch.autograd.grad`: the model's weights, `.grad` and
  `requires_grad` are left as they were. Differences to the official code: (1) every layer is
  pruned at the same ratio through the shared budget planning (`ratio` / `target_sparsity` /
  `recipe`); LLM-Pruner skips the first and last layers (`block_*_layer_start/end`, 3..31 by
  default, 4..30 in its LLaMA-7B script) and prunes the others at a higher ratio;
  (2) with grouped-query attention query heads are removed within each KV group (the KV heads
  stay, so `num_attention_heads` stays a multiple of `num_key_value_heads`) and a head scores its
  q rows and o columns only; LLM-Pruner's Llama-3 script removes whole KV groups instead;
  (3) calibration is whatever windows are given (the benchmark: wikitext from the start of its
  text), not random 64-token spans of BookCorpus documents; (4) q/k/v biases (Qwen2) are removed
  with their rows but, as in LLM-Pruner (weights only), not scored; (5) one shot: LLM-Pruner's
  `iterative_steps=1` default, no post-training.
The top-k channels / heads are kept in their original order (per KV group with GQA); the layers
are rebuilt by the same code as folding (`modelfold.llm.fold.transform_llm`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from modelfold.errors import FoldError
from modelfold.llm.architectures import DecoderArchitecture, architecture_of
from modelfold.llm.fold import head_blocks, selection_maps, transform_llm
from modelfold.record import get_llm_record
from modelfold.registry import Registry

# fn(model, arch, *, ratio, target_sparsity, parts, recipe, calibration, statistics,
#    batch_size, inplace, round_to) -> the pruned model
PruningMethod = Callable[..., nn.Module]
LLM_PRUNING: Registry[PruningMethod] = Registry("LLM pruning method")


def register_llm_pruning(name: str) -> Callable[[PruningMethod], PruningMethod]:
    """Decorator registering a pruning method for `prune_llm(method=name)`."""
    return LLM_PRUNING.register(name)


def llm_pruning_methods() -> list[str]:
    return LLM_PRUNING.names()


def prune_llm(
    model: nn.Module,
    *,
    method: str = "magnitude",
    ratio: float | None = None,
    target_sparsity: float | None = None,
    parts: Iterable[str] = ("mlp",),
    recipe: str | Mapping[str, Mapping[Any, float]] | None = None,
    calibration: torch.Tensor | None = None,
    statistics: dict[tuple[int, str], Any] | None = None,
    batch_size: int = 4,
    inplace: bool = False,
    round_to: int = 1,
) -> nn.Module:
    """Remove the lowest-scoring MLP channels / query heads (see the module docstring).

    `round_to`: kept MLP widths are rounded to multiples of it (as `FoldConfig.round_to`).

    `calibration`: (N, L) token windows, required by "wanda-sp", "flap" and "llm-pruner(-e2)"
    unless `statistics` (the output of `input_norms` for wanda-sp, `input_moments` for flap,
    `taylor_scores` for llm-pruner, computed on the same model and reusable across budgets) is
    given. LLM-Pruner reads the first 10 windows, cut to 64 tokens.
    """
    prune = LLM_PRUNING.get(method)
    arch = architecture_of(model)
    return prune(model, arch, ratio=ratio, target_sparsity=target_sparsity, parts=parts,
                 recipe=recipe, calibration=calibration, statistics=statistics,
                 batch_size=batch_size, inplace=inplace, round_to=round_to)


@register_llm_pruning("magnitude")
def _magnitude(model: nn.Module, arch: DecoderArchitecture, *, ratio, target_sparsity, parts,
               recipe, inplace, round_to, **_: Any) -> nn.Module:
    """Data-free: the L2 norm of each channel's / head's weights."""
    return _prune_with(model, _selector(None), "magnitude", ratio=ratio,
                       target_sparsity=target_sparsity, parts=parts, recipe=recipe,
                       inplace=inplace, round_to=round_to)


def _prune_with(model: nn.Module, selector, method: str, *, ratio, target_sparsity, parts,
                recipe, inplace, round_to) -> nn.Module:
    """Keep the top-scoring channels / heads that `selector` picks, at the budget given."""
    return transform_llm(model, selector, ratio=ratio, target_sparsity=target_sparsity,
                         parts=parts, recipe=recipe, inplace=inplace, method=method,
                         settings={"method": method, "round_to": round_to}, round_to=round_to)


@register_llm_pruning("wanda-sp")
def _wanda_sp(model: nn.Module, arch: DecoderArchitecture, *, ratio, target_sparsity, parts,
              recipe, calibration, statistics, batch_size, inplace, round_to,
              **_: Any) -> nn.Module:
    """Weights times input norms (`input_norms`, or `statistics` given)."""
    norms = statistics
    if norms is None:
        if calibration is None:
            raise FoldError("wanda-sp needs `calibration`: token windows (N, L) of real text.")
        norms = input_norms(model, arch, calibration, batch_size=batch_size)
    return _prune_with(model, _selector(norms), "wanda-sp", ratio=ratio,
                       target_sparsity=target_sparsity, parts=parts, recipe=recipe,
                       inplace=inplace, round_to=round_to)


@register_llm_pruning("flap")
def _flap_method(model: nn.Module, arch: DecoderArchitecture, *, ratio, target_sparsity, parts,
                 recipe, calibration, statistics, batch_size, inplace, **_: Any) -> nn.Module:
    """Fluctuation scores ranked globally, with bias compensation (`input_moments`)."""
    if target_sparsity is None or ratio is not None or recipe is not None:
        raise FoldError("flap sets per-layer widths itself: give `target_sparsity` only.")
    moments = statistics
    if moments is None:
        if calibration is None:
            raise FoldError("flap needs `calibration`: token windows (N, L) of real text.")
        moments = input_moments(model, arch, calibration, batch_size=batch_size)
    return _flap(model, arch, moments, target_sparsity, tuple(parts), inplace)


@register_llm_pruning("flap-no-bias")
def _flap_no_bias(model: nn.Module, arch: DecoderArchitecture, *, ratio, target_sparsity,
                  parts, recipe, calibration, statistics, batch_size, inplace,
                  **_: Any) -> nn.Module:
    """FLAP's fluctuation ranking and adaptive widths without its bias compensation: for
    architectures whose config has no bias for the MLP output (Gemma 3)."""
    if target_sparsity is None or ratio is not None or recipe is not None:
        raise FoldError("flap-no-bias sets per-layer widths itself: give `target_sparsity` only.")
    moments = statistics
    if moments is None:
        if calibration is None:
            raise FoldError("flap-no-bias needs `calibration`: token windows (N, L) of real "
                            "text.")
        moments = input_moments(model, arch, calibration, batch_size=batch_size)
    return _flap(model, arch, moments, target_sparsity, tuple(parts), inplace,
                 compensate=False)


def _llm_pruner(name: str, second_order: bool, model: nn.Module, arch: DecoderArchitecture, *,
                ratio, target_sparsity, parts, recipe, calibration, statistics, batch_size,
                inplace, round_to) -> nn.Module:
    scores = statistics
    if scores is None:
        if calibration is None:
            raise FoldError(f"{name} needs `calibration`: token windows (N, L) of real text "
                            "(it reads the first 10, cut to 64 tokens).")
        scores = taylor_scores(model, arch, calibration, second_order=second_order,
                               batch_size=batch_size)
    return _prune_with(model, _score_selector(scores), name, ratio=ratio,
                       target_sparsity=target_sparsity, parts=parts, recipe=recipe,
                       inplace=inplace, round_to=round_to)


@register_llm_pruning("llm-pruner")
def _llm_pruner_e1(model: nn.Module, arch: DecoderArchitecture, **kw: Any) -> nn.Module:
    """LLM-Pruner, Element^1: sum over the group of |w * dL/dw| (`taylor_scores`)."""
    return _llm_pruner("llm-pruner", False, model, arch, **_pruner_options(kw))


@register_llm_pruning("llm-pruner-e2")
def _llm_pruner_e2(model: nn.Module, arch: DecoderArchitecture, **kw: Any) -> nn.Module:
    """LLM-Pruner, Element^2: sum over the group of |w g - w^2 F / 2| (`taylor_scores`)."""
    return _llm_pruner("llm-pruner-e2", True, model, arch, **_pruner_options(kw))


def _pruner_options(kw: dict[str, Any]) -> dict[str, Any]:
    names = ("ratio", "target_sparsity", "parts", "recipe", "calibration", "statistics",
             "batch_size", "inplace", "round_to")
    return {n: kw[n] for n in names}


def _check_windows(calibration: torch.Tensor) -> torch.Tensor:
    calibration = torch.as_tensor(calibration)
    if calibration.dim() != 2 or calibration.dtype not in (torch.long, torch.int):
        raise FoldError(f"calibration must be integer token windows (N, L), got "
                        f"{tuple(calibration.shape)} {calibration.dtype}.")
    return calibration


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the windows (Hugging Face's `labels=ids` loss)."""
    logits = model(ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))


def taylor_scores(model: nn.Module, arch: DecoderArchitecture, calibration: torch.Tensor, *,
                  second_order: bool = False, batch_size: int = 4, samples: int = 10,
                  tokens: int = 64) -> dict[tuple[int, str], torch.Tensor]:
    """LLM-Pruner's group importance of every MLP channel ((layer, "mlp") -> (intermediate,))
    and query head ((layer, "attention") -> (n_heads,)), from the first `samples` windows of
    `calibration` cut to `tokens` tokens (see the module docstring). The model is not changed."""
    windows = _check_windows(calibration)[:samples, :tokens]
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise FoldError("llm-pruner needs at least one calibration window of 2+ tokens.")
    work = model
    if any(p.dtype != torch.float32 for p in model.parameters()):
        work = copy.deepcopy(model).float()  # gradients in float32; the model stays as it is
    layers = arch.layers(work)
    weights: list[nn.Parameter] = []
    for layer in layers:
        attn = arch.attention_module(layer)
        weights += [m.weight for m in arch.mlp_linears(layer)]
        weights += [getattr(attn, getattr(arch, n)).weight for n in ("q", "k", "v", "o")]
    flags = [w.requires_grad for w in weights]
    was_training = work.training
    windows = windows.to(weights[0].device)
    n = windows.shape[0]
    grad = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    fisher = [torch.zeros_like(g) for g in grad] if second_order else []
    try:
        for w in weights:
            w.requires_grad_(True)
        work.eval()
        with torch.enable_grad():
            for start in range(0, n, batch_size):  # the gradient of the mean loss over all n
                chunk = windows[start: start + batch_size]
                loss = _lm_loss(work, chunk) * (chunk.shape[0] / n)
                for acc, g in zip(grad, torch.autograd.grad(loss, weights)):
                    acc += g
            for j in range(n if second_order else 0):  # Fisher: per-window squared gradients
                for acc, g in zip(fisher, torch.autograd.grad(_lm_loss(work, windows[j:j + 1]),
                                                              weights)):
                    acc += g * g / n
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
        work.train(was_training)

    def importance(k: int) -> torch.Tensor:  # |Taylor estimate| per weight
        w = weights[k].detach().float()
        salience = w * grad[k]
        if second_order:
            salience = salience - 0.5 * w * w * fisher[k]
        return salience.abs()

    scores: dict[tuple[int, str], torch.Tensor] = {}
    for i, layer in enumerate(layers):
        gate, up, down, q, k, v, o = (importance(7 * i + t) for t in range(7))
        scores[(i, "mlp")] = (gate.sum(1) + up.sum(1) + down.sum(0)).cpu()
        hd = arch.attention_module(layer).head_dim
        n_q, n_kv = q.shape[0] // hd, k.shape[0] // hd
        head = q.reshape(n_q, -1).sum(1) + o.sum(0).view(n_q, hd).sum(1)
        if n_q == n_kv:  # multi-head attention: the head's k and v rows go with it
            head = head + k.reshape(n_kv, -1).sum(1) + v.reshape(n_kv, -1).sum(1)
        scores[(i, "attention")] = head.cpu()
    return scores


@torch.no_grad()
def input_moments(model: nn.Module, arch: DecoderArchitecture, calibration: torch.Tensor, *,
                  batch_size: int = 4) -> dict[tuple[int, str], tuple[torch.Tensor, ...]]:
    """(sum, sum of squares, token count) per input channel of every `down_proj` ("mlp") and
    `o_proj` ("attention"), float64, from one forward pass of the model over `calibration`."""
    calibration = _check_windows(calibration)
    moments: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}
    hooks = []
    for i, layer in enumerate(arch.layers(model)):
        down = arch.mlp_linears(layer)[2]
        o = getattr(arch.attention_module(layer), arch.o)
        for name, module in (("mlp", down), ("attention", o)):
            def hook(_module, args, key=(i, name)):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                s1, s2, n = moments.get(key, (0, 0, 0))
                moments[key] = (s1 + x.sum(0), s2 + (x * x).sum(0), n + x.shape[0])
            hooks.append(module.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, calibration.shape[0], batch_size):
            model(calibration[start: start + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return moments


def input_norms(model: nn.Module, arch: DecoderArchitecture, calibration: torch.Tensor, *,
                batch_size: int = 4) -> dict[tuple[int, str], torch.Tensor]:
    """||X_j||_2 of the inputs of every `down_proj` and `o_proj` over all calibration tokens."""
    return norms_from_moments(input_moments(model, arch, calibration, batch_size=batch_size))


def norms_from_moments(moments: dict[tuple[int, str], tuple[torch.Tensor, ...]]
                       ) -> dict[tuple[int, str], torch.Tensor]:
    """||X_j||_2 per input channel from `input_moments` (Wanda-sp's statistics)."""
    return {k: v[1].sqrt().float() for k, v in moments.items()}


def _selector(norms: dict[tuple[int, str], torch.Tensor] | None):
    def select(part: str, index: int, layer: nn.Module, arch: DecoderArchitecture, k: int):
        if part == "mlp":
            gate, up, down = arch.mlp_linears(layer)
            if norms is None:
                score = (gate.weight.float().pow(2).sum(1) + up.weight.float().pow(2).sum(1)
                         + down.weight.float().pow(2).sum(0)).sqrt()
            else:
                score = down.weight.float().abs().sum(0) * norms[(index, "mlp")]
            return selection_maps(torch.topk(score, k).indices.cpu(), score.numel())
        attn = arch.attention_module(layer)
        blocks = head_blocks(arch, attn)
        n_q, n_kv = blocks["q"].shape[0], blocks["k"].shape[0]
        if norms is None:
            names = ("q", "k", "v", "o") if n_q == n_kv else ("q", "o")
            score = sum(blocks[n].pow(2).sum(1) for n in names).sqrt()
        else:
            o = getattr(attn, arch.o).weight.float()
            per_column = o.abs().sum(0) * norms[(index, "attention")]
            score = per_column.view(n_q, -1).sum(1)
        return _keep_heads(score.cpu(), n_kv, k)

    return select


def _keep_heads(score: torch.Tensor, n_kv: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` best query heads, `k / n_kv` per KV group with grouped-query attention."""
    n_q = score.numel()
    if n_q == n_kv:
        return selection_maps(torch.topk(score, k).indices, n_q)
    m, per_group = n_q // n_kv, k // n_kv
    keep = torch.cat([g * m + torch.topk(score[g * m:(g + 1) * m], per_group).indices
                      for g in range(n_kv)])
    return selection_maps(keep, n_q)


def _score_selector(scores: dict[tuple[int, str], torch.Tensor]):
    """Keeps the top-scoring channels / heads of precomputed per-layer `scores`."""
    def select(part: str, index: int, layer: nn.Module, arch: DecoderArchitecture, k: int):
        score = scores[(index, part)].cpu()
        if part == "mlp":
            return selection_maps(torch.topk(score, k).indices, score.numel())
        attn = arch.attention_module(layer)
        return _keep_heads(score, getattr(attn, arch.k).weight.shape[0] // attn.head_dim, k)

    return select


def _fluctuation(moments, key, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FLAP score per input column of `weight`, mean input per column)."""
    s1, s2, n = moments[key]
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0)
    return (var * weight.detach().double().pow(2).sum(0)).float(), mean


def _flap(model: nn.Module, arch: DecoderArchitecture, moments, target: float,
          parts: tuple[str, ...], inplace: bool, compensate: bool = True) -> nn.Module:
    from modelfold.budget import check_ratio
    from modelfold.llm.fold import count_parameters, layer_shape

    target = check_ratio(target, "target_sparsity")
    method = "flap" if compensate else "flap-no-bias"
    for part, flag in (("mlp", "mlp_bias"), ("attention", "attention_bias")):
        if compensate and part in parts and not hasattr(model.config, flag):
            raise FoldError(f"flap adds a compensation bias, which a {model.config.model_type} "
                            f"config cannot describe (no `{flag}`); FLAP targets LLaMA models "
                            "(method='flap-no-bias' ranks the same way without the bias).")
    layers = arch.layers(model)
    scores: dict[tuple[int, str], torch.Tensor] = {}
    means: dict[tuple[int, str], torch.Tensor] = {}  # mean input per down_proj / o_proj column
    # (standardised score, layer, part, parameters, channels / heads) per removable unit
    units: list[tuple[float, int, str, int, int]] = []
    n_kv: dict[int, int] = {}
    for i, layer in enumerate(layers):
        attn = arch.attention_module(layer)
        hd = attn.head_dim
        if "mlp" in parts:
            gate, up, down = arch.mlp_linears(layer)
            score, means[(i, "mlp")] = _fluctuation(moments, (i, "mlp"), down.weight)
            cost = gate.in_features + up.in_features + down.out_features
            scores[(i, "mlp")] = score
        if "attention" in parts:
            shape = layer_shape(arch, layer)
            n_kv[i] = shape.num_key_value_heads
            o = getattr(attn, arch.o)
            column, means[(i, "attention")] = _fluctuation(moments, (i, "attention"), o.weight)
            scores[(i, "attention")] = column.view(-1, hd).sum(1)
        for part in parts:
            score = scores[(i, part)]
            z = (score - score.mean()) / score.std().clamp_min(1e-12)
            if part == "mlp":
                units += [(float(v), i, part, cost, 1) for v in z]
            elif n_kv[i] == z.numel():  # multi-head attention: a head and its k, v rows
                units += [(float(v), i, part, 4 * hd * o.out_features, 1) for v in z]
            else:  # grouped-query: the r-th weakest query head of every KV group together
                ranked = z.view(n_kv[i], -1).sort(1).values
                units += [(float(v), i, part, 2 * hd * o.out_features * n_kv[i], n_kv[i])
                          for v in ranked.mean(0)]
    units.sort(key=lambda u: u[0])
    total = count_parameters(model)
    removed = dict.fromkeys(scores, 0)
    gone = 0
    for _, i, part, cost, count in units:  # lowest standardised fluctuation first, all layers
        if gone >= target * total:
            break
        if removed[(i, part)] + count >= scores[(i, part)].numel():
            continue  # every layer (every KV group) keeps at least one channel / head
        removed[(i, part)] += count
        gone += cost
    recipe = {p: {i: removed[(i, p)] / scores[(i, p)].numel()
                  for i in range(len(layers)) if removed[(i, p)]} for p in parts}
    bias: dict[tuple[int, str], torch.Tensor] = {}

    def select(part: str, index: int, layer: nn.Module, arch: DecoderArchitecture, k: int):
        score = scores[(index, part)].cpu()
        maps = (selection_maps(torch.topk(score, k).indices, score.numel()) if part == "mlp"
                else _keep_heads(score, n_kv[index], k))
        drop = maps[0].sum(0) == 0
        if part == "mlp":
            weight = arch.mlp_linears(layer)[2].weight
        else:
            attn = arch.attention_module(layer)
            weight = getattr(attn, arch.o).weight
            drop = drop.repeat_interleave(attn.head_dim)  # heads -> their o_proj columns
        drop = drop.to(weight.device)
        mean = means[(index, part)].to(weight.device)
        bias[(index, part)] = (weight.detach().double()[:, drop] @ mean[drop]).float()
        return maps

    work = transform_llm(model, select, ratio=None, target_sparsity=None, parts=parts,
                         recipe=recipe, inplace=inplace, method=method,
                         settings={"method": method, "target_sparsity": target})
    if not compensate:
        return work
    _add_compensation(work, arch, bias, parts)
    record = get_llm_record(work)
    assert record is not None  # transform_llm attached it
    record.params_after = count_parameters(work)
    return work


@torch.no_grad()
def _add_compensation(model: nn.Module, arch: DecoderArchitecture,
                      bias: dict[tuple[int, str], torch.Tensor], parts: tuple[str, ...]) -> None:
    """Biases for every projection of the pruned parts (zero except the compensation), so the
    config's `mlp_bias` / `attention_bias` describes the model and it reloads."""

    def with_bias(old: nn.Linear, extra: torch.Tensor | None) -> nn.Linear:
        new = nn.Linear(old.in_features, old.out_features, bias=True,
                        device=old.weight.device, dtype=old.weight.dtype)
        new.weight.copy_(old.weight)
        value = old.bias.float() if old.bias is not None else torch.zeros(
            old.out_features, device=old.weight.device)
        if extra is not None:
            value = value + extra.to(value.device)
        new.bias.copy_(value)
        return new

    for i, layer in enumerate(arch.layers(model)):
        if "mlp" in parts:
            mlp = layer.get_submodule(arch.mlp)
            for name in (arch.gate, arch.up, arch.down):
                extra = bias.get((i, "mlp")) if name == arch.down else None
                setattr(mlp, name, with_bias(getattr(mlp, name), extra))
        if "attention" in parts:
            attn = arch.attention_module(layer)
            for name in (arch.q, arch.k, arch.v, arch.o):
                extra = bias.get((i, "attention")) if name == arch.o else None
                setattr(attn, name, with_bias(getattr(attn, name), extra))
    if "mlp" in parts:
        model.config.mlp_bias = True
    if "attention" in parts:
        model.config.attention_bias = True
