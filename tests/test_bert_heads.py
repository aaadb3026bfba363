"""Attention heads of BERT-style self-attention (transformers' BertModel) fold through the
generic engine: query/key/value rows and the output projection's columns (BertSelfOutput.dense,
found as the Linear reading the attention output in the traced graph)."""

from __future__ import annotations

import pytest
import torch

import modelfold as mf
from modelfold.budget import kept_channels
from modelfold.graph import discover_groups
from modelfold.merge.apply import predicted_parameter_count
from modelfold.record import get_record

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, LAYERS, FFN, VOCAB = 16, 4, 2, 32, 60


@mf.register_factory
def tiny_bert(heads: int = HEADS, attn: str = "eager") -> torch.nn.Module:
    """A tiny random BertModel (no pooler, no dropout)."""
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=heads,
        intermediate_size=FFN, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation=attn)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


@torch.no_grad()
def planted(heads: int, attn: str) -> torch.nn.Module:
    """Heads h and h + heads/2 of every layer are copies (q/k/v rows and output-projection
    columns), and so are FFN channels c and c + FFN/2: folding to half merges only copies, and
    the merged model (rows averaged, columns summed) computes the same function."""
    torch.manual_seed(0)
    model = tiny_bert(heads, attn)
    d, half = HIDDEN // heads, heads // 2
    for layer in model.encoder.layer:
        att = layer.attention
        for h in range(half):
            src, dst = slice(h * d, (h + 1) * d), slice((h + half) * d, (h + half + 1) * d)
            for proj in (att.self.query, att.self.key, att.self.value):
                proj.weight[dst] = proj.weight[src]
                proj.bias[dst] = proj.bias[src]
            att.output.dense.weight[:, dst] = att.output.dense.weight[:, src]
        up, down = layer.intermediate.dense, layer.output.dense
        up.weight[FFN // 2:] = up.weight[:FFN // 2]
        up.bias[FFN // 2:] = up.bias[:FFN // 2]
        down.weight[:, FFN // 2:] = down.weight[:, :FFN // 2]
    return model


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding: the attention mask takes part in the traced graph
    return ids, mask


def run(model: torch.nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return model(*x).last_hidden_state


def fold(model: torch.nn.Module, x, ratio: float) -> torch.nn.Module:
    return mf.fold(model, x, config=mf.FoldConfig(ratio=ratio, clusterer="ward"))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("heads", [4, 8])
def test_duplicate_heads_fold_losslessly(heads, attn) -> None:
    model, x = planted(heads, attn), inputs()
    folded = fold(model, x, 0.5)
    groups = {g.name: g for g in get_record(folded).groups}
    for i in range(LAYERS):
        g = groups[f"encoder.layer.{i}.attention.self.heads"]
        assert (g.kind, g.status, g.n, g.k) == ("heads", "folded", heads, heads // 2)
        assert f"encoder.layer.{i}.attention.output.dense" in g.modules
        att = folded.encoder.layer[i].attention
        assert att.self.num_attention_heads == heads // 2
        assert att.self.all_head_size == HIDDEN // 2 == att.self.query.out_features
        assert att.output.dense.in_features == HIDDEN // 2
    torch.testing.assert_close(run(folded, x), run(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_ratio_zero_is_identity(attn) -> None:
    model, x = tiny_bert(HEADS, attn), inputs()
    folded = fold(model, x, 0.0)
    assert torch.equal(run(folded, x), run(model, x))
    assert {g.status for g in get_record(folded).groups if g.kind == "heads"} == {"kept"}
    assert all(layer.attention.self.num_attention_heads == HEADS
               for layer in folded.encoder.layer)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_head_and_parameter_counts_match_the_prediction(ratio) -> None:
    torch.manual_seed(2)
    model, x = tiny_bert(8), inputs()
    discovery = discover_groups(model, x)
    heads = [g for g in discovery.groups if g.kind == "heads"]
    assert len(heads) == LAYERS and all(g.foldable for g in heads)
    folded = fold(model, x, ratio)
    record = get_record(folded)
    kept = {g.name: g.k for g in record.groups if g.status == "folded"}
    assert {g.name for g in heads} <= set(kept)
    assert predicted_parameter_count(model, discovery, kept) == record.params_after
    assert sum(p.numel() for p in folded.parameters()) == record.params_after
    d = HIDDEN // 8
    for i, layer in enumerate(folded.encoder.layer):
        k = kept[f"encoder.layer.{i}.attention.self.heads"]
        assert k == kept_channels(8, ratio)
        att = layer.attention
        assert att.self.num_attention_heads == k and att.self.all_head_size == k * d
        # every head's q/k/v rows (weight + bias) and output-projection columns
        per_head = 3 * (HIDDEN * d + d) + HIDDEN * d
        assert (sum(p.numel() for p in att.parameters())
                == k * per_head + HIDDEN + 2 * HIDDEN)  # + dense bias + LayerNorm


def test_ignored_output_projection_keeps_the_heads() -> None:
    model, x = tiny_bert(), inputs()
    dense = model.encoder.layer[0].attention.output.dense
    folded = mf.fold(model, x, ratio=0.5, ignored=[dense])
    status = {g.name: g.status for g in get_record(folded).groups if g.kind == "heads"}
    assert status == {"encoder.layer.0.attention.self.heads": "ignored",
                      "encoder.layer.1.attention.self.heads": "folded"}
    assert folded.encoder.layer[0].attention.self.num_attention_heads == HEADS


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_folded_heads_save_and_load(attn, tmp_path) -> None:
    torch.manual_seed(3)
    model, x = tiny_bert(HEADS, attn), inputs()
    folded = fold(model, x, 0.5)
    mf.save(folded, tmp_path / "bert", factory=tiny_bert,
            factory_kwargs={"heads": HEADS, "attn": attn})
    loaded = mf.load(tmp_path / "bert")
    assert type(loaded) is type(folded)
    for a, b in zip(loaded.encoder.layer, folded.encoder.layer, strict=True):
        assert a.attention.self.num_attention_heads == b.attention.self.num_attention_heads
        assert a.attention.self.all_head_size == b.attention.self.all_head_size
    sd_a, sd_b = folded.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert torch.equal(run(loaded, x), run(folded, x))


SENTENCES = ["A man is playing a guitar.", "How do I bake bread?", "The new movie is awesome.",
             "The stock market fell sharply today.", "A kitten is sitting on a rug."]


def test_pretrained_minilm_folds_its_heads() -> None:
    from modelfold.errors import FoldError
    from modelfold.zoo import create_model
    from modelfold.zoo.carriers import CARRIERS

    try:
        CARRIERS["paraphrase_minilm_l3"].path()
    except FoldError as exc:
        pytest.skip(str(exc))
    pytest.importorskip("onnx")
    from modelfold.zoo.minilm import wordpiece_tokenizer

    model = create_model("paraphrase_minilm_l3", pretrained=True).eval()
    batch = wordpiece_tokenizer()(SENTENCES, padding=True, return_tensors="pt")
    x = (batch["input_ids"], batch["attention_mask"])
    folded = mf.fold(model, (x[0][:2], x[1][:2]),
                     config=mf.FoldConfig(ratio=0.25, clusterer="ward"))
    report = mf.summary(model, folded, (x[0][:2], x[1][:2]))
    heads = [g for g in report.groups if g.kind == "heads"]
    assert [(g.status, g.n, g.k) for g in heads] == [("folded", 12, 9)] * 3
    assert not any(g.status == "unsafe" and "heads" not in (g.reason or "")
                   for g in report.groups)
    for layer in folded.bert.encoder.layer:
        assert layer.attention.self.num_attention_heads == 9
        assert layer.attention.output.dense.in_features == 9 * 32
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model(*x), folded(*x))
    assert (cos > 0.5).all(), cos
