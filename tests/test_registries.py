"""Pipeline configs and strategy registries: JSON round trips, dispatch by config type, names
checked against the registries, custom strategies end to end."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

import modelfold as mf
from conftest import make_model
from modelfold.baselines.llm import LLM_PRUNING, llm_pruning_methods
from modelfold.budget import ALLOCATIONS, register_allocation
from modelfold.cluster import CLUSTERERS, FEATURES, register_clusterer
from modelfold.config import PIPELINES, PipelineConfig
from modelfold.llm.fold import LLM_ALLOCATIONS, LLM_CLUSTERERS, LLM_REPAIRS
from modelfold.repair import REPAIRS
from modelfold.repair.approx import CORRELATIONS


def test_fold_config_json_round_trip():
    cfg = mf.FoldConfig(target_sparsity=0.4, module_ratios={"conv1": 0.25}, clusterer="hartigan",
                        allocation="inertia", repair="approx", ar_correlation="producer",
                        round_to=4, seed=3)
    assert mf.FoldConfig.from_json(cfg.to_json()) == cfg
    assert mf.FoldConfig.from_dict(cfg.to_dict()) == cfg


def test_llm_config_json_round_trip():
    cfg = mf.LLMFoldConfig(recipe={"mlp": {"1-2": 0.25, 0: 0.5}, "attention": {1: 0.5}},
                           parts=["mlp", "attention"], clusterer="ward", round_to=8, seed=5)
    assert cfg.parts == ("mlp", "attention")
    again = mf.LLMFoldConfig.from_json(cfg.to_json())
    assert again == cfg and again.to_json() == cfg.to_json()
    recipe = mf.LLMFoldConfig(ratio=0.2, self_calibrate=True)
    assert (recipe.clusterer, recipe.allocation, recipe.repair) == (
        "activation", "sensitivity", "self_generated")
    assert mf.LLMFoldConfig.from_json(recipe.to_json()) == recipe


def test_configs_hold_only_their_own_fields():
    graph = {f.name for f in dataclasses.fields(mf.FoldConfig)}
    llm = {f.name for f in dataclasses.fields(mf.LLMFoldConfig)}
    assert {"recipe", "parts"} <= llm - graph
    assert {"module_ratios", "features", "ar_correlation", "deep_inversion",
            "calibration_samples"} <= graph - llm
    with pytest.raises(mf.FoldError, match="unknown keys"):
        mf.LLMFoldConfig.from_dict({"ratio": 0.5, "module_ratios": {}})


def test_old_fold_config_json_with_llm_values_names_the_llm_config():
    old = mf.FoldConfig(ratio=0.5).to_dict() | {"clusterer": "activation"}
    with pytest.raises(mf.FoldError, match=r"'activation' applies to .*LLMFoldConfig"):
        mf.FoldConfig.from_dict(old)
    with pytest.raises(mf.FoldError, match="version 2"):
        mf.FoldConfig.from_dict(mf.FoldConfig(ratio=0.5).to_dict() | {"version": 2})


STRATEGIES = [
    (mf.FoldConfig, "clusterer", CLUSTERERS.names),
    (mf.FoldConfig, "features", FEATURES.names),
    (mf.FoldConfig, "allocation", ALLOCATIONS.names),
    (mf.FoldConfig, "repair", REPAIRS.names),
    (mf.FoldConfig, "ar_correlation", CORRELATIONS.names),
    (mf.LLMFoldConfig, "clusterer",
     lambda: sorted({*CLUSTERERS.names(), *LLM_CLUSTERERS.names()})),
    (mf.LLMFoldConfig, "allocation", LLM_ALLOCATIONS.names),
    (mf.LLMFoldConfig, "repair", LLM_REPAIRS.names),
]


@pytest.mark.parametrize(("cls", "field", "names"), STRATEGIES)
def test_validate_accepts_exactly_the_registered_names(cls, field, names):
    registered = names()
    assert registered and registered == cls.choices()[field]()
    for name in registered:
        assert getattr(cls(ratio=0.5, **{field: name}), field) == name
    with pytest.raises(mf.FoldError) as err:
        cls(ratio=0.5, **{field: "no-such-strategy"})
    message = str(err.value)
    assert f"{cls.__name__}.{field}='no-such-strategy' is unknown" in message
    assert str(registered) in message


def test_llm_pruning_methods_come_from_the_registry():
    names = ["flap", "flap-no-bias", "llm-pruner", "llm-pruner-e2", "magnitude", "wanda-sp"]
    assert llm_pruning_methods() == LLM_PRUNING.names() == names
    with pytest.raises(mf.FoldError, match=r"registered: \['flap', 'flap-no-bias', "
                       r"'llm-pruner', 'llm-pruner-e2', 'magnitude', 'wanda-sp'\]"):
        LLM_PRUNING.get("sparsegpt")


def test_fold_dispatches_on_the_config_type():
    assert PIPELINES[mf.FoldConfig].options == ("ignored", "inplace", "device", "calibration")

    @dataclasses.dataclass
    class CountConfig(PipelineConfig):
        applies_to: ClassVar[str] = "counting (CountConfig)"
        budget_fields: ClassVar[tuple[str, ...]] = ("ratio",)
        ratio: float | None = None
        version: int = 1

    calls = []

    @mf.register_pipeline(CountConfig, options=("inplace",))
    def count(model, example_inputs, config, *, inplace=False):
        calls.append((config.ratio, inplace))
        return model

    try:
        model = torch.nn.Linear(2, 2)
        assert mf.fold(model, None, CountConfig(ratio=0.25), inplace=True) is model
        assert mf.fold(model, config=CountConfig(ratio=0.5), ratio=0.75) is model
        assert calls == [(0.25, True), (0.75, False)]
        with pytest.raises(mf.FoldError, match="`device` does not apply to counting"):
            mf.fold(model, None, CountConfig(ratio=0.25), device="cpu")
        with pytest.raises(mf.FoldError, match="`seed` does not apply to counting"):
            mf.fold(model, None, CountConfig(ratio=0.25), seed=1)
    finally:
        del PIPELINES[CountConfig]
        PipelineConfig._classes.remove(CountConfig)
    with pytest.raises(mf.FoldError, match="registered configs"):
        mf.fold(torch.nn.Linear(2, 2), None, object())


def test_config_and_keyword_forms_fold_the_same(example):
    model = make_model("lenet5")
    by_keywords = mf.fold(model, example, ratio=0.5, seed=2)
    by_config = mf.fold(model, example, mf.FoldConfig(ratio=0.5, seed=2))
    assert by_keywords.state_dict().keys() == by_config.state_dict().keys()
    for name, tensor in by_config.state_dict().items():
        assert torch.equal(tensor, by_keywords.state_dict()[name]), name


def test_options_of_the_other_pipeline_are_refused(example):
    model = make_model("lenet5")
    with pytest.raises(mf.FoldError, match=r"`parts` does not apply to the graph-based path"):
        mf.fold(model, example, ratio=0.5, parts=("mlp",))
    with pytest.raises(mf.FoldError, match="'self_generated' applies to Hugging Face"):
        mf.fold(model, example, mf.FoldConfig(ratio=0.5, repair="self_generated"))


def test_custom_clusterer_and_allocation_fold_end_to_end(example):
    model = make_model("lenet5")

    @register_clusterer("test-first-k")
    def first_k(features, k, config):  # channel i joins cluster min(i, k - 1)
        return torch.arange(features.shape[0]).clamp_max(k - 1)

    @register_allocation("test-first-group")
    def first_group(model, discovery, config, ratio):  # only the first group folds, to 1
        group = next(g for g in discovery.groups if g.foldable)
        return {group.name: 1}

    try:
        folded = mf.fold(model, example, mf.FoldConfig(ratio=0.5, clusterer="test-first-k"))
        plan = folded._modelfold_record.plan["groups"]
        assert plan
        for group in plan.values():
            k, n = group["k"], group["n"]
            assert group["labels"] == [min(i, k - 1) for i in range(n)]
        one = mf.fold(model, example, mf.FoldConfig(ratio=0.5, allocation="test-first-group"))
        groups = one._modelfold_record.plan["groups"]
        assert len(groups) == 1 and next(iter(groups.values()))["k"] == 1
        assert one(example).shape == model(example).shape
    finally:
        CLUSTERERS.unregister("test-first-k")
        ALLOCATIONS.unregister("test-first-group")
    with pytest.raises(mf.FoldError, match="registered: "):
        mf.FoldConfig(ratio=0.5, clusterer="test-first-k")


def test_layer_handler_registration_is_where_the_error_says():
    import modelfold.merge
    from modelfold.graph.handlers import find_layer_handler

    assert callable(modelfold.merge.register_layer_handler)
    with pytest.raises(mf.FoldError, match=r"modelfold\.merge\.register_layer_handler"):
        find_layer_handler(object(), "odd")
