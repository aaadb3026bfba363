"""The LLM fold record: a dataclass stored as the JSON object manifests have always held."""

from __future__ import annotations

import json

import pytest
from torch import nn

from modelfold.record import LLMFoldRecord, attach_llm_record, get_llm_record

SHAPE = {"intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2}
STORED = {  # a record as the manifests of earlier versions hold it
    "method": "fold", "architecture": "llama", "parts": ["mlp"], "ratios": {"mlp": {"0": 0.5}},
    "settings": {"seed": 0, "streamed": True}, "params_before": 1000, "params_after": 900,
    "ratio": 0.0, "layers_before": [SHAPE], "layers": [{**SHAPE, "intermediate_size": 48}],
}


def test_a_stored_record_round_trips_unchanged():
    record = LLMFoldRecord.from_dict(json.loads(json.dumps(STORED)))
    assert record.params_after == 900 and record.settings["streamed"] is True
    assert record.to_dict() == STORED
    assert LLMFoldRecord.from_dict({**STORED, "later": [1]}).to_dict() == {**STORED, "later": [1]}


def test_fields_read_by_key_as_from_the_former_dict():
    record = LLMFoldRecord.from_dict(STORED)
    assert record["params_after"] == 900 and record["settings"]["seed"] == 0
    with pytest.raises(KeyError):
        record["nothing"]


def test_attached_to_a_model():
    model = nn.Linear(2, 2)
    assert get_llm_record(model) is None
    record = LLMFoldRecord.from_dict(STORED)
    attach_llm_record(model, record)
    assert get_llm_record(model) is record
