"""The partition stage: read the dataset, split off held-out rows, cluster, write shards."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save as save_tensors

from partitioner.datasets import load_images, resolve_source
from partitioner.features import make_extractor
from partitioner.kmeans import fit_kmeans, nearest
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from runstore.shards import write_image_shard


@dataclass(frozen=True)
class PartitionRequest:
    source: str
    storage: str
    image_column: str
    label_column: str | None
    heldout_fraction: float
    max_rows: int | None
    clusters: int
    features: str
    pca_components: int
    balance: bool
    balance_eps: float
    kmeans_init: int
    kmeans_iters: int
    seed: int


def run_partition(request: PartitionRequest, layout: RunLayout) -> dict[str, str]:
    """Write partition/ and return {relative path: sha256} of every artifact written."""
    url = resolve_source(request.source, request.storage)
    table = load_images(url, request.image_column, request.label_column, request.max_rows)
    rows = len(table.images)
    heldout_rows = max(1, round(rows * request.heldout_fraction))
    if rows - heldout_rows < request.clusters:
        raise InputError("partition.clusters", f"{request.clusters} clusters asked for but the "
                         f"dataset has {rows - heldout_rows} training rows")
    order = np.random.default_rng(request.seed).permutation(rows)
    heldout_ids, train_ids = np.sort(order[:heldout_rows]), np.sort(order[heldout_rows:])

    extractor = make_extractor(request.features, request.pca_components, request.seed)
    extractor.fit(table.images[train_ids])
    train_features = extractor.transform(table.images[train_ids])
    clustering = fit_kmeans(train_features, request.clusters, request.seed, request.kmeans_init,
                            request.kmeans_iters, request.balance, request.balance_eps)
    heldout_assignment = nearest(extractor.transform(table.images[heldout_ids]),
                                 clustering.centroids)

    artifacts: dict[str, str] = {}

    def record(url: str, sha: str) -> None:
        artifacts[url.removeprefix(layout.root).lstrip("/")] = sha

    for split, ids, assignment in (("train", train_ids, clustering.assignment),
                                   ("heldout", heldout_ids, heldout_assignment)):
        for cluster in range(request.clusters):
            members = ids[assignment == cluster]
            labels = table.labels[members] if table.labels is not None else None
            shard = layout.shard(cluster, split)
            record(shard, write_image_shard(shard, table.images[members], labels, members))

    record(layout.centroids, storage.write_bytes(layout.centroids, save_tensors(
        {"centroids": torch.from_numpy(clustering.centroids)})))
    record(layout.features, storage.write_bytes(layout.features, save_tensors(
        extractor.state(), metadata={"extractor": request.features})))
    stats = {
        "source": url,
        "rows": rows,
        "image_shape": list(table.images.shape[1:]),
        "clusters": request.clusters,
        "features": request.features,
        "sizes": clustering.sizes,
        "heldout_sizes": np.bincount(heldout_assignment, minlength=request.clusters).tolist(),
        "inertia": clustering.inertia,
        "balance_ratio": clustering.balance,
        "balanced": request.balance,
        "label_histogram": _label_histogram(table.labels, train_ids, clustering.assignment,
                                            request.clusters),
    }
    record(layout.partition_stats, storage.write_json(layout.partition_stats, stats))
    return artifacts


def _label_histogram(labels: np.ndarray | None, ids: np.ndarray, assignment: np.ndarray,
                     clusters: int) -> list[list[int]] | None:
    if labels is None:
        return None
    classes = int(labels.max()) + 1
    return [np.bincount(labels[ids[assignment == k]], minlength=classes).tolist()
            for k in range(clusters)]
