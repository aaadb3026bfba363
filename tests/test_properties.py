"""Property-based tests (hypothesis) of `fold` over randomly generated small architectures.

Coverage: 4 architecture families, built by tests/random_archs.py from JSON specs:
  * mlp       - 1-3 Linear layers of width 4-24, optional BatchNorm1d / LayerNorm, ReLU / GELU /
                Tanh / SiLU, optional Dropout;
  * cnn       - 1-3 Conv2d layers of 4-16 channels, kernel 1 or 3, full / depthwise (+1x1) /
                grouped (groups=2) convs, optional BatchNorm2d, ReLU / GELU, optional max / avg
                pool, then flatten -> Linear or global average pool -> Linear;
  * resnet    - conv-BN-ReLU stem + 1-2 blocks conv-BN-ReLU-conv-BN with identity or 1x1
                conv-BN shortcut, add, ReLU;
  * attention - Linear embed + 1-2 pre-norm transformer blocks (LayerNorm + self-attention +
                GELU MLP): modelfold's q/k/v/o `SelfAttention` (folded by head) or
                `nn.MultiheadAttention` (unsupported: fold must raise FoldError).
Inputs are tiny: (2, 8) features, (2, 3, 8, 8) images, (2, 5, 8) tokens.

Properties, one test function each, parametrized over the 4 families (so every family is
drawn), each with `derandomize=True` (the same examples on every run, no example database):
  a. fold returns a model or raises FoldError, nothing else  - 4 x 20 = 80 examples, all specs
  b. a fold runs, keeps output shapes, is finite, and its size matches summary()
                                                              - 4 x 15 = 60, supported specs
  c. ratio 0 is the identity                                  - 4 x 10 = 40, supported specs
  d. the input model is untouched (even when fold fails)      - 4 x 10 = 40, all specs
  e. save -> load is exact (ratio 0.1-0.9)                    - 4 x 10 = 40, supported specs
  f. the same seed gives the same folded weights (0.1-0.9)    - 4 x 10 = 40, supported specs
300 generated examples in all (~7 s on 2 busy CPU cores), plus the regression test of the bug
these properties found (a depthwise conv on the network input). Ratios are drawn from [0, 0.9]
unless stated.

"Supported" specs leave out what modelfold documents as left unfolded or refused (grouped convs,
nn.MultiheadAttention).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import modelfold as mf
from modelfold.budget import kept_channels
from random_archs import build_model, example_inputs

FACTORY = "random_archs:build_model"  # tests/ is on sys.path under pytest, as for conftest

PROPS = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: intra-op threads only add overhead, and on a busy 2-core machine
    oversubscription makes a fold ~100x slower (seconds instead of ~20 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# strategies: JSON-serialisable specs (they are passed to mf.save as factory_kwargs)

seeds = st.integers(0, 2**16)
ratios = st.floats(0.0, 0.9, allow_nan=False)
folding_ratios = st.floats(0.1, 0.9, allow_nan=False)  # ratio 0 is property c's job


def mlp_specs() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        "family": st.just("mlp"), "seed": seeds,
        "widths": st.lists(st.integers(4, 24), min_size=1, max_size=3),
        "norm": st.sampled_from(["none", "bn", "ln"]),
        "act": st.sampled_from(["relu", "gelu", "tanh", "silu"]),
        "dropout": st.booleans(),
    })


@st.composite
def cnn_specs(draw, supported: bool) -> dict[str, Any]:
    convs = ["full", "depthwise"] + ([] if supported else ["grouped"])
    layer = st.fixed_dictionaries({
        "channels": st.integers(4, 16), "kernel": st.sampled_from([1, 3]),
        "conv": st.sampled_from(convs), "bn": st.booleans(),
        "act": st.sampled_from(["relu", "gelu"]),
        "pool": st.sampled_from(["none", "max", "avg"]),
    })
    layers = draw(st.lists(layer, min_size=1, max_size=3))
    return {"family": "cnn", "seed": draw(seeds), "layers": layers,
            "head": draw(st.sampled_from(["flatten", "gap"]))}


def resnet_specs() -> st.SearchStrategy[dict[str, Any]]:
    block = st.fixed_dictionaries({
        "mid": st.integers(4, 16), "out": st.integers(4, 16),
        "shortcut": st.sampled_from(["identity", "conv"]),
    })
    return st.fixed_dictionaries({
        "family": st.just("resnet"), "seed": seeds, "stem": st.integers(4, 16),
        "blocks": st.lists(block, min_size=1, max_size=2),
    })


@st.composite
def attention_specs(draw, supported: bool) -> dict[str, Any]:
    heads, head_dim = draw(st.integers(1, 4)), draw(st.integers(2, 4))
    kinds = ["qkvo"] + ([] if supported else ["mha"])
    return {"family": "attention", "seed": draw(seeds), "dim": heads * head_dim,
            "heads": heads, "hidden": draw(st.integers(4, 24)), "depth": draw(st.integers(1, 2)),
            "attn": draw(st.sampled_from(kinds))}


FAMILIES = ["mlp", "cnn", "resnet", "attention"]


def specs(family: str, supported: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Specs of one family; `supported=False` adds what modelfold cannot fold."""
    return {"mlp": mlp_specs, "cnn": lambda: cnn_specs(supported), "resnet": resnet_specs,
            "attention": lambda: attention_specs(supported)}[family]()


