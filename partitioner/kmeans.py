"""k-means backends (faiss, scikit-learn) fitted on rows in memory; the balanced, sampled
rule built on them is partitioner/centroids.py."""

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


def nearest(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return squared_distances(features, centroids).argmin(1).astype(np.int64)


# Backends for k-means at scale: the fit runs on a sample (see partitioner/centroids.py), so
# what matters here is a fast, well-seeded Lloyd on an in-memory array.
BACKENDS = ("auto", "faiss", "sklearn")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """`auto` is faiss when faiss-cpu is installed, else scikit-learn."""
    if backend not in BACKENDS:
        raise InputError("kmeans.backend", f"unknown backend {backend!r}; expected one of "
                         f"{', '.join(BACKENDS)}")
    if backend == "auto":
        return "faiss" if faiss_available() else "sklearn"
    if backend == "faiss" and not faiss_available():
        raise InputError("kmeans.backend", "faiss is not installed; `pip install faiss-cpu` "
                         "or use backend 'sklearn'")
    return backend


def nearest_sq(points: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (int32) and the exact squared distance to it (float32), in O(N x K)
    memory: the argmin uses |c|^2 - 2 x.c (one GEMM), the distance is recomputed from x - c
    so inertia carries no cancellation error."""
    scores = points @ centroids.T
    scores *= -2.0
    scores += np.einsum("ij,ij->i", centroids, centroids)
    ids = scores.argmin(1).astype(np.int32)
    diff = points - centroids[ids]
    return ids, np.einsum("ij,ij->i", diff, diff)


def fit_centroids(points: np.ndarray, clusters: int, iters: int, seed: int,
                  backend: str = "auto", weights: np.ndarray | None = None,
                  n_init: int = 1) -> np.ndarray:
    """float32 [clusters, D]: the best of `n_init` k-means++-seeded Lloyd runs on `points`
    (optionally weighted), on faiss or scikit-learn."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    if clusters > len(points):
        raise InputError("kmeans.clusters", f"{clusters} clusters asked for but only "
                         f"{len(points)} points to fit on")
    if resolve_backend(backend) == "sklearn":
        model = KMeans(n_clusters=clusters, init="k-means++", n_init=n_init, max_iter=iters,
                       random_state=seed).fit(points, sample_weight=weights)
        return model.cluster_centers_.astype(np.float32)
    return _fit_faiss(points, clusters, iters, seed, weights, n_init)


def _fit_faiss(points: np.ndarray, clusters: int, iters: int, seed: int,
               weights: np.ndarray | None, n_init: int) -> np.ndarray:
    import faiss
    from sklearn.cluster import kmeans_plusplus

    rows, dim = points.shape
    w = None if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
    # k-means++ (scikit-learn's) lands in far fewer bad minima than faiss's random seeds;
    # run on at most 256 rows per centroid (faiss's own training-sample rule) it costs
    # little next to the Lloyd iterations.
    rng = np.random.default_rng(seed)
    best, best_cost = None, math.inf
    for run in range(n_init):
        seeds = np.sort(rng.choice(rows, min(rows, 256 * clusters), replace=False))
        init, _ = kmeans_plusplus(points[seeds], clusters, random_state=seed + run,
                                  sample_weight=None if w is None else w[seeds])
        # faiss would subsample above max_points_per_centroid: the caller already sampled.
        km = faiss.Kmeans(dim, clusters, niter=iters, seed=seed + run, verbose=False,
                          max_points_per_centroid=rows // clusters + 1,
                          min_points_per_centroid=1)
        cost = km.train(points, weights=w, init_centroids=np.ascontiguousarray(init, np.float32))
        if cost < best_cost or best is None:
            best, best_cost = km.centroids.astype(np.float32), cost
    assert best is not None
    return best
