"""Ward agglomerative clustering (the clusterer of the paper-era reference code), via SciPy."""

from __future__ import annotations

import numpy as np
import torch

from modelfold.cluster.kmeans import canonical_labels


def ward(x: torch.Tensor, k: int) -> torch.Tensor:
    """Labels (n,) cutting the Ward dendrogram of the rows of `x` into exactly k clusters."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    if k == n:
        return torch.arange(n, device=x.device)
    if k == 1:
        return torch.zeros(n, dtype=torch.long, device=x.device)
    from scipy.cluster.hierarchy import cut_tree, linkage  # imported when used

    tree = linkage(x.detach().double().cpu().numpy(), method="ward")
    labels = cut_tree(tree, n_clusters=k).reshape(-1).astype(np.int64)
    return canonical_labels(torch.from_numpy(labels)).to(x.device)
