"""A fitted clustering as a rule that assigns any batch of rows on its own: flat k-means,
hierarchical k-means (DDM: many fine centroids grouped into K clusters), and optional
per-cluster prices that keep clusters under a capacity.

The rule is fitted once on a sample held in memory; applying it needs only the centroids,
so every row of a dataset of any size can be assigned batch by batch, here or on Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from partitioner.kmeans import Clustering, fit_centroids, nearest_sq, resolve_backend
from partitioner.parquet_rows import sample_indices
from runstore.errors import InputError


@dataclass(frozen=True)
class KMeansSpec:
    clusters: int
    iters: int = 20
    seed: int = 0
    sample_rows: int = 131_072
    """Rows k-means is fitted on (uniform without replacement); every row is then assigned."""
    backend: str = "auto"
    """faiss, sklearn, or auto (faiss when installed)."""
    n_init: int = 1
    """k-means++ restarts; the lowest inertia on the sample wins."""
    fine_clusters: int | None = None
    """Hierarchical mode: fit this many fine centroids (e.g. 8 x clusters), then k-means them,
    weighted by their sample counts, into `clusters`; a row joins its fine centroid's cluster."""
    balance_eps: float | None = None
    """Cap every cluster at (1 + eps) x rows / clusters on the sample (None: no cap)."""
    batch_rows: int = 65_536
    """Rows per batch in streaming passes: bounds their memory."""

    def check(self) -> None:
        resolve_backend(self.backend)
        for name, value, least in (("clusters", self.clusters, 1), ("iters", self.iters, 1),
                                   ("n_init", self.n_init, 1), ("batch_rows", self.batch_rows, 1),
                                   ("sample_rows", self.sample_rows, self.clusters)):
            if value < least:
                raise InputError(f"kmeans.{name}", f"is {value}; expected at least {least}")
        if self.fine_clusters is not None and self.fine_clusters < self.clusters:
            raise InputError("kmeans.fine_clusters", f"is {self.fine_clusters}; expected at "
                             f"least clusters ({self.clusters})")
        if self.balance_eps is not None and self.balance_eps < 0:
            raise InputError("kmeans.balance_eps", f"is {self.balance_eps}; expected >= 0")


