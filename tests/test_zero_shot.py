"""Zero-shot evaluation through lm-eval on a folded in-memory model, offline (local task)."""

from __future__ import annotations

import json

import pytest
import torch

import modelfold as mf
from modelfold.eval.zero_shot import zero_shot

pytest.importorskip("lm_eval")
from test_llm import tiny
from test_llm_eval import _tokenizer

WORDS = [f"w{i}" for i in range(40)]


def _task(tmp_path):
    gen = torch.Generator().manual_seed(0)
    docs = []
    for i in range(12):
        pick = torch.randint(0, len(WORDS), (7,), generator=gen).tolist()
        docs.append({"question": " ".join(WORDS[j] for j in pick[:4]),
                     "choices": [WORDS[j] for j in pick[4:]], "answer": i % 3})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "tiny_choice.yaml").write_text(f"""task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
""")
    return docs


def _manual_accuracy(model, tok, docs) -> float:
    """argmax over choices of the summed log-probability of ' choice' after the question."""
    correct = 0
    for doc in docs:
        context = tok(doc["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logp = model(ids).logits.log_softmax(-1)[0, len(context) - 1:-1]
            scores.append(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return correct / len(docs)


def test_zero_shot_accuracy_matches_a_direct_loglikelihood_count(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = _task(tmp_path)
    tok = _tokenizer(" ".join(WORDS))
    folded = mf.fold(tiny(vocab_size=64), ratio=0.3)
    results = zero_shot(folded, tok, ["tiny_choice"], include_path=tmp_path, device="cpu")
    acc = results["tiny_choice"]["acc,none"]
    assert 0 < acc < 1  # neither degenerate case
    assert acc == pytest.approx(_manual_accuracy(folded, tok, docs))
    with pytest.raises(mf.FoldError, match="unknown lm-eval tasks"):
        zero_shot(folded, tok, ["no_such_task"], include_path=tmp_path)


def test_eval_zero_shot_command(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from modelfold.cli import app

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _task(tmp_path)
    model = tiny(vocab_size=64)
    model.save_pretrained(tmp_path / "model")
    _tokenizer(" ".join(WORDS)).save_pretrained(tmp_path / "model")
    result = CliRunner().invoke(app, ["eval-zero-shot", str(tmp_path / "model"), "--tasks",
                                      "tiny_choice", "--include-path", str(tmp_path),
                                      "--limit", "6"])
    assert result.exit_code == 0, result.output
    assert "tiny_choice: acc,none" in result.output
