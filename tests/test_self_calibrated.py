"""Self-calibrated folding (`fold(..., self_calibrate=True)`): the model synthesises its own
calibration inputs; channels merge by activation; sensitivity allocates; consumers refit."""

from __future__ import annotations

import pytest
import torch

import modelfold as mf
from conftest import make_model
from helpers import n_params, plant_duplicates
from modelfold.calibrate import synthetic
from modelfold.calibrate.activation import centre_merge, pick_centres

# a fast synthesis for the small test models (the defaults are sized for real networks)
FAST = {"samples": 16, "steps": 20}


@pytest.fixture(autouse=True)
def fast_synthesis(monkeypatch):
    original = synthetic.synthetic_inputs

    def fast(model, example, **kw):
        return original(model, example, **{**FAST, **kw})

    monkeypatch.setattr(synthetic, "synthetic_inputs", fast)


def _out(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", ["bn_mlp", "lenet5", "resnet18", "vgg11_bn", "mobilenet_v2",
                                  "densenet_small", "vit_tiny"])
def test_planted_duplicates_fold_losslessly(name, example):
    model = make_model(name)
    x = torch.randn(2, *_input_shape(model), generator=torch.Generator().manual_seed(1))
    assert plant_duplicates(model, x) > 0
    folded = mf.fold(model, x, ratio=0.5, self_calibrate=True)
    assert n_params(folded) < n_params(model)
    torch.testing.assert_close(_out(folded, x), _out(model, x), rtol=1e-3, atol=1e-3)


def _input_shape(model):
    first = next(m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    return (first.in_features,) if isinstance(first, torch.nn.Linear) else (first.in_channels,
                                                                             32, 32)


def test_ratio_zero_is_identity_and_the_model_is_not_mutated(example):
    model = make_model("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = mf.fold(model, example, ratio=0.0, self_calibrate=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(_out(folded, example), _out(model, example))


def test_deterministic_for_a_seed_and_blind_to_the_example_values(example):
    """The example input only gives the shape: folding with real-looking and random inputs of
    the same shape gives the same model, so no real input value reaches the calibration."""
    model = make_model("vgg11_bn")
    a = mf.fold(model, example, target_sparsity=0.3, self_calibrate=True, seed=3)
    b = mf.fold(model, example, target_sparsity=0.3, self_calibrate=True, seed=3)
    c = mf.fold(model, torch.rand_like(example) * 255, target_sparsity=0.3,
                self_calibrate=True, seed=3)
    for (k, v), w, u in zip(a.state_dict().items(), b.state_dict().values(),
                            c.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
        assert torch.equal(v, u), k
    d = mf.fold(model, example, target_sparsity=0.3, self_calibrate=True, seed=4)
    assert any(not torch.equal(v, w) for v, w in zip(a.state_dict().values(),
                                                     d.state_dict().values(), strict=False))


def test_target_sparsity_is_met_and_recorded(example):
    model = make_model("mobilenet_v2")
    folded = mf.fold(model, example, target_sparsity=0.25, self_calibrate=True)
    achieved = 1 - n_params(folded) / n_params(model)
    assert abs(achieved - 0.25) <= 0.01
    info = folded._modelfold_record
    assert info.config["self_calibrate"] is True
    report = info.extra["self_calibration"]
    assert report["calibration_inputs"][0] == FAST["samples"]
    assert report["observed_groups"] and report["refitted_layers"]


def test_sensitivity_spares_groups_whose_channels_are_all_distinct(example):
    """A group made of exact pairs folds for free; the allocation takes the budget there."""
    model = make_model("vgg11_bn")
    plant_duplicates(model, example)
    folded = mf.fold(model, example, ratio=0.25, self_calibrate=True)
    torch.testing.assert_close(_out(folded, example), _out(model, example), rtol=1e-3,
                               atol=1e-3)


def test_centres_pass_over_exact_copies():
    z = torch.randn(200, 4, dtype=torch.float64)
    z = torch.cat([z, z[:, :1] * 3.0], 1)  # channel 4 = 3 x channel 0, highest score
    gram = z.T @ z
    scores = torch.tensor([1.0, 0.5, 0.4, 0.3, 3.0], dtype=torch.float64)
    centres = pick_centres(gram, scores, 4)
    assert centres.tolist() == [1, 2, 3, 4]  # channel 0 folds into its copy
    _, owner, scale = centre_merge(gram, scores, 4)
    assert owner[0] == 3 and abs(float(scale[0]) - 1 / 3) < 1e-9


def _bn_gap(model, x) -> float:
    losses: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(synthetic._bn_loss_hook(losses))
             for m in synthetic._batchnorms(model)]
    try:
        _out(model, x)
    finally:
        for h in hooks:
            h.remove()
    return float(sum(losses) / len(losses))


def test_bn_inversion_finds_the_input_range_and_matches_the_running_statistics():
    """BN statistics recorded on raw-pixel-like inputs (mean 120, std 60): the inversion
    starts from the right scale and gets much closer to them than standard noise."""
    model = make_model("vgg11_bn")
    gen = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(64, 3, 36, 36, generator=gen), 5, 1)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    with torch.no_grad():
        model(120 + 60 * smooth / smooth.std())
    model.eval()
    images = synthetic.invert_batchnorm(model, (3, 32, 32), samples=16, steps=100, seed=0)
    noise = torch.randn(16, 3, 32, 32, generator=gen)
    assert _bn_gap(model, images) < 0.25 * _bn_gap(model, noise)
    assert 60 < float(images.mean()) < 180 and 15 < float(images.std()) < 180


def test_token_models_get_sampled_tokens_with_their_special_tokens():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=40), add_pooling_layer=False).eval()
    example = {"input_ids": torch.tensor([[2, 10, 11, 12, 3]]),
               "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    tokens = synthetic.synthetic_inputs(bert, example, samples=8, seed=0)
    assert tokens["input_ids"].shape == (8, 32)
    assert (tokens["input_ids"][:, 0] == 2).all() and (tokens["input_ids"][:, -1] == 3).all()
    assert (tokens["attention_mask"] == 1).all()
    again = synthetic.synthetic_inputs(bert, example, samples=8, seed=0)
    assert torch.equal(tokens["input_ids"], again["input_ids"])
    folded = mf.fold(bert, example, ratio=0.5, self_calibrate=True)
    assert n_params(folded) < n_params(bert)


def test_llms_take_the_self_generated_text_recipe():
    from test_llm import plant_mlp_duplicates, tiny

    model = tiny()
    plant_mlp_duplicates(model, 48)
    folded = mf.fold(model, ratio=0.5, self_calibrate=True)
    settings = folded._modelfold_llm_record["settings"]
    assert (settings["clusterer"], settings["allocation"], settings["repair"]) == (
        "activation", "sensitivity", "self_generated")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, model(ids).logits, rtol=1e-3, atol=1e-3)


def test_self_calibrate_refuses_a_repair_it_would_override(example):
    with pytest.raises(mf.FoldError, match="self_calibrate"):
        mf.fold(make_model("lenet5"), example, ratio=0.3, self_calibrate=True, repair="approx")
