"""Test helpers: plant duplicated channels and heads into a model, in every foldable group."""

from __future__ import annotations

import torch

from modelfold.graph import discover_groups
from modelfold.graph.handlers import find_layer_handler
from modelfold.graph.layout import SlotLayout


@torch.no_grad()
def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def plant_duplicates(model: torch.nn.Module, example) -> int:
    """Make channel i + n/2 an exact copy of channel i in every foldable group of even size.

    Producer rows, consumer columns, norm affine terms and BN statistics are all copied, so
    every group holds n/2 distinct channels, each twice. Returns the number of groups changed.
    """
    discovery = discover_groups(model, example)
    changed = 0
    for group in discovery.groups:
        if not group.foldable or group.n % 2:
            continue
        half = group.n // 2
        if group.kind == "heads":
            for tensor, axis, _ in group.head_blocks():
                _copy_heads(tensor, axis, group.n, half)
        else:
            for slot in group.slots:
                layout = SlotLayout.build(slot.idxs, slot.root_idxs, group.n, slot.name)
                handler = find_layer_handler(slot.module, slot.name)
                tensors = [t for t, _ in handler.tensors(slot.module, slot.role)]
                axes = [a for _, a in handler.tensors(slot.module, slot.role)]
                if isinstance(slot.module, torch.nn.modules.batchnorm._BatchNorm):
                    tensors += [slot.module.running_mean, slot.module.running_var]
                    axes += [0, 0]
                for tensor, axis in zip(tensors, axes):
                    moved = tensor.data.movedim(axis, 0)
                    src = layout.idxs[layout.positions[:half].reshape(-1)]
                    dst = layout.idxs[layout.positions[half:].reshape(-1)]
                    moved[dst] = moved[src]
        changed += 1
    return changed


def _copy_heads(tensor: torch.Tensor, axis: int, heads: int, half: int) -> None:
    moved = tensor.data.movedim(axis, 0)
    per = moved.shape[0] // heads
    for h in range(half):
        moved[(h + half) * per:(h + half + 1) * per] = moved[h * per:(h + 1) * per]


def tiny_llama(num_hidden_layers: int = 2):
    """A seeded 2-head Llama with hidden size 16 (transformers must be installed)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=num_hidden_layers,
                                      num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()