@dataclass(frozen=True)
class CentroidModel:
    """Row -> cluster: argmin over clusters of (distance to the cluster's nearest fine
    centroid + the cluster's price). Flat k-means is the case fine == centroids."""

    centroids: np.ndarray  # float32 [K, D]: cluster centres; inertia is measured to these
    fine: np.ndarray  # float32 [F, D], sorted by group
    groups: np.ndarray  # int64 [F], ascending: the cluster of each fine centroid
    prices: np.ndarray  # float32 [K]; zeros unless balanced

    @classmethod
    def flat(cls, centroids: np.ndarray) -> CentroidModel:
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        k = len(centroids)
        return cls(centroids, centroids, np.arange(k), np.zeros(k, np.float32))

    @classmethod
    def hierarchical(cls, centroids: np.ndarray, fine: np.ndarray,
                     groups: np.ndarray) -> CentroidModel:
        order = np.argsort(groups, kind="stable")
        return cls(np.ascontiguousarray(centroids, dtype=np.float32),
                   np.ascontiguousarray(fine[order], dtype=np.float32),
                   groups[order].astype(np.int64), np.zeros(len(centroids), np.float32))

    @property
    def clusters(self) -> int:
        return len(self.centroids)

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    @property
    def is_flat(self) -> bool:
        return len(self.fine) == self.clusters and \
            bool((self.groups == np.arange(self.clusters)).all())

    @property
    def priced(self) -> bool:
        return bool(self.prices.any())

    def scores(self, points: np.ndarray) -> np.ndarray:
        """float32 [N, K]: squared distance to each cluster's nearest fine centroid, less
        |x|^2 (constant per row, so argmin is unchanged); prices not included."""
        scores = points @ self.fine.T
        scores *= -2.0
        scores += np.einsum("ij,ij->i", self.fine, self.fine)
        if self.is_flat:
            return scores
        present, starts = np.unique(self.groups, return_index=True)
        grouped = np.minimum.reduceat(scores, starts, axis=1)
        if len(present) == self.clusters:
            return grouped
        full = np.full((len(points), self.clusters), np.inf, np.float32)
        full[:, present] = grouped  # a cluster with no fine centroid gets no rows
        return full

    def assign(self, points: np.ndarray, batch_rows: int = 65_536) -> tuple[np.ndarray,
                                                                            np.ndarray]:
        """Cluster (int32 [N]) and squared distance to its centroid (float32 [N]), batch by
        batch so temporaries stay O(batch_rows x (F + D))."""
        points = np.asarray(points, dtype=np.float32)
        if points.ndim != 2 or points.shape[1] != self.dim:
            raise InputError("features", f"shape {points.shape}; expected [rows, {self.dim}]")
        ids = np.empty(len(points), np.int32)
        sq = np.empty(len(points), np.float32)
        for start in range(0, len(points), batch_rows):
            chunk = points[start:start + batch_rows]
            scores = self.scores(chunk)
            ids_chunk = (scores + self.prices if self.priced else scores).argmin(1)
            if not self.is_flat:  # inertia is to the cluster's centre, not the fine centroid
                scores = chunk @ self.centroids.T
                scores *= -2.0
                scores += np.einsum("ij,ij->i", self.centroids, self.centroids)
            # |x - c|^2 = |x|^2 + (|c|^2 - 2 x.c): no gather of centres per row, which costs
            # more than the GEMM; float32 rounding here is ~1e-7 of |x|^2 per row.
            own = np.take_along_axis(scores, ids_chunk[:, None], 1)[:, 0]
            own += np.einsum("ij,ij->i", chunk, chunk)
            ids[start:start + len(chunk)] = ids_chunk
            sq[start:start + len(chunk)] = np.maximum(own, 0.0)
        return ids, sq

    def without_prices(self) -> CentroidModel:
        """The routing rule for new inputs: nearest cluster, no capacity."""
        return replace(self, prices=np.zeros(self.clusters, np.float32))


def fit_model(points: np.ndarray, spec: KMeansSpec,
              population: int | None = None) -> CentroidModel:
    """Fit the rule on rows held in memory: all rows, or a uniform sample of `population`."""
    spec.check()
    points = np.ascontiguousarray(points, dtype=np.float32)
    if spec.clusters > len(points):
        raise InputError("kmeans.clusters", f"{spec.clusters} clusters asked for but only "
                         f"{len(points)} rows")
    fit = dict(iters=spec.iters, seed=spec.seed, backend=spec.backend, n_init=spec.n_init)
    if spec.fine_clusters is None:
        model = CentroidModel.flat(fit_centroids(points, spec.clusters, **fit))
    else:
        model = _hierarchical(points, spec, min(spec.fine_clusters, len(points)), fit)
    if spec.balance_eps is not None and spec.clusters > 1:
        eps = sample_eps(spec.balance_eps, spec.clusters, len(points), population)
        model = replace(model, prices=balance_prices(model.scores(points), eps))
    return model


