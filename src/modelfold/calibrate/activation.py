"""Merging channels by what they compute, and refitting consumers by least squares.

Shared by the self-calibrated graph fold (`modelfold.calibrate.graph`) and the LLM fold
(`modelfold.llm.repair`): both observe a layer's channel activations z on inputs the model
produced itself and reduce them to a Gram matrix G = Z^T Z.

* `centre_merge`: the k channels with the largest scores (a channel's weighted contribution to
  the consumers' outputs) are kept as centres; every other channel j joins the centre c it is
  most correlated with and is replaced by alpha_j z_c, alpha_j = G_jc / G_cc (the least-squares
  scale). The centre keeps its producer weights (so its activation stays exactly what it was)
  and its consumer column absorbs alpha_j times the member's column: a duplicated or scaled
  channel folds without error.
* `ridge_refit`: argmin_W ||Y - X W^T||^2 + r ||W - W_prior||^2 from the normal equations,
  shrunk towards the merged weights rather than towards 0 so a fit on the model's own inputs
  cannot wander far from the merge.
"""

from __future__ import annotations

import torch

DUPLICATE_TOLERANCE = 1e-5  # |correlation| >= 1 - this marks an exact copy


def centre_merge(gram: torch.Tensor, scores: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centres (k,) sorted, owner (n,) index into centres, scale (n,)) from the Gram matrix
    (n, n) of the channels' activations and per-channel `scores`: centres own themselves with
    scale 1, every other channel its most correlated centre with scale G_jc / G_cc."""
    n = gram.shape[0]
    energy = gram.diagonal().clamp_min(1e-30)
    centres = pick_centres(gram, scores.to(energy), k)
    is_centre = torch.zeros(n, dtype=torch.bool, device=gram.device)
    is_centre[centres] = True
    members = (~is_centre).nonzero().flatten()
    cross = gram[members][:, centres]  # (n - k, k)
    corr = cross / (energy[members, None].sqrt() * energy[None, centres].sqrt())
    best = corr.abs().argmax(1)
    owner = torch.empty(n, dtype=torch.long, device=gram.device)
    owner[centres] = torch.arange(k, device=gram.device)
    owner[members] = best
    scale = torch.ones(n, dtype=gram.dtype, device=gram.device)
    scale[members] = cross[torch.arange(members.numel(), device=gram.device), best] \
        / energy[centres][best]
    return centres, owner, scale


def pick_centres(gram: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring channels (sorted), passing over any channel that is an exact
    copy (|correlation| = 1, up to float rounding) of one already picked: a duplicate folds
    into its twin without error, so it should not take a centre from a distinct channel."""
    energy = gram.diagonal().clamp_min(1e-30)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    inv = energy.rsqrt()
    chosen: list[int] = []
    copies = torch.zeros(gram.shape[0], dtype=torch.bool, device=gram.device)
    for i in order:
        if copies[i]:
            continue
        chosen.append(i)
        if len(chosen) == k:
            break
        copies |= (gram[i] * inv[i] * inv).abs() >= 1 - DUPLICATE_TOLERANCE
    if len(chosen) < k:  # fewer distinct channels than k: fill with the best copies
        taken = set(chosen)
        chosen += [i for i in order if i not in taken][: k - len(chosen)]
    return torch.tensor(sorted(chosen), dtype=torch.long, device=gram.device)


def merge_maps(centres: torch.Tensor, owner: torch.Tensor, scale: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(producer map, consumer map), both (k, n) float32: producers keep the centres' rows,
    consumers sum every channel's column into its centre's with the channel's scale."""
    k, n = centres.numel(), owner.numel()
    producer = torch.zeros(k, n, dtype=torch.float32, device=owner.device)
    producer[torch.arange(k, device=owner.device), centres] = 1.0
    consumer = torch.zeros(k, n, dtype=torch.float32, device=owner.device)
    consumer[owner, torch.arange(n, device=owner.device)] = scale.float()
    return producer, consumer


def ridge_refit(gram: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor, ridge: float
                ) -> torch.Tensor:
    """argmin_D ||Y - B D^T||^2 + r ||D - prior||^2 given gram = B^T B and cross = B^T Y,
    r = ridge * mean(diag(gram))."""
    gram = gram.double()
    r = ridge * float(gram.diagonal().mean().clamp_min(1e-30))
    gram = gram + r * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    rhs = cross.double() + r * prior.double().T.to(cross.device)
    return torch.linalg.solve(gram, rhs).T.float()
