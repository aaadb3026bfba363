"""Cluster step: channel features -> labels (k-means or Ward)."""

from modelfold.cluster.features import group_features
from modelfold.cluster.kmeans import KMeansResult, kmeans
from modelfold.cluster.ward import ward

__all__ = ["KMeansResult", "cluster_channels", "group_features", "kmeans", "ward"]


def cluster_channels(features, k: int, config):
    """Labels (n,) in canonical order for `features` (n, d) with the configured clusterer."""
    if config.clusterer == "ward":
        return ward(features, k)
    return kmeans(features, k, n_init=config.n_init, max_iter=config.max_iter, tol=config.tol,
                  seed=config.seed, hartigan=config.clusterer == "hartigan").labels