def _hierarchical(points: np.ndarray, spec: KMeansSpec, fine_count: int,
                  fit: dict) -> CentroidModel:
    fine = fit_centroids(points, fine_count, **fit)
    counts = np.bincount(nearest_sq(points, fine)[0], minlength=fine_count)
    used = counts > 0
    if used.sum() < spec.clusters:
        raise InputError("kmeans.fine_clusters", f"only {int(used.sum())} fine centroids hold "
                         f"rows; expected at least clusters ({spec.clusters})")
    coarse = fit_centroids(fine[used], spec.clusters, weights=counts[used].astype(np.float32),
                           **fit)
    groups = nearest_sq(fine, coarse)[0].astype(np.int64)
    # Each cluster's centre is the count-weighted mean of its fine centroids, i.e. the mean
    # of the sample rows it holds, so inertia is measured to the cluster's actual mean.
    weight = np.bincount(groups, weights=counts, minlength=spec.clusters)
    sums = np.zeros_like(coarse, dtype=np.float64)
    np.add.at(sums, groups, fine.astype(np.float64) * counts[:, None])
    filled = weight > 0
    coarse[filled] = (sums[filled] / weight[filled, None]).astype(np.float32)
    return CentroidModel.hierarchical(coarse, fine, groups)


def sample_eps(eps: float, clusters: int, rows: int, population: int | None) -> float:
    """The slack to fit prices to on a sample so that the cap (1 + eps) x mean holds on
    the whole population too: less three standard errors of a sampled cluster share."""
    if population is None or population <= rows:
        return eps
    share = min(1.0, (1.0 + eps) / clusters)
    error = math.sqrt(share * (1 - share) / rows * (1 - rows / population))
    return max(0.0, eps - 3.0 * error * clusters)


def balance_prices(scores: np.ndarray, eps: float, rounds: int = 200) -> np.ndarray:
    """Per-cluster prices p so that argmin_k(scores[:, k] + p[k]) puts at most
    floor((1 + eps) x N / K) rows in any cluster (never fewer than ceil(N / K)): the dual
    of capacity-limited assignment.

    Rounds raise an over-full cluster's price just enough to push its excess rows (those
    with the smallest margin to their next choice) out; prices only rise, as in an auction.
    Unlike a greedy assignment, the result is a rule any later row can be assigned by.
    """
    rows, k = scores.shape
    # Rounded down, with a tolerance for the float product (1.1 x 180 is 198.00000000000003):
    # rounding up would let a cluster exceed the (1 + eps) x mean that stats.json reports.
    capacity = max(math.ceil(rows / k), math.floor((1.0 + eps) * rows / k + 1e-9))
    # Checked in float32, as `CentroidModel.assign` adds them, so the cap holds there too.
    cost = np.asarray(scores, dtype=np.float32)
    prices = np.zeros(k)
    scale = float(np.abs(cost).mean()) or 1.0
    for _ in range(rounds):
        priced = cost + prices.astype(np.float32)
        ids = priced.argmin(1)
        sizes = np.bincount(ids, minlength=k)
        over = np.flatnonzero(sizes > capacity)
        if len(over) == 0:
            break
        # Beyond the rounding of a float32 sum (and of a GEMM batched otherwise), so that
        # an evicted row stays out when assigned later.
        step = 1e-6 * scale + 16 * float(np.spacing(np.abs(priced).max()))
        for cluster in over:
            members = priced[ids == cluster].astype(np.float64)
            own = members[:, cluster].copy()
            members[:, cluster] = np.inf
            margin = members.min(1) - own
            excess = sizes[cluster] - capacity
            prices[cluster] += np.partition(margin, excess - 1)[excess - 1] + step
    return prices.astype(np.float32)


def cluster_rows(features: np.ndarray, spec: KMeansSpec) -> tuple[CentroidModel, Clustering]:
    """The partition stage's path for rows already in memory: fit on a uniform sample of
    `spec.sample_rows` of them, then assign them all in batches."""
    if spec.clusters > len(features):
        raise InputError("partition.clusters", f"{spec.clusters} clusters asked for but the "
                         f"dataset has {len(features)} training rows")
    sample = features[sample_indices(len(features), spec.sample_rows, spec.seed)]
    model = fit_model(sample, spec, population=len(features))
    ids, sq = model.assign(features, spec.batch_rows)
    return model, Clustering(centroids=model.centroids, assignment=ids.astype(np.int64),
                             inertia=float(sq.sum(dtype=np.float64)))
