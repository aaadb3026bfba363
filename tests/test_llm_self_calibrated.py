"""Self-calibrated LLM folding: clusterer="activation", allocation="sensitivity",
repair="self_generated", all on text the model generates itself."""

from __future__ import annotations

import copy

import pytest
import torch

import modelfold as mf
from conftest import make_model
from modelfold.llm import architecture_of
from modelfold.llm.repair import (
    LayerStepper,
    activation_fold,
    gaussian_energy,
    protect,
    ridge_refit,
    self_generated_tokens,
    sensitive_layers,
)
from modelfold.llm.stream import fold_checkpoint
from test_llm import logits, plant_mlp_duplicates, tiny

BEST = dict(clusterer="activation", allocation="sensitivity", repair="self_generated")


def test_the_model_writes_its_own_calibration_text_deterministically():
    model = tiny()
    tokens = self_generated_tokens(model, sequences=4, length=20, seed=3)
    assert tokens.shape == (4, 20)  # the BOS prompt is dropped
    assert torch.equal(tokens, self_generated_tokens(model, sequences=4, length=20, seed=3))
    assert not torch.equal(tokens, self_generated_tokens(model, sequences=4, length=20, seed=4))
    assert self_generated_tokens(model, sequences=2, length=500).shape == (2, 63)  # context 64
    no_bos = copy.deepcopy(model)
    no_bos.config.bos_token_id = None  # falls back to the end-of-text token
    assert self_generated_tokens(no_bos, sequences=2, length=5).shape == (2, 5)
    no_bos.config.eos_token_id = None
    with pytest.raises(mf.FoldError, match="bos_token_id"):
        self_generated_tokens(no_bos)


def inputs_in_full_forward(model, tokens, module_of) -> list[torch.Tensor]:
    """The input of `module_of(layer)` in every decoder layer during one full forward pass."""
    seen = []
    handles = [module_of(layer).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
               for layer in model.model.layers]
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    return seen


def test_layer_stepper_reproduces_every_mlp_input_of_the_full_forward():
    model = tiny(num_hidden_layers=3)
    tokens = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    seen = inputs_in_full_forward(model, tokens, lambda layer: layer.mlp)
    stepper = LayerStepper(model, architecture_of(model), tokens)
    with torch.no_grad():
        for i, expected in enumerate(seen):  # later layers reached through the MLP shortcut
            x, residual = stepper.mlp_input(i)
            torch.testing.assert_close(x, expected.reshape(x.shape), atol=1e-5, rtol=1e-5)
            assert residual.shape == x.shape
    with pytest.raises(mf.FoldError, match="in order"):
        stepper.mlp_input(0)


def test_activation_fold_merges_a_scaled_copy_into_its_centre_exactly():
    torch.manual_seed(0)
    z = torch.randn(200, 5)
    z[:, 4] = 0.5 * z[:, 1]  # channel 4 = half of channel 1
    down = torch.randn(8, 5)
    down[:, 4] *= 0.01  # a small contribution: channel 4 is not a centre
    mean_map, sum_map, folded, centres = activation_fold((z.T @ z).double(), down, 4)
    assert torch.equal(centres, torch.tensor([0, 1, 2, 3]))
    assert torch.equal(mean_map.argmax(1), centres)
    assert torch.allclose(mean_map.sum(1), torch.ones(4))
    torch.testing.assert_close(sum_map[1, 4], torch.tensor(0.5))
    torch.testing.assert_close(z[:, :4] @ folded.T, z @ down.T, atol=1e-5, rtol=1e-5)


