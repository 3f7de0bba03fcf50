"""k-means (scikit-learn) with an optional capacity-balanced assignment, as c-BTM requires."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from runstore.errors import InputError


@dataclass
class Clustering:
    centroids: np.ndarray  # float32 [K, D]
    assignment: np.ndarray  # int64 [N]
    inertia: float

    @property
    def sizes(self) -> list[int]:
        return np.bincount(self.assignment, minlength=len(self.centroids)).tolist()

    @property
    def balance(self) -> float:
        """Largest cluster over the mean cluster size: 1.0 is perfectly balanced."""
        sizes = self.sizes
        return max(sizes) / (sum(sizes) / len(sizes))


def squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return ((points[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)


def balanced_assign(distances: np.ndarray, capacity: int) -> np.ndarray:
    """Greedy capacity-constrained assignment: closest (point, cluster) pairs first."""
    rows, clusters = distances.shape
    order = np.argsort(distances, axis=None, kind="stable")
    assignment = np.full(rows, -1, dtype=np.int64)
    load = np.zeros(clusters, dtype=np.int64)
    remaining = rows
    for flat in order:
        point, cluster = divmod(int(flat), clusters)
        if assignment[point] >= 0 or load[cluster] >= capacity:
            continue
        assignment[point] = cluster
        load[cluster] += 1
        remaining -= 1
        if remaining == 0:
            break
    return assignment


def fit_kmeans(features: np.ndarray, clusters: int, seed: int, n_init: int, max_iter: int,
               balance: bool, balance_eps: float, balance_rounds: int = 5) -> Clustering:
    rows = len(features)
    if clusters > rows:
        raise InputError("partition.clusters",
                         f"{clusters} clusters asked for but the dataset has {rows} training rows")
    model = KMeans(n_clusters=clusters, n_init=n_init, max_iter=max_iter, random_state=seed)
    assignment = model.fit_predict(features).astype(np.int64)
    centroids = model.cluster_centers_.astype(np.float32)
    if balance and clusters > 1:
        capacity = math.ceil((1.0 + balance_eps) * rows / clusters)
        # Balanced Lloyd rounds: constrained assignment, then centroid update.
        for _ in range(balance_rounds):
            assignment = balanced_assign(squared_distances(features, centroids), capacity)
            centroids = np.stack([features[assignment == k].mean(0) for k in range(clusters)])
    distances = squared_distances(features, centroids)
    inertia = float(distances[np.arange(rows), assignment].sum())
    return Clustering(centroids=centroids.astype(np.float32), assignment=assignment,
                      inertia=inertia)


def nearest(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return squared_distances(features, centroids).argmin(1).astype(np.int64)
