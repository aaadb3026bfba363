"""Self-calibrated folding of attention heads: heads chosen and merged by their outputs on
self-generated text, the output projection refitted; the budget split between heads and MLP
channels by measured output errors."""

from __future__ import annotations

import pytest
import torch

import modelfold as mf
from modelfold.llm import architecture_of
from modelfold.llm.fold import count_parameters
from modelfold.llm.repair import LayerStepper, choose_heads, head_fold, self_generated_tokens
from test_llm import ARCHS, logits, plant_query_head_duplicates, tiny
from test_llm_self_calibrated import inputs_in_full_forward

CALIBRATED = dict(clusterer="activation", repair="self_generated")


def _tiny(arch: str = "llama", **kw):
    return tiny(arch, bos_token_id=1, eos_token_id=2, **kw)


def test_layer_stepper_reproduces_every_attention_output_projection_input():
    model = _tiny(num_hidden_layers=3)
    tokens = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    seen = inputs_in_full_forward(model, tokens, lambda layer: layer.self_attn.o_proj)
    stepper = LayerStepper(model, architecture_of(model), tokens)
    with torch.no_grad():
        for i, expected in enumerate(seen):
            heads, out, stream = stepper.attention_input(i)
            torch.testing.assert_close(heads, expected.reshape(heads.shape), atol=1e-5,
                                       rtol=1e-5)
            layer = model.model.layers[i]
            torch.testing.assert_close(out, layer.self_attn.o_proj(heads))
            assert stream.shape == out.shape
            stepper.mlp_input(i)  # the MLP input of the same layer is still reachable


def test_head_fold_drops_and_absorbs_an_exact_copy_within_its_group():
    torch.manual_seed(0)
    hd, hidden, tokens = 4, 10, 200
    a = torch.randn(tokens, 4 * hd, dtype=torch.float64)  # 4 heads, 2 groups of 2
    a[:, 3 * hd:] = a[:, 2 * hd: 3 * hd] @ torch.randn(hd, hd, dtype=torch.float64)  # 3 ~ 2
    o = torch.randn(hidden, 4 * hd)
    gram = a.T @ a
    groups = [[0, 1], [2, 3]]
    assert choose_heads(gram, o, groups, 1, hd) in ([0, 2], [1, 2], [0, 3], [1, 3])
    mean_map, sum_map, refit = head_fold(gram, o, groups, 2, hd, ridge=4.0)
    kept = mean_map.argmax(1).tolist()
    assert kept[1] in (2, 3) and sum_map[1, 2] == sum_map[1, 3] == 1  # group 2 merges
    b = a[:, torch.cat([torch.arange(k * hd, (k + 1) * hd) for k in kept])]
    error = (a @ o.double().T - b @ refit.double().T).pow(2).sum()
    # group 1's heads are independent: only their loss remains; group 2's copy costs nothing
    g1 = (a[:, :2 * hd] @ o.double()[:, :2 * hd].T)
    assert error < g1.pow(2).sum()
    with_copy_only = head_fold(gram[2 * hd:, 2 * hd:], o[:, 2 * hd:], [[0, 1]], 1, hd)
    b = a[:, 2 * hd: 3 * hd] if with_copy_only[0].argmax() == 0 else a[:, 3 * hd:]
    torch.testing.assert_close(b @ with_copy_only[2].double().T,
                               a[:, 2 * hd:] @ o[:, 2 * hd:].double().T, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_planted_duplicate_query_heads_fold_losslessly_on_self_generated_text(arch):
    model = _tiny(arch, heads=4, kv=2)  # groups of 2: every pair is a duplicate
    plant_query_head_duplicates(model)
    folded = mf.fold(model, config=mf.LLMFoldConfig(ratio=0.5, parts=("attention",),
                                                    **CALIBRATED))
    assert all(layer.self_attn.q_proj.out_features == 32 for layer in folded.model.layers)
    torch.testing.assert_close(logits(folded), logits(model), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("heads,kv", [(8, 2), (4, 4), (4, 1)])
def test_calibrated_head_fold_is_deterministic_and_leaves_the_model_intact(heads, kv):
    model = _tiny(heads=heads, kv=kv, num_hidden_layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = dict(ratio=0.5, parts=("attention",))
    calibrated = mf.fold(model, config=mf.LLMFoldConfig(**config, **CALIBRATED))
    weights = mf.fold(model, config=mf.LLMFoldConfig(**config))
    assert count_parameters(calibrated) == count_parameters(weights) < count_parameters(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    again = mf.fold(model, config=mf.LLMFoldConfig(**config, **CALIBRATED))
    torch.testing.assert_close(logits(again), logits(calibrated), atol=0, rtol=0)
    text = self_generated_tokens(model, seed=0)
    assert (logits(calibrated, text) - logits(model, text)).abs().max() < 1.0


def test_split_spends_on_mlp_channels_first_then_on_the_cheapest_heads(tmp_path):
    model = _tiny(heads=4, kv=2, num_hidden_layers=4)
    with torch.no_grad():  # layer 2's query heads come in identical pairs: removable for free
        attn = model.model.layers[2].self_attn
        for h in (0, 2):
            a, b = slice(h * 16, (h + 1) * 16), slice((h + 1) * 16, (h + 2) * 16)
            attn.q_proj.weight[b] = attn.q_proj.weight[a]
    total = count_parameters(model)

    def fold(target):
        config = mf.LLMFoldConfig(target_sparsity=target, parts=("mlp", "attention"),
                                  self_calibrate=True, sparsity_tolerance=0.02)
        assert (config.clusterer, config.allocation) == ("activation", "sensitivity")
        folded = mf.fold(model, config=config)
        assert abs(1 - count_parameters(folded) / total - target) <= 0.02
        return folded, [layer.self_attn.q_proj.out_features // 16
                        for layer in folded.model.layers]

    _, heads = fold(0.3)  # the MLPs can give 30 % alone: every head stays
    assert heads == [4, 4, 4, 4]
    folded, heads = fold(0.5)  # beyond 80 % of the MLP channels: two head units needed
    assert heads[2] == 2 and sorted(heads) == [2, 2, 4, 4]
    assert folded._modelfold_llm_record.ratios["attention"]["2"] == 0.5
    loaded = mf.load(mf.save(folded, tmp_path / "split"))
    torch.testing.assert_close(logits(loaded), logits(folded), atol=0, rtol=0)