# ---------------------------------------------------------------------------------------------
# helpers

def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k])
        for k in sa)


# ---------------------------------------------------------------------------------------------
# properties

@pytest.mark.parametrize("family", FAMILIES)
@settings(PROPS, max_examples=20)
@given(data=st.data(), ratio=ratios)
def test_a_fold_returns_a_model_or_raises_fold_error(family, data, ratio):
    spec = data.draw(specs(family, supported=False), label="spec")
    model, x = build_model(**spec), example_inputs(spec)
    try:
        folded = mf.fold(model, x, ratio=ratio)
    except mf.FoldError as exc:
        event(f"FoldError: {str(exc)[:60]}")
        return  # the only acceptable failure; any other exception type fails the test
    event("folded")
    assert isinstance(folded, torch.nn.Module)
    assert folded is not model


@pytest.mark.parametrize("family", FAMILIES)
@settings(PROPS, max_examples=15)
@given(data=st.data(), ratio=ratios)
def test_b_folded_model_runs_and_matches_its_summary(family, data, ratio):
    spec = data.draw(specs(family, supported=True), label="spec")
    model, x = build_model(**spec), example_inputs(spec)
    folded = mf.fold(model, x, ratio=ratio)  # supported architectures must fold
    ref, out = run(model, x), run(folded, x)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    s = mf.summary(model, folded, x)
    assert s.params_after == n_params(folded)
    assert s.params_before == n_params(model)
    assert s.params_after <= s.params_before
    for g in s.groups:
        if g.status == "folded":
            assert g.k == kept_channels(g.n, ratio) < g.n, g
        else:
            assert g.k == g.n, g
    # module metadata follows the weights: the model is really smaller, not zero-padded
    for m in folded.modules():
        if isinstance(m, torch.nn.Conv2d):
            assert m.weight.shape[0] == m.out_channels
            assert m.weight.shape[1] * m.groups == m.in_channels
        elif isinstance(m, torch.nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features)
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            assert m.weight.shape == m.running_mean.shape == (m.num_features,)
        elif isinstance(m, torch.nn.LayerNorm):
            assert m.weight.shape == tuple(m.normalized_shape)


@pytest.mark.parametrize("family", FAMILIES)
@settings(PROPS, max_examples=10)
@given(data=st.data())
def test_c_ratio_zero_is_the_identity(family, data):
    spec = data.draw(specs(family, supported=True), label="spec")
    model, x = build_model(**spec), example_inputs(spec)
    folded = mf.fold(model, x, ratio=0.0)
    assert n_params(folded) == n_params(model)
    ref, out = run(model, x), run(folded, x)
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
@settings(PROPS, max_examples=10)
@given(data=st.data(), ratio=ratios, training=st.booleans())
def test_d_input_model_is_untouched(family, data, ratio, training):
    spec = data.draw(specs(family, supported=False), label="spec")
    model, x = build_model(**spec), example_inputs(spec)
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    structure = repr(model)
    with contextlib.suppress(mf.FoldError):  # a failed fold must not touch the model either
        mf.fold(model, x, ratio=ratio)
    assert model.training == training
    assert [m.training for m in model.modules()] == modes
    assert repr(model) == structure
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("family", FAMILIES)
@settings(PROPS, max_examples=10)
@given(data=st.data(), ratio=folding_ratios)
def test_e_save_load_round_trip_is_exact(family, data, ratio):
    spec = data.draw(specs(family, supported=True), label="spec")
    model, x = build_model(**spec), example_inputs(spec)
    folded = mf.fold(model, x, ratio=ratio)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "folded"
        mf.save(folded, path, factory=FACTORY, factory_kwargs=spec)
        again = mf.load(path)
    assert type(again) is type(folded)
    assert torch.equal(run(again, x), run(folded, x))
    assert same_state(again, folded)


@pytest.mark.parametrize("family", FAMILIES)
@settings(PROPS, max_examples=10)
@given(data=st.data(), ratio=folding_ratios)
def test_f_same_seed_gives_the_same_folded_weights(family, data, ratio):
    spec = data.draw(specs(family, supported=True), label="spec")
    model, x = build_model(**spec), example_inputs(spec)
    a = mf.fold(model, x, ratio=ratio, seed=0)
    b = mf.fold(copy.deepcopy(model), x, ratio=ratio, seed=0)
    assert same_state(a, b)


# ---------------------------------------------------------------------------------------------
# regression: found by the properties above (a depthwise conv on the network input once had its
# group folded, although its channels are the input's)

def test_depthwise_conv_on_the_input_is_left_unfolded():
    spec = {"family": "cnn", "seed": 0, "head": "gap", "layers": [
        {"channels": 4, "kernel": 1, "conv": "depthwise", "bn": False, "act": "relu",
         "pool": "none"}]}
    model, x = build_model(**spec), example_inputs(spec)
    folded = mf.fold(model, x, ratio=0.5)
    assert run(folded, x).shape == run(model, x).shape
    statuses = {g.status for g in mf.summary(model, folded, x).groups}
    assert "unsafe" in statuses and "folded" in statuses