def test_activation_fold_ranks_centres_by_the_given_energy_and_merges_with_the_gram():
    torch.manual_seed(0)
    z = torch.randn(300, 4)
    z[:, 3] = 2.0 * z[:, 0]  # channel 3 = twice channel 0: the larger of the pair on the text
    down = torch.ones(6, 4)
    gram = (z.T @ z).double()
    assert 3 in activation_fold(gram, down, 3)[3]
    energy = gram.diagonal().clone()
    energy[3] = 0.01 * energy.min()  # e.g. idle under other input: now channel 0 is the centre
    _, sum_map, folded, centres = activation_fold(gram, down, 3, centre_energy=energy)
    assert torch.equal(centres, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(sum_map[0, 3], torch.tensor(2.0))  # the scale is the Gram's
    torch.testing.assert_close(z[:, :3] @ folded.T, z @ down.T, atol=1e-4, rtol=1e-4)


def test_gaussian_energy_is_the_expectation_under_the_weighted_second_moment():
    # identity activation: z_j = (g_j . x)(u_j . x) and, by Isserlis' theorem for x ~ N(0, S),
    # E[z_j^2] = (g S g)(u S u) + 2 (g S u)^2
    torch.manual_seed(0)
    mix = torch.randn(5, 5) / 2
    x = torch.randn(40_000, 5) @ mix.T  # second moment S = mix mix^T
    x = torch.cat([x, 10 * torch.randn(40_000, 5)])  # tokens of weight 0 count for nothing
    weights = torch.cat([torch.full((40_000,), 3.0), torch.zeros(40_000)])
    gate, up = torch.randn(3, 5), torch.randn(3, 5)
    second = mix @ mix.T
    expected = ((gate @ second * gate).sum(1) * (up @ second * up).sum(1)
                + 2 * (gate @ second * up).sum(1) ** 2)
    energy = gaussian_energy(x, weights, gate, up, lambda a: a, seed=1)
    torch.testing.assert_close(energy, expected, rtol=0.08, atol=0)
    assert torch.equal(energy, gaussian_energy(x, weights, gate, up, lambda a: a, seed=1))


def test_ridge_refit_never_raises_the_error_it_minimises():
    torch.manual_seed(1)
    b, y = torch.randn(300, 6), torch.randn(300, 4)
    prior = torch.randn(4, 6)
    err = lambda d: float((y - b @ d.T).pow(2).sum())  # noqa: E731
    for ridge in (0.01, 1.0, 100.0):
        assert err(ridge_refit(b.T @ b, b.T @ y, prior, ridge)) <= err(prior)
    exact = torch.randn(4, 6)  # an exact prior is kept
    torch.testing.assert_close(ridge_refit(b.T @ b, b.T @ (b @ exact.T), exact, 1.0), exact,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_activation_clustering_folds_planted_copies_losslessly(arch):
    model = tiny(arch)
    model.config.eos_token_id = 2  # tiny Qwen2 configs set no special tokens; real ones do
    # weak copies (1 % of the pair's down column): not centres, and folding them is exact
    plant_mlp_duplicates(model, 24, share=0.01)
    for repair in ("none", "self_generated"):
        folded = mf.fold(model, config=mf.LLMFoldConfig(ratio=0.25, clusterer="activation",
                                                     repair=repair))
        assert all(layer.mlp.down_proj.in_features == 72 for layer in folded.model.layers)
        torch.testing.assert_close(logits(folded), logits(model), atol=1e-4, rtol=1e-4)


def test_self_calibrated_fold_beats_weight_folding_and_is_deterministic(tmp_path):
    model = tiny(num_hidden_layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kmeans = mf.fold(model, ratio=0.5)
    best = mf.fold(model, config=mf.LLMFoldConfig(ratio=0.5, **BEST))
    ref = logits(model)
    assert (logits(best) - ref).norm() < (logits(kmeans) - ref).norm()
    again = mf.fold(model, config=mf.LLMFoldConfig(ratio=0.5, **BEST))
    torch.testing.assert_close(logits(best), logits(again), rtol=0, atol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert mf.llm.fold.count_parameters(best) == mf.llm.fold.count_parameters(kmeans)
    assert best._modelfold_llm_record["settings"]["clusterer"] == "activation"
    mf.save(best, tmp_path / "best")
    torch.testing.assert_close(logits(mf.load(tmp_path / "best")), logits(best))


def test_sensitivity_allocation_protects_the_layer_folding_hurts_most():
    model = tiny(num_hidden_layers=5)
    with torch.no_grad():  # layer 2's MLP dominates the residual stream
        model.model.layers[2].mlp.down_proj.weight.mul_(30)
    arch = architecture_of(model)
    tokens = self_generated_tokens(model, sequences=4, length=32)
    assert sensitive_layers(model, arch, tokens, [48] * 5) == [2]
    uniform = mf.fold(model, config=mf.LLMFoldConfig(ratio=0.5, clusterer="activation"))
    spread = mf.fold(model, config=mf.LLMFoldConfig(ratio=0.5, clusterer="activation",
                                                 allocation="sensitivity"))
    widths = [layer.mlp.down_proj.in_features for layer in spread.model.layers]
    assert widths[2] == 96 and widths == [36, 36, 96, 36, 36]
    count = mf.llm.fold.count_parameters
    assert count(spread) == count(uniform)
    ref = logits(model)
    assert (logits(spread) - ref).norm() < (logits(uniform) - ref).norm()
    with_heads = mf.fold(model, parts=("mlp", "attention"), config=mf.LLMFoldConfig(
        ratio=0.5, clusterer="activation", allocation="sensitivity"))
    assert [layer.mlp.down_proj.in_features for layer in with_heads.model.layers][2] == 96
    # too large a budget for the other layers to absorb layer 2's channels: nothing protected
    # rather than an error (e.g. Gemma 3 270M at 20 % of all parameters = 76 % of its MLPs)
    steep = mf.fold(model, config=mf.LLMFoldConfig(ratio=0.95, clusterer="activation",
                                                 allocation="sensitivity"))
    assert {layer.mlp.down_proj.in_features for layer in steep.model.layers} == {5}


def test_protect_keeps_the_total_and_multiples():
    assert protect([10, 10, 10, 10], [16] * 4, [0]) == [16, 8, 8, 8]
    assert protect([10, 10, 10], [16] * 3, []) == [10, 10, 10]
    kept = protect([64, 64, 64, 64, 64], [128] * 5, [1], round_to=16)
    assert kept[1] == 128 and sum(kept) == 5 * 64 and all(k % 16 == 0 for k in kept)
    with pytest.raises(mf.FoldError, match="do not fit"):
        protect([2, 2, 2], [16, 16, 16], [0])


def test_self_calibrated_options_refuse_what_they_cannot_do(tmp_path):
    model = tiny()
    with pytest.raises(mf.FoldError, match="in place"):
        mf.fold(copy.deepcopy(model), config=mf.LLMFoldConfig(ratio=0.5, **BEST), inplace=True)
    with pytest.raises(mf.FoldError, match="Hugging Face causal LM"):
        mf.fold(make_model("resnet18"), torch.randn(1, 3, 32, 32),
                config=mf.FoldConfig(ratio=0.3, clusterer="activation"))
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(mf.FoldError, match="fold in memory"):  # heads ranked on gradients
        fold_checkpoint(tmp_path / "src", tmp_path / "out", parts=("mlp", "attention"),
                        config=mf.LLMFoldConfig(ratio=0.9, self_calibrate=True))
    assert not (tmp_path / "out").exists()
    with pytest.raises(mf.FoldError, match="unknown"):
        mf.FoldConfig(ratio=0.5, clusterer="activations")
