"""The partition stage, streamed: split off held-out rows, fit features and k-means on
samples, then assign every row batch by batch and append it to its shard as it goes.

Memory is one batch of rows plus the fit samples, whatever the number of rows: the
held-out split is a hash of (seed, row number), the extractor and k-means fit on uniform
samples of training rows, the balanced assignment is a price per cluster (capacity prices
fitted on the sample, see partitioner/centroids.py), and each shard is a Parquet file
written a row group at a time. The same config and seed give the same shards, byte for byte.

The assignment pass runs piece by piece (partitioner/pieces.py): here, or with a Ray
address as one task per piece (partitioner/ray_pieces.py), giving the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_tensors

from partitioner.centroids import CentroidModel, KMeansSpec, fit_model
from partitioner.features import make_extractor, save_extractor_state
from partitioner.parquet_rows import sample_indices
from partitioner.pieces import SPLITS, PassJob, PieceResult, StageRows, assign_piece
from partitioner.request import PartitionRequest, Rows
from partitioner.row_source import InMemoryRows, RowBatch, RowSource
from partitioner.row_split import HeldoutSplit
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout

BATCH_ROWS = 32_768
"""Rows decoded, embedded and assigned at a time: bounds the stage's working memory."""
FIT_ROWS = 65_536
"""Training rows the feature extractor fits on, and k-means unless `partition.fit_rows`
says otherwise; a smaller dataset fits on all its training rows."""
PIECE_ROWS = 131_072
"""Rows of one piece of the assignment pass (consecutive row groups of one file): the
grain of a Ray task when the stage runs on a cluster, and of the local pass alike."""
_FIT_SALT, _KMEANS_SALT = 2, 3


def default_kmeans(request: PartitionRequest) -> KMeansSpec:
    return KMeansSpec(clusters=request.clusters, iters=request.kmeans_iters, seed=request.seed,
                      n_init=request.kmeans_init, sample_rows=FIT_ROWS)


def _gather(source: RowSource, ids: np.ndarray) -> RowBatch:
    batches = list(source.take(ids, BATCH_ROWS))
    return RowBatch.concat(batches) if batches else RowBatch(ids[:0], [], {})


def _open_rows(request: PartitionRequest) -> StageRows:
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
    return StageRows(source, kept, split)


def _ordinals(rows: StageRows, spans: list[tuple[int, int]]) -> list[dict[str, int]]:
    """Rows of each split before each piece: where its random parts' ordinals start."""
    out, seen = [], dict.fromkeys(SPLITS, 0)
    for span in spans:
        out.append(dict(seen))
        for split, count in rows.counts(span).items():
            seen[split] += count
    return out


def _fold(results: Iterable[PieceResult]) -> PieceResult:
    """The pieces' sizes, inertia, part means and summaries, added in dataset order."""
    total: PieceResult | None = None
    for result in results:
        if total is None:
            total = result
            continue
        for split in SPLITS:
            total.sizes[split] = total.sizes[split] + result.sizes[split]
        total.inertia += result.inertia
        total.means.merge(result.means)
        total.summary.merge(result.summary)
    assert total is not None, "a pass has at least one piece"
    return total


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
    job = PassJob(rows, extractor, model, clusters, request.seed, BATCH_ROWS,
                  torch.get_num_threads())
    spans = source.pieces(PIECE_ROWS)
    ordinals = _ordinals(rows, spans) if model is None else [dict.fromkeys(SPLITS, 0)] * len(
        spans)
    sinks = {(split, k): source.shard(layout.shard(k, split))
             for split in SPLITS for k in range(clusters)}
    if request.ray_address is not None and not isinstance(source, InMemoryRows):
        from partitioner.ray_pieces import assign_on_ray

        results = assign_on_ray(job, spans, ordinals, sinks, layout, request.ray_address)
    else:
        results = (assign_piece(job, span, start, sinks)
                   for span, start in zip(spans, ordinals, strict=True))
    try:
        total = _fold(results)
    finally:
        results.close()  # a failed pass stops its pieces and removes their files now
    artifacts: dict[str, str] = {}

    def record(url: str, sha: str) -> None:
        artifacts[url.removeprefix(layout.root).lstrip("/")] = sha

    for (split, k), sink in sinks.items():
        record(layout.shard(k, split), sink.close())
    inertia = total.inertia
    if model is None:
        centroids, inertia = total.means.centroids(), total.means.inertia()
    else:
        centroids = model.centroids
    record(layout.centroids, storage.write_bytes(layout.centroids, save_tensors(
        {"centroids": torch.from_numpy(np.ascontiguousarray(centroids))})))
    record(layout.features, storage.write_bytes(
        layout.features, save_extractor_state(request.features, extractor)))
    sizes = total.sizes["train"].tolist()
    stats: dict[str, Any] = {
        "source": source.source,
        "modality": request.modality,
        "rows": source.count,
        "rows_used": rows.used,
        "clusters": clusters,
        "features": request.features,
        "method": request.method,
        "sizes": sizes,
        "heldout_sizes": total.sizes["heldout"].tolist(),
        "inertia": inertia,
        "balance_ratio": max(sizes) / (sum(sizes) / len(sizes)),
        # Of the training rows' features, about each cluster's mean (see PartMeans).
        "between_cluster_variance": total.means.between_fraction(),
        "balanced": request.balance,
        "balance_eps": request.balance_eps,
        **total.summary.result(),
    }
    record(layout.partition_stats, storage.write_json(layout.partition_stats, stats))
    return artifacts
