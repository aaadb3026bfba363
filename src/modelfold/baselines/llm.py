"""Structured pruning baselines for LLMs, with the same parts, shapes and budgets as folding.

- "magnitude" (data-free, LLM-Pruner-style): an MLP channel scores the L2 norm of [gate row |
  up row | down column]; a query head the L2 norm of its q rows and o columns (plus k and v rows
  with multi-head attention).
- "wanda-sp" (data-driven, Wanda's structured variant as in FLAP's `wanda_sp`): a channel scores
  sum_i |W_down[i, j]| * ||X_j||, X = the input of `down_proj` over calibration tokens; a head
  sums the same score over its `o_proj` input columns. Statistics come from one forward pass of
  the dense model (one-shot, as in `anchor_llm.md`).
The top-k channels / heads are kept in their original order (per KV group with GQA); the layers
are rebuilt by the same code as folding (`modelfold.llm.fold.transform_llm`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from modelfold.errors import FoldError
from modelfold.llm.architectures import DecoderArchitecture, architecture_of
from modelfold.llm.fold import head_blocks, selection_maps, transform_llm

LLM_PRUNING_METHODS = ("magnitude", "wanda-sp")


def prune_llm(
    model: nn.Module,
    *,
    method: str = "magnitude",
    ratio: float | None = None,
    target_sparsity: float | None = None,
    parts: Iterable[str] = ("mlp",),
    recipe: str | Mapping[str, Mapping[Any, float]] | None = None,
    calibration: torch.Tensor | None = None,
    statistics: dict[tuple[int, str], torch.Tensor] | None = None,
    batch_size: int = 4,
    inplace: bool = False,
) -> nn.Module:
    """Remove the lowest-scoring MLP channels / query heads (see the module docstring).

    `calibration`: (N, L) token windows, required by "wanda-sp" unless `statistics` (the output
    of `input_norms` on the same model, reusable across budgets) is given.
    """
    if method not in LLM_PRUNING_METHODS:
        raise FoldError(f"unknown LLM pruning method {method!r}; known: {LLM_PRUNING_METHODS}.")
    arch = architecture_of(model)
    norms = None
    if method == "wanda-sp" and statistics is not None:
        norms = statistics
    elif method == "wanda-sp":
        if calibration is None:
            raise FoldError("wanda-sp needs `calibration`: token windows (N, L) of real text.")
        norms = input_norms(model, arch, calibration, batch_size=batch_size)
    selector = _selector(norms)
    return transform_llm(model, selector, ratio=ratio, target_sparsity=target_sparsity,
                         parts=parts, recipe=recipe, inplace=inplace, method=method,
                         settings={"method": method})


@torch.no_grad()
def input_norms(model: nn.Module, arch: DecoderArchitecture, calibration: torch.Tensor, *,
                batch_size: int = 4) -> dict[tuple[int, str], torch.Tensor]:
    """||X_j||_2 of the inputs of every `down_proj` and `o_proj` over all calibration tokens."""
    calibration = torch.as_tensor(calibration)
    if calibration.dim() != 2 or calibration.dtype not in (torch.long, torch.int):
        raise FoldError(f"calibration must be integer token windows (N, L), got "
                        f"{tuple(calibration.shape)} {calibration.dtype}.")
    sums: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(arch.layers(model)):
        down = arch.mlp_linears(layer)[2]
        o = getattr(arch.attention_module(layer), arch.o)
        for name, module in (("mlp", down), ("attention", o)):
            def hook(_module, args, key=(i, name)):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + (x * x).sum(0)
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
    return {k: v.sqrt().float() for k, v in sums.items()}


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
        score = score.cpu()
        if n_q == n_kv:
            return selection_maps(torch.topk(score, k).indices, n_q)
        m, per_group = n_q // n_kv, k // n_kv
        keep = torch.cat([g * m + torch.topk(score[g * m:(g + 1) * m], per_group).indices
                          for g in range(n_kv)])
        return selection_maps(keep, n_q)

    return select
