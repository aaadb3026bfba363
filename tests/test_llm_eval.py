"""Perplexity protocol, LLM pruning baselines (magnitude, Wanda-sp, FLAP, LLM-Pruner) and the LLM
commands."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

import modelfold as mf
from modelfold.baselines import prune_llm
from modelfold.baselines.llm import taylor_scores
from modelfold.cli import app
from modelfold.eval.perplexity import (
    make_windows,
    perplexity,
    perplexity_and_predictions,
    pick_windows,
    top1_agreement,
)
from modelfold.llm import architecture_of

transformers = pytest.importorskip("transformers")
from test_llm import logits, tiny  # noqa: E402


def test_windows_follow_the_anchor_protocol():
    ids = torch.arange(1130 * 512 + 439)
    windows = make_windows(ids, 512)
    assert windows.shape == (1130, 512)  # trailing 439 tokens dropped
    assert torch.equal(pick_windows(windows, "tail:40")[0, :3], torch.tensor([558080, 558081,
                                                                              558082]))
    mid = pick_windows(windows, "mid:40")[:, 0] // 512
    assert mid[:5].tolist() == [128, 153, 177, 202, 227] and mid[-1] == 1089
    assert pick_windows(windows, "all").shape[0] == 1130
    with pytest.raises(mf.FoldError, match="head:N"):
        pick_windows(windows, "middle:3")
    with pytest.raises(mf.FoldError, match="fewer than one window"):
        make_windows(torch.arange(10), 512)


def test_perplexity_equals_the_mean_loss_of_hugging_face():
    model = tiny()
    windows = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = torch.exp(torch.stack([model(w[None], labels=w[None]).loss
                                          for w in windows]).mean())
    assert perplexity(model, windows, batch_size=2) == pytest.approx(float(expected), rel=1e-5)


def test_top1_agreement_of_a_model_with_itself_and_with_another():
    model, other = tiny(seed=0), tiny(seed=1)
    windows = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(4))
    ppl, predictions = perplexity_and_predictions(model, windows, batch_size=2)
    assert ppl == pytest.approx(perplexity(model, windows))
    assert predictions.shape == (3, 11)
    assert torch.equal(predictions, logits(model, windows)[:, :-1].argmax(-1))
    assert top1_agreement(predictions, predictions) == 1.0
    _, theirs = perplexity_and_predictions(other, windows)
    share = float((theirs == predictions).float().mean())
    assert top1_agreement(theirs, predictions) == pytest.approx(share) and share < 1.0
    with pytest.raises(mf.FoldError, match="different windows"):
        top1_agreement(theirs[:2], predictions)


def _zero_mlp_channels(model, n_zero: int) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[-n_zero:] = 0
            layer.mlp.up_proj.weight[-n_zero:] = 0
            layer.mlp.down_proj.weight[:, -n_zero:] = 0


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "llm-pruner", "llm-pruner-e2"])
def test_pruning_removes_dead_channels_exactly(method):
    model = tiny()
    _zero_mlp_channels(model, 24)
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    pruned = prune_llm(model, method=method, ratio=0.25, calibration=calibration)
    assert pruned.config.intermediate_size == 72
    torch.testing.assert_close(logits(pruned), logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "llm-pruner", "llm-pruner-e2"])
def test_pruning_drops_dead_query_heads_per_kv_group(method):
    model = tiny(heads=8, kv=2)
    with torch.no_grad():  # the second half of every group's query heads writes nothing
        for layer in model.model.layers:
            attn = layer.self_attn
            for g in range(2):
                cols = slice((4 * g + 2) * 16, (4 * g + 4) * 16)
                attn.o_proj.weight[:, cols] = 0
                attn.q_proj.weight[cols] = 0
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    pruned = prune_llm(model, method=method, ratio=0.5, parts=["attention"],
                       calibration=calibration)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (4, 2)
    torch.testing.assert_close(logits(pruned), logits(model), atol=1e-5, rtol=1e-5)


def test_pruning_shares_budgets_with_folding_and_checks_inputs():
    model = tiny()
    folded = mf.fold(model, target_sparsity=0.15)
    pruned = prune_llm(model, target_sparsity=0.15)
    assert [p.shape for p in folded.parameters()] == [p.shape for p in pruned.parameters()]
    with pytest.raises(mf.FoldError, match="calibration"):
        prune_llm(model, method="wanda-sp", ratio=0.2)
    for method in ("llm-pruner", "llm-pruner-e2"):
        with pytest.raises(mf.FoldError, match=f"{method} needs `calibration`"):
            prune_llm(model, method=method, ratio=0.2)
    with pytest.raises(mf.FoldError, match="integer token windows"):
        prune_llm(model, method="llm-pruner", ratio=0.2, calibration=torch.zeros(2, 8))
    with pytest.raises(mf.FoldError, match="unknown LLM pruning method"):
        prune_llm(model, method="sparsegpt", ratio=0.2)


def _taylor_by_hand(model, windows, second_order: bool):
    """LLM-Pruner's group importance of layer 0, from Hugging Face's loss and `.backward()`."""
    work = copy.deepcopy(model)
    attn, mlp = work.model.layers[0].self_attn, work.model.layers[0].mlp
    linears = [mlp.gate_proj, mlp.up_proj, mlp.down_proj, attn.q_proj, attn.k_proj,
               attn.v_proj, attn.o_proj]
    work(windows, labels=windows).loss.backward()
    fisher = [torch.zeros_like(m.weight) for m in linears]
    if second_order:
        grads = [m.weight.grad.clone() for m in linears]
        for window in windows:
            work.zero_grad()
            work(window[None], labels=window[None]).loss.backward()
            for f, m in zip(fisher, linears):
                f += m.weight.grad ** 2 / len(windows)
        for g, m in zip(grads, linears):
            m.weight.grad = g
    imp = [(m.weight * m.weight.grad - 0.5 * m.weight ** 2 * f).abs().detach()
           for m, f in zip(linears, fisher)]
    gate, up, down, q, k, v, o = imp
    channel = gate.sum(1) + up.sum(1) + down.sum(0)
    n_q, n_kv = q.shape[0] // 16, k.shape[0] // 16
    head = q.reshape(n_q, -1).sum(1) + o.sum(0).reshape(n_q, 16).sum(1)
    if n_q == n_kv:
        head = head + k.reshape(n_kv, -1).sum(1) + v.reshape(n_kv, -1).sum(1)
    return channel, head


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("kv", [2, 4])
def test_llm_pruner_scores_equal_a_hand_computation(second_order, kv):
    model = tiny(num_hidden_layers=1, kv=kv, initializer_range=0.5)  # a visible Fisher term
    calibration = torch.randint(0, 128, (12, 70), generator=torch.Generator().manual_seed(2))
    scores = taylor_scores(model, architecture_of(model), calibration,
                           second_order=second_order, batch_size=3)
    channel, head = _taylor_by_hand(model, calibration[:10, :64], second_order)  # the defaults
    torch.testing.assert_close(scores[(0, "mlp")], channel, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(scores[(0, "attention")], head, rtol=1e-4, atol=1e-9)
    if second_order:  # Element^2 is told apart from Element^1 at this tolerance
        first = _taylor_by_hand(model, calibration[:10, :64], False)
        assert not torch.allclose(first[0], channel, rtol=1e-3)
        assert not torch.allclose(first[1], head, rtol=1e-3)


@pytest.mark.parametrize("method", ["llm-pruner", "llm-pruner-e2"])
def test_llm_pruner_matches_folding_budgets_and_leaves_the_model_alone(method):
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    for arch, parts, budget in (("llama", ("mlp",), {"target_sparsity": 0.15}),
                                ("qwen2", ("attention",), {"ratio": 0.5}),
                                ("llama", ("mlp", "attention"), {"target_sparsity": 0.25})):
        model = tiny(arch).train()
        model.model.layers[1].requires_grad_(False)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        flags = [p.requires_grad for p in model.parameters()]
        pruned = prune_llm(model, method=method, parts=parts, calibration=calibration, **budget)
        folded = mf.fold(model, config=mf.LLMFoldConfig(parts=parts, **budget))
        assert [p.shape for p in folded.parameters()] == [p.shape for p in pruned.parameters()]
        assert pruned.num_parameters() == folded.num_parameters() < model.num_parameters()
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(p.grad is None for p in model.parameters())
        assert [p.requires_grad for p in model.parameters()] == flags and model.training
        assert pruned.config.num_attention_heads % pruned.config.num_key_value_heads == 0
    half = tiny(dtype=torch.bfloat16)  # scored in a float32 copy
    before = {k: v.clone() for k, v in half.state_dict().items()}
    pruned = prune_llm(half, method=method, ratio=0.25, calibration=calibration)
    assert pruned.config.intermediate_size == 72 and pruned.dtype == torch.bfloat16
    assert all(torch.equal(before[k], v) for k, v in half.state_dict().items())
    assert all(p.grad is None for p in half.parameters())


def _tokenizer(text: str):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(text.split()))[:125]
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                eos_token="</s>")


def test_fold_llm_and_eval_ppl_commands(tmp_path):
    text = " ".join(f"word{i % 50} token{i % 7}" for i in range(400))
    (tmp_path / "text.txt").write_text(text)
    model = tiny()
    model.save_pretrained(tmp_path / "dense")
    _tokenizer(text).save_pretrained(tmp_path / "dense")
    runner = CliRunner()
    result = runner.invoke(app, ["fold-llm", str(tmp_path / "dense"), "--out",
                                 str(tmp_path / "folded"), "--ratio", "0.25",
                                 "--parts", "mlp,attention"])
    assert result.exit_code == 0, result.output
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "folded")
    assert plain.config.intermediate_size == 72
    assert (tmp_path / "folded" / "tokenizer.json").is_file()
    result = runner.invoke(app, ["eval-ppl", str(tmp_path / "folded"), "--text",
                                 str(tmp_path / "text.txt"), "--seq-len", "16",
                                 "--windows", "all,tail:3"])
    assert result.exit_code == 0, result.output
    assert "all: perplexity" in result.output and "tail:3: perplexity" in result.output
    result = runner.invoke(app, ["fold-llm", str(tmp_path / "dense"), "--out",
                                 str(tmp_path / "x"), "--ratio", "0.2", "--parts", "embeddings"])
    assert result.exit_code == 2 and "parts" in result.output
    result = runner.invoke(app, ["fold-llm", str(tmp_path / "dense"), "--out",
                                 str(tmp_path / "x"), "--parts", "mlp"])
    assert result.exit_code == 2 and "--ratio" in result.output  # no budget: no silent no-op
    result = runner.invoke(app, ["fold-llm", str(tmp_path / "dense"), "--out",
                                 str(tmp_path / "r"), "--ratio", "0.3", "--round-to", "16",
                                 "--clusterer", "hartigan", "--repair", "self_generated"])
    assert result.exit_code == 0, result.output
    rounded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    assert rounded.config.intermediate_size == 64  # 96 * 0.7 = 67.2 -> 67 -> 64
    result = runner.invoke(app, ["fold-llm", str(tmp_path / "dense"), "--out",
                                 str(tmp_path / "s"), "--ratio", "0.3", "--self-calibrated"])
    assert result.exit_code == 0, result.output
    settings = mf.load(tmp_path / "s")._modelfold_llm_record["settings"]
    assert (settings["clusterer"], settings["allocation"], settings["repair"]) == (
        "activation", "sensitivity", "self_generated")


def test_flap_keeps_the_mean_output_adapts_widths_and_reloads(tmp_path):
    model = tiny(num_hidden_layers=4, heads=4, kv=4)
    calibration = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    pruned = prune_llm(model, method="flap", target_sparsity=0.2, parts=("mlp", "attention"),
                       calibration=calibration)
    total = sum(p.numel() for p in model.parameters())
    achieved = 1 - sum(p.numel() for p in pruned.parameters()) / total
    assert 0.18 <= achieved <= 0.22  # the added-back biases are outside the budget
    widths = {layer.mlp.down_proj.in_features for layer in pruned.model.layers}
    heads = [layer.self_attn.o_proj.in_features // 16 for layer in pruned.model.layers]
    assert len(widths | set(heads)) > 1 and min(heads) >= 1  # adaptive, never empty
    # Baseline compensation: on the calibration inputs of layer 0's MLP (identical in both
    # models, attention of layer 0 aside) the mean output is preserved exactly.
    captured = []
    hook = model.model.layers[0].mlp.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(calibration)
        hook.remove()
        x = torch.cat(captured)
        dense_mean = model.model.layers[0].mlp(x).mean(0)
        pruned_mean = pruned.model.layers[0].mlp(x).mean(0)
    torch.testing.assert_close(pruned_mean, dense_mean, atol=1e-5, rtol=1e-4)
    assert pruned.config.mlp_bias and pruned.config.attention_bias
    loaded = mf.load(mf.save(pruned, tmp_path / "flap"))
    torch.testing.assert_close(logits(loaded), logits(pruned), atol=0, rtol=0)
    with pytest.raises(mf.FoldError, match="give `target_sparsity` only"):
        prune_llm(model, method="flap", ratio=0.2, calibration=calibration)


def test_flap_with_grouped_query_attention_removes_heads_evenly_per_kv_group(tmp_path):
    model = tiny(num_hidden_layers=4, heads=8, kv=2)  # 2 KV groups of 4 query heads
    calibration = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    pruned = prune_llm(model, method="flap", target_sparsity=0.15, parts=("attention",),
                       calibration=calibration)
    heads = [layer.self_attn.q_proj.out_features // 16 for layer in pruned.model.layers]
    assert all(h % 2 == 0 and 2 <= h <= 8 for h in heads) and min(heads) < 8
    assert len(set(heads)) > 1  # adaptive per layer
    assert all(layer.self_attn.k_proj.out_features == 32 for layer in pruned.model.layers)
    # the removed heads' mean contribution comes back as the o_proj bias: on that layer's o_proj
    # inputs in the dense model, fed to both projections, the mean output is preserved exactly
    layer = next(i for i, h in enumerate(heads) if h < 8)
    captured = []
    dense_attn = model.model.layers[layer].self_attn
    hook = dense_attn.o_proj.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(calibration)
    hook.remove()
    q_dense = dense_attn.q_proj.weight.view(8, 16, -1)
    q_pruned = pruned.model.layers[layer].self_attn.q_proj.weight.view(heads[layer], 16, -1)
    kept = [next(j for j in range(8) if torch.equal(q_dense[j], q)) for q in q_pruned]
    per_group = heads[layer] // 2
    assert sorted(j // 4 for j in kept) == [0] * per_group + [1] * per_group
    columns = torch.tensor([j * 16 + d for j in kept for d in range(16)])
    with torch.no_grad():
        x = captured[0]
        dense_mean = dense_attn.o_proj(x).mean(0)
        pruned_mean = pruned.model.layers[layer].self_attn.o_proj(x[:, columns]).mean(0)
    torch.testing.assert_close(pruned_mean, dense_mean, atol=1e-5, rtol=1e-4)
    loaded = mf.load(mf.save(pruned, tmp_path / "flap"))
    torch.testing.assert_close(logits(loaded), logits(pruned), atol=0, rtol=0)


def test_flap_no_bias_ranks_like_flap_on_a_config_without_an_mlp_bias(tmp_path):
    model = tiny("gemma3", num_hidden_layers=4, heads=4, kv=1)
    calibration = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(mf.FoldError, match="flap-no-bias"):
        prune_llm(model, method="flap", target_sparsity=0.15, calibration=calibration)
    pruned = prune_llm(model, method="flap-no-bias", target_sparsity=0.15,
                       parts=("mlp", "attention"), calibration=calibration)
    achieved = 1 - sum(p.numel() for p in pruned.parameters()) / sum(
        p.numel() for p in model.parameters())
    assert 0.14 <= achieved <= 0.16
    assert all(m.bias is None for layer in pruned.model.layers
               for m in (layer.mlp.down_proj, layer.self_attn.o_proj))
    widths = {layer.mlp.down_proj.in_features for layer in pruned.model.layers}
    assert len(widths) > 1  # adaptive, as FLAP
    llama = tiny(num_hidden_layers=4, heads=4, kv=4)
    flap = prune_llm(llama, method="flap", target_sparsity=0.2, calibration=calibration)
    plain = prune_llm(llama, method="flap-no-bias", target_sparsity=0.2, calibration=calibration)
    assert [layer.mlp.down_proj.in_features for layer in flap.model.layers] == [
        layer.mlp.down_proj.in_features for layer in plain.model.layers]  # same ranking
    loaded = mf.load(mf.save(pruned, tmp_path / "flap-no-bias"))
    torch.testing.assert_close(logits(loaded), logits(pruned), atol=0, rtol=0)
