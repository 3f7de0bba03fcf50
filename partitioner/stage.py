"""The partition stage, streamed: split off held-out rows, fit features and k-means on
samples, then assign every row batch by batch and append it to its shard as it goes.

Memory is one batch of rows plus the fit samples, whatever the number of rows: the
held-out split is a hash of (seed, row number), the extractor and k-means fit on uniform
samples of training rows, the balanced assignment is a price per cluster (capacity prices
fitted on the sample, see partitioner/centroids.py), and each shard is a Parquet file
written a row group at a time. The same config and seed give the same shards, byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_tensors

from partitioner.centroids import CentroidModel, KMeansSpec, fit_model
from partitioner.features import make_extractor, save_extractor_state
from partitioner.parquet_rows import sample_indices
from partitioner.request import PartitionRequest, Rows
from partitioner.row_source import InMemoryRows, RowBatch, RowSource, ShardSink
from partitioner.row_split import HeldoutSplit, balanced_parts
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout

BATCH_ROWS = 32_768
"""Rows decoded, embedded and assigned at a time: bounds the stage's working memory."""
FIT_ROWS = 65_536
"""Training rows the feature extractor fits on, and k-means unless `partition.fit_rows`
says otherwise; a smaller dataset fits on all its training rows."""
_FIT_SALT, _KMEANS_SALT, _PART_SALT = 2, 3, 4


def default_kmeans(request: PartitionRequest) -> KMeansSpec:
    return KMeansSpec(clusters=request.clusters, iters=request.kmeans_iters, seed=request.seed,
                      n_init=request.kmeans_init, sample_rows=FIT_ROWS)


@dataclass
class _Rows:
    """The rows the stage works on (all, or a seeded sample of `data.sample_rows`) and
    their held-out split."""

    source: RowSource
    kept: np.ndarray | None  # sorted row numbers, or None for every row
    split: HeldoutSplit

    @property
    def used(self) -> int:
        return self.source.count if self.kept is None else len(self.kept)

    def select(self, batch: RowBatch) -> RowBatch:
        if self.kept is None:
            return batch
        at = np.searchsorted(self.kept, batch.ids)
        inside = at < len(self.kept)
        inside[inside] = self.kept[at[inside]] == batch.ids[inside]
        return batch.take(np.flatnonzero(inside))

    def train_sample(self, rows: int, seed: int) -> np.ndarray:
        """Sorted row numbers of about `rows` training rows drawn uniformly (all of them
        when there are fewer)."""
        share = self.split.train_rows / max(self.used, 1)
        wanted = min(self.used, math.ceil(rows / max(share, 1e-9)))
        picked = sample_indices(self.used, wanted, seed)
        ids = picked if self.kept is None else self.kept[picked]
        return ids[~self.split.heldout(ids)]


@dataclass
class _Shards:
    """The 2 x K shard files, streamed."""

    sinks: dict[tuple[str, int], ShardSink]
    sizes: dict[str, np.ndarray] = field(default_factory=dict)

    def write(self, split: str, batch: RowBatch, clusters: np.ndarray, count: int) -> None:
        order = np.argsort(clusters, kind="stable")
        bounds = np.searchsorted(clusters[order], np.arange(count + 1))
        for cluster in range(count):
            self.sinks[(split, cluster)].write(batch.take(order[bounds[cluster]:
                                                                bounds[cluster + 1]]))
        self.sizes[split] = self.sizes.get(split, np.zeros(count, np.int64)) + \
            np.diff(bounds)


class _PartMeans:
    """Running per-part feature sums for the random method: its centroids are the parts'
    mean features, and its inertia follows from sums of squares."""

    def __init__(self, clusters: int) -> None:
        self.clusters = clusters
        self.sums: np.ndarray | None = None
        self.squares = 0.0
        self.counts = np.zeros(clusters, np.int64)

    def add(self, features: np.ndarray, parts: np.ndarray) -> None:
        if self.sums is None:
            self.sums = np.zeros((self.clusters, features.shape[1]))
        np.add.at(self.sums, parts, features.astype(np.float64))
        self.squares += float(np.einsum("ij,ij->", features, features, dtype=np.float64))
        self.counts += np.bincount(parts, minlength=self.clusters)

    def centroids(self) -> np.ndarray:
        assert self.sums is not None
        return (self.sums / np.maximum(self.counts, 1)[:, None]).astype(np.float32)

    def inertia(self) -> float:
        assert self.sums is not None
        means = self.sums / np.maximum(self.counts, 1)[:, None]
        return max(0.0, self.squares - float((self.counts * (means ** 2).sum(1)).sum()))


def _gather(source: RowSource, ids: np.ndarray) -> RowBatch:
    batches = list(source.take(ids, BATCH_ROWS))
    return RowBatch.concat(batches) if batches else RowBatch(ids[:0], [], {})


