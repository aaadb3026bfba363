"""Cluster step: channel features -> labels, with a registry of clusterers.

A clusterer maps (features (n, d), k, settings) to canonical labels (n,); `settings` is the
fold's config (it carries `n_init`, `max_iter`, `tol` and `seed`). Add one with
`register_clusterer("name")(fn)`; configs then accept `clusterer="name"`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from modelfold.cluster.features import FEATURES, feature_names, group_features, register_features
from modelfold.cluster.kmeans import KMeansResult, kmeans
from modelfold.cluster.ward import ward
from modelfold.registry import Registry

Clusterer = Callable[[torch.Tensor, int, Any], torch.Tensor]
CLUSTERERS: Registry[Clusterer] = Registry("clusterer")


def register_clusterer(name: str) -> Callable[[Clusterer], Clusterer]:
    """Decorator registering `fn(features, k, settings) -> labels` under `name`."""
    return CLUSTERERS.register(name)


def clusterer_names() -> list[str]:
    return CLUSTERERS.names()


def cluster_channels(features: torch.Tensor, k: int, config: Any) -> torch.Tensor:
    """Labels (n,) in canonical order for `features` (n, d) with the configured clusterer."""
    return CLUSTERERS.get(config.clusterer)(features, k, config)


@register_clusterer("kmeans")
def _kmeans(features: torch.Tensor, k: int, config: Any) -> torch.Tensor:
    """Lloyd k-means with k-means++ seeding."""
    return kmeans(features, k, n_init=config.n_init, max_iter=config.max_iter, tol=config.tol,
                  seed=config.seed).labels


@register_clusterer("hartigan")
def _hartigan(features: torch.Tensor, k: int, config: Any) -> torch.Tensor:
    """k-means followed by Hartigan single-point moves (lower inertia)."""
    return kmeans(features, k, n_init=config.n_init, max_iter=config.max_iter, tol=config.tol,
                  seed=config.seed, hartigan=True).labels


@register_clusterer("ward")
def _ward(features: torch.Tensor, k: int, config: Any) -> torch.Tensor:
    """Agglomerative clustering, Ward linkage."""
    return ward(features, k)


__all__ = ["CLUSTERERS", "FEATURES", "KMeansResult", "cluster_channels", "clusterer_names",
           "feature_names", "group_features", "kmeans", "register_clusterer",
           "register_features", "ward"]
