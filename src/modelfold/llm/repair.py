"""Data-free folding of LLM MLPs calibrated on text the model generates itself.

No external data: `self_generated_tokens` samples short texts from the model, starting at its BOS
token, with a repetition penalty (small models otherwise loop on a phrase: the text then covers a
few hundred distinct tokens instead of about a thousand); the BOS is then dropped so that, as
in ordinary use, the first token of every sequence is a plain text token (the attention sink).
`CalibratedSelector` walks the decoder layer by layer on those tokens, each layer seeing the
output of the layers already folded, and per SwiGLU MLP:

* `clusterer="activation"`: the channels' outputs z_j d_j^T are compared on the calibration
  tokens, each token weighted by 1 / ||h_t||^2 (h_t = the residual stream after the layer; with
  a post-MLP norm, as in Gemma, times that norm's per-token gain, see `layer_activations`), so
  that the few massive-activation tokens do not decide alone. The k channels with the largest
  weighted contribution sqrt(E_j) ||d_j|| are the cluster centres, E_j being the channel's mean
  squared output on the text, averaged half and half (SYNTHETIC_SHARE) with its expectation
  under Gaussian inputs of the same second moments (`gaussian_energy`: a short text on a few
  topics leaves channels idle that other text uses; the Gaussian stands in for that text); every
  other channel joins the centre its activation is most correlated with, and folds into it: the
  centre keeps its gate/up rows and its down column absorbs alpha_j d_j with alpha_j = G_jc /
  G_cc (least-squares scale of z_j on z_c). Merging mean gate/up rows, as weight clustering
  does, would create a new channel whose SwiGLU output none of the members had.
* `repair="self_generated"` (any clusterer): the folded down projection D_f is refitted by
  weighted ridge least squares towards the original layer's output, shrunk towards the merge:
      D' = argmin ||W^1/2 (Z D_o^T - B D'^T)||^2 + lam * mean(diag(B_w^T B_w)) * ||D' - D_f||^2
  (B = the folded layer's SwiGLU activations, lam = RIDGE = 4). Shrinking towards D_f rather
  than 0 keeps the fit from over-trusting the model's own text.
* `allocation="sensitivity"`: before folding, one pass at the uniform ratio measures every
  layer's relative output error mean_t ||e_t||^2 / ||h_t||^2; layers above twice the median keep
  all their channels and the others share the same total of removed channels (on SmolLM2 this
  protects exactly layer 0, whose MLP the data-free weight criteria destroy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from modelfold.calibrate.activation import centre_merge, merge_maps, ridge_refit
from modelfold.errors import FoldError
from modelfold.llm.architectures import DecoderArchitecture

SEQUENCES, LENGTH = 32, 64  # 2048 self-generated calibration tokens (64 sampling steps)
TEMPERATURE, TOP_P, REPETITION_PENALTY = 0.7, 0.95, 1.2
SYNTHETIC_SHARE = 0.5  # clusterer='activation': weight of the Gaussian-input channel energies
RIDGE = 4.0  # shrinkage towards the merged down projection (relative to mean(diag(gram)))
PROTECT_FACTOR = 2.0  # allocation="sensitivity": protect layers above this x median error


class _Captured(Exception):
    """Raised by a hook to stop a layer once the wanted input is captured."""


@torch.no_grad()
def self_generated_tokens(model: nn.Module, *, sequences: int | None = None,
                          length: int | None = None, seed: int = 0) -> torch.Tensor:
    """(sequences, length) token ids sampled by `model` from its BOS token (or, without one,
    its end-of-text token: the document separator) at temperature 0.7, top-p 0.95 and
    repetition penalty 1.2; the start token itself is removed. `length` is capped by the
    model's context."""
    eos = getattr(model.config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    start = getattr(model.config, "bos_token_id", None)
    start = eos if start is None else start
    if start is None:
        raise FoldError("self-generated calibration starts generation from the BOS (or EOS) "
                        "token, but model.config sets neither bos_token_id nor eos_token_id.")
    sequences, length = sequences or SEQUENCES, length or LENGTH
    device = next(model.parameters()).device
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None:
        length = min(length, int(context) - 1)
    prompt = torch.full((sequences, 1), int(start), dtype=torch.long, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=length, min_new_tokens=length, do_sample=True,
                             top_p=TOP_P, temperature=TEMPERATURE,
                             repetition_penalty=REPETITION_PENALTY,
                             pad_token_id=int(eos if eos is not None else start))
    return out[:, 1:]


def always_resident(_index: int) -> AbstractContextManager:
    """The `resident` of a loaded model: every layer holds its weights already."""
    return contextlib.nullcontext()


class _Catcher(nn.Module):
    """Stands in for decoder layer `index` during the catching pass: records the keyword
    arguments the model passes to that layer (and, for layer 0, the hidden states) and returns
    its input unchanged, so the layer itself never runs."""

    def __init__(self, index: int, got: dict, last: bool):
        super().__init__()
        self.index, self.got, self.last = index, got, last

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.got["h"] = hidden
        self.got["kwargs"][self.index] = kwargs
        if self.last:
            raise _Captured
        return hidden


class LayerStepper:
    """Runs a decoder one layer at a time on fixed tokens (the GPTQ-style 'catcher'): the
    hidden states entering layer 0 and the keyword arguments of *every* layer (rotary
    embeddings, mask: they differ between layers where sliding-window and full-attention layers
    alternate, e.g. Gemma 3) are captured once, in one pass in which every decoder layer is
    replaced by a pass-through (no layer runs, no cache is kept); `mlp_input` returns a layer's
    MLP input and the residual stream before its MLP."""

    def __init__(self, model: nn.Module, arch: DecoderArchitecture, tokens: torch.Tensor):
        self.arch, self.layers = arch, list(arch.layers(model))
        got: dict = {"kwargs": {}}
        modules = arch.layers(model)
        for i in range(len(modules)):
            modules[i] = _Catcher(i, got, last=i == len(modules) - 1)
        try:
            model(tokens.to(_device(model)), use_cache=False)
        except _Captured:
            pass
        finally:
            for i, layer in enumerate(self.layers):
                modules[i] = layer
        if len(got["kwargs"]) != len(self.layers):
            raise FoldError(f"{type(model).__name__}: the decoder layers were not all called.")
        self.hidden, self.layer_kwargs, self.index = got["h"], got["kwargs"], 0
        self._mlp_only: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _run(self, layer: nn.Module) -> torch.Tensor:
        out = layer(self.hidden, **self.layer_kwargs[self.index])
        return out[0] if isinstance(out, tuple) else out

    def attention_changed(self, index: int) -> None:
        """Layer `index`'s attention was rebuilt after its MLP input was captured."""
        if self._mlp_only is not None and self._mlp_only[0] == index:
            self._mlp_only = None

    def _advance(self) -> None:
        layer = self.layers[self.index]
        if self._mlp_only is not None and self._mlp_only[0] == self.index:
            # only the MLP changed since the capture: the layer output is
            # residual + post_norm(MLP(x)) (no post-MLP norm: residual + MLP(x))
            _, x, residual = self._mlp_only
            out = residual + mlp_output(layer, self.arch, x)
            self.hidden = out.reshape(self.hidden.shape)
        else:
            self.hidden = self._run(layer)
        self._mlp_only = None
        self.index += 1

    def advance_past(self, index: int) -> None:
        """Run the layers up to and including `index` now (as they are now): afterwards they
        are no longer needed, e.g. their weights may be dropped."""
        while self.index <= index:
            self._advance()

    def _enter(self, index: int, layer: nn.Module | None) -> nn.Module:
        """Run the layers before `index` (as they are now) and make `layer`, when given, the
        decoder's layer `index` from now on (the folded copy, rebuilt in place afterwards)."""
        if index < self.index:
            raise FoldError(f"layer {index} was asked for after layer {self.index}: calibrated "
                            "folding visits the layers in order.")
        while self.index < index:
            self._advance()
        if layer is not None:
            self.layers[index] = layer
        return self.layers[index]

    def _capture(self, index: int, layer: nn.Module, hooks: list) -> None:
        """Run layer `index` with `hooks` ((module, kind, fn) forward / pre hooks) until the
        MLP is reached: the MLP's pre-hook stops the layer."""

        def stop(_module, _args):
            raise _Captured

        handles = []
        for module, kind, fn in hooks:
            register = (module.register_forward_pre_hook if kind == "pre"
                        else module.register_forward_hook)
            handles.append(register(fn))
        # registered last: the MLP's own capture hook (if any) runs first
        handles.append(layer.get_submodule(self.arch.mlp).register_forward_pre_hook(stop))
        try:
            self._run(layer)
        except _Captured:
            pass
        finally:
            for h in handles:
                h.remove()

    def _pre_mlp_norm(self, index: int, layer: nn.Module) -> nn.Module:
        try:
            return self.arch.mlp_norms(layer)[0]
        except AttributeError as exc:
            raise FoldError(f"layer {index}: no `{self.arch.pre_mlp_norm}` before the MLP; "
                            "calibrated LLM folding needs the pre-norm residual layout (set "
                            "the architecture's pre_mlp_norm).") from exc

    def mlp_input(self, index: int, layer: nn.Module | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual): layer `index`'s MLP input and the stream its (post-normed) output is
        added to, both (tokens, hidden). `layer` replaces the decoder's layer `index` from now
        on (the folded copy, rebuilt in place after this call); the layers before `index` run
        as they are now, i.e. already folded."""
        layer = self._enter(index, layer)
        got: dict = {}

        def mlp_in(_module, args):
            got["x"] = args[0]

        def residual(_module, args):  # the residual stream enters the MLP's own norm
            got["residual"] = args[0]

        self._capture(index, layer, [(layer.get_submodule(self.arch.mlp), "pre", mlp_in),
                                     (self._pre_mlp_norm(index, layer), "pre", residual)])
        x = got["x"].reshape(-1, got["x"].shape[-1])
        if "residual" not in got:
            raise FoldError(f"layer {index}: `{self.arch.pre_mlp_norm}` was not called before "
                            "the MLP; calibrated LLM folding needs the pre-norm residual layout.")
        residual = got["residual"].reshape(x.shape[0], -1)
        self._mlp_only = (index, x, residual)
        return x, residual

    def attention_input(self, index: int, layer: nn.Module | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(heads, out, stream) of layer `index`'s attention, all (tokens, .): the input of its
        output projection (the query heads' outputs side by side), that projection's output and
        the residual stream after the attention is added. `layer` as in `mlp_input`."""
        layer = self._enter(index, layer)
        got: dict = {}

        def o_proj(_module, args, output):
            got["heads"], got["out"] = args[0], output

        def stream(_module, args):
            got["stream"] = args[0]

        attn = self.arch.attention_module(layer)
        self._capture(index, layer, [(getattr(attn, self.arch.o), "forward", o_proj),
                                     (self._pre_mlp_norm(index, layer), "pre", stream)])
        if "heads" not in got or "stream" not in got:
            raise FoldError(f"layer {index}: the attention's `{self.arch.o}` and then "
                            f"`{self.arch.pre_mlp_norm}` were not called before the MLP; "
                            "calibrated head folding needs the pre-norm residual layout.")
        heads = got["heads"].reshape(-1, got["heads"].shape[-1])
        n = heads.shape[0]
        return heads, got["out"].reshape(n, -1), got["stream"].reshape(n, -1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def post_mlp(layer: nn.Module, arch: DecoderArchitecture, out: torch.Tensor) -> torch.Tensor:
    """What the residual stream receives from MLP output `out`: `out` itself, or `out` through
    the architecture's post-MLP norm (Gemma)."""
    post = arch.mlp_norms(layer)[1]
    return out if post is None else post(out)


def mlp_output(layer: nn.Module, arch: DecoderArchitecture, x: torch.Tensor) -> torch.Tensor:
    """The MLP's contribution to the residual stream for MLP input `x`."""
    return post_mlp(layer, arch, layer.get_submodule(arch.mlp)(x))


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
    """Gated MLP activations act(x G^T) * (x U^T): SwiGLU with SiLU, GeGLU with GELU."""
    return act(x @ gate.T) * (x @ up.T)


class CalibratedSelector:
    """The selector of `transform_llm` for self-calibrated folding (see the module docstring).
    Layers are visited in order; MLP channels are clustered by `base` (a weight-clustering
    selector) or, when it is None, by their activations; `repair` refits the down projections."""

    def __init__(self, model: nn.Module, arch: DecoderArchitecture, tokens: torch.Tensor, *,
                 base=None, repair: bool = False, ridge: float = RIDGE,
                 synthetic_share: float = SYNTHETIC_SHARE):
        self.stepper = LayerStepper(model, arch, tokens)
        self.base, self.repair, self.ridge = base, repair, ridge
        self.synthetic_share = synthetic_share

    def __call__(self, part: str, index: int, layer: nn.Module, arch: DecoderArchitecture,
                 k: int):
        if part != "mlp":
            self.stepper.attention_changed(index)
            if self.base is not None:  # weight-clustered heads: no refit (see the docstring)
                return self.base(part, index, layer, arch, k)
            heads, weights = attention_activations(self.stepper, index, layer, arch)
            attn = arch.attention_module(layer)
            hw = heads * weights[:, None]
            o = getattr(attn, arch.o).weight.float()
            return head_fold((hw.T @ hw).double(), o, head_groups(arch, attn), k,
                             attn.head_dim, self.ridge)
        x, z, target, weights = layer_activations(self.stepper, index, layer, arch)
        gate, up, down = (m.weight.float() for m in arch.mlp_linears(layer))
        zw = z * weights[:, None]
        if self.base is None:
            gram = (zw.T @ zw).double()
            energy = gram.diagonal() / weights.pow(2).sum()
            energy = ((1 - self.synthetic_share) * energy + self.synthetic_share
                      * gaussian_energy(x, weights, gate, up, _activation_fn(layer, arch),
                                        seed=index).double())
            mean_map, sum_map, folded_down, centres = activation_fold(gram, down, k,
                                                                      centre_energy=energy)
            if self.repair:  # the folded channels are the centres: reuse their Gram rows
                folded_down = ridge_refit(gram[centres][:, centres],
                                          gram[centres] @ down.double().T, folded_down,
                                          self.ridge)
            return mean_map, sum_map, folded_down
        mean_map, sum_map = self.base(part, index, layer, arch, k)
        folded_down = down @ sum_map.to(down.device).T
        if self.repair:
            mean_map = mean_map.to(x.device)
            bw = swiglu(x, mean_map @ gate, mean_map @ up,
                        _activation_fn(layer, arch)) * weights[:, None]
            folded_down = ridge_refit((bw.T @ bw).double(), (bw.T @ (target * weights[:, None]))
                                      .double(), folded_down, self.ridge)
        return mean_map, sum_map, folded_down


def head_groups(arch: DecoderArchitecture, attn: nn.Module) -> list[list[int]]:
    """The query heads that must lose heads together: one group per KV head with grouped-query
    attention (every group keeps the same count), all heads in one with multi-head attention."""
    hd = attn.head_dim
    n_q = getattr(attn, arch.q).out_features // hd
    n_kv = getattr(attn, arch.k).out_features // hd
    if n_q == n_kv:
        return [list(range(n_q))]
    m = n_q // n_kv
    return [list(range(g * m, (g + 1) * m)) for g in range(n_kv)]


def attention_activations(stepper: LayerStepper, index: int, layer: nn.Module,
                          arch: DecoderArchitecture) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads, weights): the input of `layer`'s attention output projection on the stepper's
    tokens (fp32, the query heads' outputs side by side) and the token weights gain_t / ||h_t||
    (h_t = the stream after the attention; gain_t as in `layer_activations`, for a post-attention
    norm)."""
    heads, out, stream = stepper.attention_input(index, layer)
    o = getattr(arch.attention_module(layer), arch.o)
    heads, out = heads.to(o.weight.device, torch.float32), out.to(o.weight.device).float()
    gain = _gain(out, arch.attention_post_norm(layer))
    return heads, gain / stream.to(out.device).float().norm(dim=1).clamp_min(1e-6)


def _columns(heads: list[int], hd: int) -> torch.Tensor:
    return torch.tensor([h * hd + d for h in heads for d in range(hd)], dtype=torch.long)


def _explained(gram: torch.Tensor, cross: torch.Tensor, cols: torch.Tensor) -> float:
    """tr(C_S^T G_SS^-1 C_S): the target energy a least-squares refit on columns S keeps."""
    g = gram[cols][:, cols]
    jitter = 1e-6 * float(g.diagonal().mean().clamp_min(1e-30))
    g = g + jitter * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    c = cross[cols]
    return float((c * torch.linalg.solve(g, c)).sum())


def choose_heads(gram: torch.Tensor, o_weight: torch.Tensor, groups: list[list[int]],
                 per_group: int, hd: int) -> list[int]:
    """Greedy backward elimination, group by group: each round every group drops the head whose
    loss a least-squares refit of the output projection compensates best, until every group
    keeps `per_group` heads. Returns the kept heads, sorted."""
    cross = gram @ o_weight.double().T.to(gram.device)  # G O^T: the target is the original
    kept = [list(g) for g in groups]
    for _ in range(len(groups[0]) - per_group):
        for g, heads in enumerate(kept):
            others = [h for j, hs in enumerate(kept) if j != g for h in hs]
            best = max(heads, key=lambda h: _explained(
                gram, cross, _columns(sorted(others + [x for x in heads if x != h]), hd)))
            heads.remove(best)
    return sorted(h for hs in kept for h in hs)


def head_fold(gram: torch.Tensor, o_weight: torch.Tensor, groups: list[list[int]], k: int,
              hd: int, ridge: float = RIDGE
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean_map (k, n), sum_map (k, n), output projection (hidden, k * hd)) folding n query
    heads to k from the Gram matrix (n*hd, n*hd) of the token-weighted head outputs:
    `choose_heads` picks the centres; every other head folds into the centre of its group whose
    output predicts its own best (a_j ~ a_c M, M = G_cc^-1 G_cj, so o_c absorbs o_j M^T); the
    output projection is then refitted by ridge least squares towards that merge (as the MLP's
    down projection)."""
    n = sum(len(g) for g in groups)
    per_group = k if len(groups) == 1 else k // len(groups)
    o = o_weight.double().to(gram.device)
    centres = choose_heads(gram, o_weight, groups, per_group, hd)
    owner = {c: c for c in centres}
    merged = {c: o[:, _columns([c], hd)].clone() for c in centres}
    for group in groups:
        mine = [c for c in centres if c in group]
        for j in group:
            if j in owner:
                continue
            cj = _columns([j], hd)
            fits = {}
            for c in mine:
                cc = _columns([c], hd)
                g_cc = gram[cc][:, cc]
                jitter = 1e-6 * float(g_cc.diagonal().mean().clamp_min(1e-30))
                m = torch.linalg.solve(g_cc + jitter * torch.eye(hd, dtype=g_cc.dtype,
                                                                  device=g_cc.device),
                                       gram[cc][:, cj])
                fits[c] = (float((gram[cj][:, cc] @ m).diagonal().sum()), m)
            c = max(fits, key=lambda x: fits[x][0])
            owner[j] = c
            merged[c] += o[:, cj] @ fits[c][1].T
    cols = _columns(centres, hd)
    prior = torch.cat([merged[c] for c in centres], 1)
    refit = ridge_refit(gram[cols][:, cols], gram[cols] @ o.T, prior, ridge)
    mean_map = torch.zeros(k, n)
    sum_map = torch.zeros(k, n)
    row = {c: r for r, c in enumerate(centres)}
    for j, c in owner.items():
        sum_map[row[c], j] = 1.0
    mean_map[torch.arange(k), torch.tensor(centres)] = 1.0
    return mean_map, sum_map, refit.to(o_weight.dtype)


def _activation_fn(layer: nn.Module, arch: DecoderArchitecture):
    mlp = layer.get_submodule(arch.mlp)
    return getattr(mlp, "act_fn", nn.functional.silu)


def layer_activations(stepper: LayerStepper, index: int, layer: nn.Module,
                      arch: DecoderArchitecture
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, z, output, weights) of `layer`'s MLP on the stepper's tokens (fp32): its input, its
    gated activations, its output (before any post-MLP norm) and the token weights
    gain_t / ||h_t||, h_t = residual + post_norm(output) the stream after the layer and
    gain_t = ||post_norm(output_t)|| / ||output_t|| (1 without a post-MLP norm).

    The refit target stays the MLP's own output: a post-MLP RMSNorm only rescales each token
    (by gain_t, up to its per-dimension weight), so matching the pre-norm output matches what
    the residual stream receives, and an error e_t before the norm reaches the stream scaled by
    about gain_t; the weights therefore measure errors relative to the stream after the norm."""
    x, residual = stepper.mlp_input(index, layer)
    gate, up, down = (m.weight.float() for m in arch.mlp_linears(layer))
    x = x.to(gate.device, torch.float32)
    z = swiglu(x, gate, up, _activation_fn(layer, arch))
    out = z @ down.T
    added = post_mlp(layer, arch, out).float()
    gain = (added.norm(dim=1) / out.norm(dim=1).clamp_min(1e-12)
            if arch.mlp_norms(layer)[1] is not None else 1.0)
    weights = gain / (residual.to(z.device).float() + added).norm(dim=1).clamp_min(1e-6)
    return x, z, out, weights


def gaussian_energy(x: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    act, *, seed: int = 0) -> torch.Tensor:
    """Per-channel mean squared SwiGLU output for inputs drawn from N(0, S), S the token-weighted
    second moment sum_t w_t^2 x_t x_t^T / sum_t w_t^2 of the MLP inputs `x` (as many samples as
    tokens, seeded). A channel's energy on the calibration text depends on which topics the
    text happened to cover; under the Gaussian it depends only on how the channel's gate/up
    rows meet the input's covariance."""
    xw = x * weights[:, None]
    second = (xw.T @ xw / weights.pow(2).sum()).double()
    jitter = 1e-6 * float(second.diagonal().mean().clamp_min(1e-30))
    factor = torch.linalg.cholesky(second + jitter * torch.eye(
        second.shape[0], dtype=second.dtype, device=second.device)).to(x.dtype)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    samples = torch.randn(x.shape[0], x.shape[1], generator=generator, device=x.device,
                          dtype=x.dtype) @ factor.T
    return swiglu(samples, gate, up, act).pow(2).mean(0)


def centre_scores(energy: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Weighted contribution of every channel, sqrt(||z_j w||^2) ||d_j||: the k largest are
    the centres (`energy` = the squared weighted activation norms, e.g. diag of the Gram)."""
    return energy.sqrt() * down.to(energy.dtype).norm(dim=0)


def activation_fold(gram: torch.Tensor, down: torch.Tensor, k: int,
                    centre_energy: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean_map (k, n), sum_map (k, n), folded down (hidden, k), centres (k,)) from the Gram
    matrix (n, n) of the token-weighted SwiGLU activations: centres = the k largest weighted
    contributions sqrt(E_j) ||d_j|| (E = `centre_energy`, by default diag(G)), every other
    channel folded into its most correlated centre (`modelfold.calibrate.centre_merge`)."""
    energy = gram.diagonal().clamp_min(1e-30)
    ranked = energy if centre_energy is None else centre_energy.to(energy).clamp_min(0)
    centres, owner, scale = centre_merge(gram, centre_scores(ranked, down), k)
    mean_map, sum_map = merge_maps(centres, owner, scale)
    return mean_map, sum_map, down @ sum_map.to(down.device).T, centres


@torch.no_grad()
def sensitive_layers(model: nn.Module, arch: DecoderArchitecture, tokens: torch.Tensor,
                     kept: list[int], factor: float = PROTECT_FACTOR, *,
                     resident: Callable[[int], AbstractContextManager] = always_resident
                     ) -> list[int]:
    """Layers whose relative MLP output error at the planned kept counts (activation centres
    only, no merge) exceeds `factor` x the median over the layers being folded, the most
    sensitive first. `resident(i)` holds layer i's weights while it is measured (see
    `LLMFoldContext`)."""
    stepper = LayerStepper(model, arch, tokens)
    errors: dict[int, float] = {}
    for i, layer in enumerate(arch.layers(model)):
        with resident(i):
            if kept[i] < arch.mlp_linears(layer)[0].out_features:
                errors[i] = _centre_only_error(stepper, i, layer, arch, kept[i])
            stepper.advance_past(i)
    if len(errors) < 3:
        return []
    median = float(torch.tensor(list(errors.values())).median())
    return sorted((i for i, e in errors.items() if e > factor * median),
                  key=lambda i: -errors[i])


def _centre_only_error(stepper: LayerStepper, index: int, layer: nn.Module,
                       arch: DecoderArchitecture, kept: int) -> float:
    """Mean relative output error of `layer`'s MLP when only its `kept` centres stay."""
    _, z, _, weights = layer_activations(stepper, index, layer, arch)
    zw = z * weights[:, None]
    down = arch.mlp_linears(layer)[2].weight.float()
    dropped = torch.ones(z.shape[1], dtype=torch.bool, device=z.device)
    dropped[torch.topk(centre_scores(zw.pow(2).sum(0), down), kept).indices] = False
    error = zw[:, dropped] @ down[:, dropped].T  # per-token error / ||h_t||
    return float(error.pow(2).sum(1).mean())


def output_gradients(model: nn.Module, arch: DecoderArchitecture, tokens: torch.Tensor
                     ) -> list[torch.Tensor]:
    """Per decoder layer, (tokens, hidden) float32: the gradient of the language-modelling loss
    of `tokens` (text the model sampled itself, so its next tokens are draws from the model:
    g g^T estimates the Fisher information) with respect to the residual stream after the
    layer's attention. An error e_t added there changes the expected KL divergence from the
    original model by about (g_t . e_t)^2 / 2. One forward and one backward pass; the model's
    weights and their `.grad` are untouched."""
    streams: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(arch.layers(model)):
        def after_attention(_module, args, i=i):
            streams[i] = args[0]

        handles.append(arch.mlp_norms(layer)[0].register_forward_pre_hook(after_attention))
    ids = tokens.to(_device(model))
    try:
        with torch.enable_grad():
            embed = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embed, use_cache=False).logits.float()
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               ids[:, 1:].reshape(-1), reduction="sum")
            grads = torch.autograd.grad(loss, [streams[i] for i in range(len(streams))])
    finally:
        for h in handles:
            h.remove()
    return [g.reshape(-1, g.shape[-1]).float() for g in grads]


def _fisher_error(error: torch.Tensor, grad: torch.Tensor) -> float:
    """sum_t (g_t . e_t)^2 / 2 / tokens: the expected KL increase of an error e added to the
    stream whose loss gradient is g (`output_gradients`), per token."""
    return float((error * grad.to(error.device)).sum(1).pow(2).sum() / 2 / error.shape[0])


def _gain(out: torch.Tensor, post: nn.Module | None) -> torch.Tensor:
    """Per-token factor by which a post-norm scales errors of its input `out` (1 without one)."""
    if post is None:
        return torch.ones(out.shape[0], dtype=out.dtype, device=out.device)
    return post(out).float().norm(dim=1) / out.norm(dim=1).clamp_min(1e-12)


@torch.no_grad()
def head_error_curves(model: nn.Module, arch: DecoderArchitecture, tokens: torch.Tensor,
                      head_units: list[int], ridge: float = RIDGE) -> list[list[float]]:
    """Per layer i of the original model: the expected KL divergence from the original model
    (`output_gradients`: errors weighted by the loss gradient of the stream they enter, so an
    error that later layers amplify counts more) of its attention with u = 0 .. head_units[i]
    heads removed from every head group, after the fold and refit of self-calibrated folding
    (`head_fold`) fitted on the first half of the `tokens` sequences and judged on the second
    half (a refit that only memorises its text must not look free). Each layer is measured
    alone, in the original model."""
    half = tokens.shape[0] // 2
    with torch.enable_grad():  # gradients of the judging half only
        grads = output_gradients(model, arch, tokens[half:])
    stepper = LayerStepper(model, arch, tokens)
    rows = torch.arange(tokens.numel()).view(tokens.shape)
    fit, held = rows[:half].flatten(), rows[half:].flatten()
    curves: list[list[float]] = []
    for i, layer in enumerate(arch.layers(model)):
        attn = arch.attention_module(layer)
        groups, hd = head_groups(arch, attn), attn.head_dim
        curve = [0.0]
        if head_units[i]:
            heads, weights = attention_activations(stepper, i, layer, arch)
            hw = heads[fit] * weights[fit, None]
            gram = (hw.T @ hw).double()
            o = getattr(attn, arch.o).weight.float()
            heads = heads[held]
            out = heads @ o.T
            gain = _gain(out, arch.attention_post_norm(layer))[:, None]
            for u in range(1, head_units[i] + 1):
                k = sum(len(g) - u for g in groups)
                mean_map, _, refit = head_fold(gram, o, groups, k, hd, ridge)
                kept = _columns(mean_map.argmax(1).tolist(), hd).to(heads.device)
                error = (heads[:, kept] @ refit.to(heads.device).T - out) * gain
                curve.append(_fisher_error(error, grads[i]))
        curves.append(curve)
        stepper.advance_past(i)
    return curves


def protect(kept: list[int], widths: list[int], protected: list[int], round_to: int = 1
            ) -> list[int]:
    """Kept counts with the `protected` layers whole and their removed channels spread evenly
    over the other folded layers (same total; multiples of `round_to` where possible)."""
    free = [i for i in range(len(kept)) if i not in protected and kept[i] < widths[i]]
    if not protected or not free:
        return kept
    extra = sum(widths[i] - kept[i] for i in protected)
    new = list(kept)
    for i in protected:
        new[i] = widths[i]
    # spread in units of round_to so that multiples stay multiples; the remainder (only when
    # the widths are not multiples themselves) goes to the first layers
    units, rest = divmod(extra, round_to)
    share, spare = divmod(units, len(free))
    for j, i in enumerate(free):
        new[i] = kept[i] - round_to * (share + (1 if j < spare else 0))
    new[free[0]] -= rest
    if any(new[i] < 1 for i in free):
        raise FoldError("allocation='sensitivity': the protected layers' channels do not fit "
                        "in the other layers; lower the budget.")
    return new