def _open_rows(request: PartitionRequest) -> _Rows:
    source = request.read_rows(request)
    if isinstance(source, Rows):
        source = InMemoryRows(source)
    kept = None
    if request.sample_rows is not None and request.sample_rows < source.count:
        kept = sample_indices(source.count, request.sample_rows, request.seed)
    split = HeldoutSplit(request.seed, request.heldout_fraction,
                         source.count if kept is None else kept)
    if split.train_rows < request.clusters:
        raise InputError("partition.clusters", f"{request.clusters} clusters asked for but the "
                         f"dataset has {split.train_rows} training rows")
    return _Rows(source, kept, split)


def run_partition(request: PartitionRequest, layout: RunLayout) -> dict[str, str]:
    """Write partition/ and return {relative path: sha256} of every artifact written."""
    if request.method not in ("kmeans", "random"):
        raise InputError("partition.method", f"unknown {request.method!r}; expected kmeans "
                         "or random")
    extractor = make_extractor(request.features, request.pca_components, request.seed,
                               request.modality, request.model_path)
    rows = _open_rows(request)
    source, clusters = rows.source, request.clusters
    fit = _gather(source, rows.train_sample(FIT_ROWS, request.seed + _FIT_SALT))
    if len(fit) < clusters:  # rows a reader dropped (empty texts) are not in the sample
        raise InputError("partition.clusters", f"{clusters} clusters asked for but "
                         f"{source.source} has {len(fit)} usable training rows (empty texts "
                         "are dropped)")
    extractor.fit(fit.items)
    del fit

    model: CentroidModel | None = None
    if request.method == "kmeans":
        spec = replace(request.kmeans or default_kmeans(request), clusters=clusters,
                       seed=request.seed,
                       balance_eps=request.balance_eps if request.balance else None)
        sample_ids = rows.train_sample(spec.sample_rows, request.seed + _KMEANS_SALT)
        sample = np.concatenate([extractor.transform(batch.items)
                                 for batch in source.take(sample_ids, BATCH_ROWS)])
        model = fit_model(sample, spec, population=rows.split.train_rows)
        del sample
    means = _PartMeans(clusters)
    inertia = 0.0
    seen = {"train": 0, "heldout": 0}  # rows of each split so far: the random parts' ordinals
    shards = _Shards({(split, k): source.shard(layout.shard(k, split))
                      for split in ("train", "heldout") for k in range(clusters)})
    summary = source.summary(clusters)
    for batch in source.batches(BATCH_ROWS):
        batch = rows.select(batch)
        if len(batch) == 0:
            continue
        features = np.asarray(extractor.transform(batch.items), dtype=np.float32)
        held = rows.split.heldout(batch.ids)
        assignment = np.full(len(batch), -1, np.int64)
        for split, where in (("train", ~held), ("heldout", held)):
            index = np.flatnonzero(where)
            if model is None:
                parts = balanced_parts(seen[split] + np.arange(len(index)), clusters,
                                       request.seed, _PART_SALT + (split == "heldout"))
                if split == "train":
                    means.add(features[index], parts)
            elif split == "train":
                ids, sq = model.assign(features[index], BATCH_ROWS)
                parts = ids.astype(np.int64)
                inertia += float(sq.sum(dtype=np.float64))
            else:  # routed as new inputs are: by the rule, without capacity
                parts = model.without_prices().assign(features[index], BATCH_ROWS)[0]
                parts = parts.astype(np.int64)
            seen[split] += len(index)
            shards.write(split, batch.take(index), parts, clusters)
            if split == "train":
                assignment[index] = parts
        summary.add(batch, assignment)

    artifacts: dict[str, str] = {}

    def record(url: str, sha: str) -> None:
        artifacts[url.removeprefix(layout.root).lstrip("/")] = sha

    for (split, k), sink in shards.sinks.items():
        record(layout.shard(k, split), sink.close())
    if model is None:
        centroids, inertia = means.centroids(), means.inertia()
    else:
        centroids = model.centroids
    record(layout.centroids, storage.write_bytes(layout.centroids, save_tensors(
        {"centroids": torch.from_numpy(np.ascontiguousarray(centroids))})))
    record(layout.features, storage.write_bytes(
        layout.features, save_extractor_state(request.features, extractor)))
    sizes = shards.sizes["train"].tolist()
    stats: dict[str, Any] = {
        "source": source.source,
        "modality": request.modality,
        "rows": source.count,
        "rows_used": rows.used,
        "clusters": clusters,
        "features": request.features,
        "method": request.method,
        "sizes": sizes,
        "heldout_sizes": shards.sizes["heldout"].tolist(),
        "inertia": inertia,
        "balance_ratio": max(sizes) / (sum(sizes) / len(sizes)),
        "balanced": request.balance,
        "balance_eps": request.balance_eps,
        **summary.result(),
    }
    record(layout.partition_stats, storage.write_json(layout.partition_stats, stats))
    return artifacts
