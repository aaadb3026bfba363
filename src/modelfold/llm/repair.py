"""Data-free repair of folded LLM MLPs on text the model generates itself.

Merging SwiGLU channels (mean gate/up rows, summed down columns) is exact only for identical
channels; otherwise every layer's MLP output drifts and the drift compounds over the layers.
`repair="self_generated"` samples text from the model itself (no external data), then, layer by
layer in order, refits the folded down projection by ridge least squares so that on the inputs
the already-repaired folded model produces, the folded MLP reproduces the original MLP's output:

    D' = argmin ||A D_o^T - B D'^T||^2 + lam * mean(diag(B^T B)) * ||D'||^2

A = original SwiGLU activations (N x n), B = folded ones (N x k), both on the folded model's
inputs. Only the down projection changes (gate/up keep the merged rows).
"""

from __future__ import annotations

import torch
from torch import nn

from modelfold.errors import FoldError
from modelfold.llm.architectures import DecoderArchitecture


class _Captured(Exception):
    """Raised by a hook to stop the forward pass once the wanted input is captured."""


@torch.no_grad()
def self_generated_tokens(model: nn.Module, *, sequences: int = 16, length: int = 256,
                          seed: int = 0) -> torch.Tensor:
    """(sequences, length + 1) token ids sampled by `model` from its BOS token (top-p 0.95);
    `length` is capped by the model's context (max_position_embeddings - 1)."""
    start = getattr(model.config, "bos_token_id", None)
    if start is None:
        raise FoldError("repair='self_generated' starts generation from the BOS token, but "
                        "model.config.bos_token_id is not set.")
    device = next(model.parameters()).device
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None:
        length = min(length, int(context) - 1)
    prompt = torch.full((sequences, 1), int(start), dtype=torch.long, device=device)
    eos = getattr(model.config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return model.generate(prompt, attention_mask=torch.ones_like(prompt),
                              max_new_tokens=length, min_new_tokens=length, do_sample=True,
                              top_p=0.95, temperature=1.0,
                              pad_token_id=int(eos if eos is not None else start))


def _mlp_input(model: nn.Module, mlp: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    found: list[torch.Tensor] = []

    def hook(module, inputs):
        found.append(inputs[0].reshape(-1, inputs[0].shape[-1]).detach())
        raise _Captured

    handle = mlp.register_forward_pre_hook(hook)
    try:
        model(tokens)
    except _Captured:
        pass
    finally:
        handle.remove()
    return found[0]


def _activations(x: torch.Tensor, arch: DecoderArchitecture, layer: nn.Module) -> torch.Tensor:
    gate, up, _ = arch.mlp_linears(layer)
    act = layer.mlp.act_fn if hasattr(layer.mlp, "act_fn") else nn.functional.silu
    return act(x @ gate.weight.double().T) * (x @ up.weight.double().T)


@torch.no_grad()
def least_squares_repair(original: nn.Module, folded: nn.Module, arch: DecoderArchitecture,
                         tokens: torch.Tensor, *, ridge: float = 0.1) -> int:
    """Refit the down projection of every folded MLP (see the module docstring), first layer
    first. Returns the number of layers repaired."""
    repaired = 0
    for old, new in zip(arch.layers(original), arch.layers(folded), strict=True):
        _, _, down_old = arch.mlp_linears(old)
        _, _, down_new = arch.mlp_linears(new)
        if down_new.in_features == down_old.in_features:
            continue
        x = _mlp_input(folded, new.mlp, tokens).double()
        x = x.to(down_old.weight.device)
        target = _activations(x, arch, old) @ down_old.weight.double().T
        b = _activations(x.to(down_new.weight.device), arch, new)
        gram = b.T @ b
        gram += ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(
            gram.shape[0], dtype=gram.dtype, device=gram.device)
        weight = torch.linalg.solve(gram, b.T @ target.to(b.device)).T
        down_new.weight.copy_(weight.to(down_new.weight.dtype))
        repaired += 1
    return repaired
