"""One piece of the partition stage's assignment pass: the rows of a span (consecutive row
groups of one file) embedded, assigned and written to the sinks it is given, batch by batch.

The same function runs every piece, here (the sinks are the shards themselves) or in a Ray
task (the sinks are the piece's own files, which the driver appends to the shards in
dataset order), so both give the same shards, byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from partitioner.centroids import CentroidModel
from partitioner.parquet_rows import sample_indices
from partitioner.row_source import RowBatch, RowSource, ShardSink, Summary
from partitioner.row_split import HeldoutSplit, balanced_parts

SPLITS = ("train", "heldout")
PART_SALT = 4
Span = tuple[int, int]  # [first row, stop row) of the dataset


@dataclass
class StageRows:
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

    def counts(self, span: Span) -> dict[str, int]:
        """Rows of each split in `span`: where the random parts' ordinals of a piece start."""
        ids = np.arange(*span, dtype=np.int64)
        if self.kept is not None:
            lo, hi = np.searchsorted(self.kept, span)
            ids = self.kept[lo:hi]
        held = int(self.split.heldout(ids).sum())
        return {"train": len(ids) - held, "heldout": held}


class PartMeans:
    """Running per-part feature sums of the training rows: the random method's centroids
    are the parts' mean features, its inertia follows from sums of squares, and so does
    every method's between-cluster share of the variance."""

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

    def merge(self, other: PartMeans) -> None:
        """A later piece's sums, added in dataset order on every path."""
        if other.sums is not None:
            self.sums = other.sums.copy() if self.sums is None else self.sums + other.sums
        self.squares += other.squares
        self.counts = self.counts + other.counts  # arrays back from Ray are read-only

    def centroids(self) -> np.ndarray:
        assert self.sums is not None
        return (self.sums / np.maximum(self.counts, 1)[:, None]).astype(np.float32)

    def inertia(self) -> float:
        """The within-part sum of squares: of each row's distance to its part's mean."""
        assert self.sums is not None
        means = self.sums / np.maximum(self.counts, 1)[:, None]
        return max(0.0, self.squares - float((self.counts * (means ** 2).sum(1)).sum()))

    def total_squares(self) -> float:
        """The total sum of squares: of each row's distance to the mean of all rows."""
        assert self.sums is not None
        total = self.sums.sum(0)
        return max(0.0, self.squares - float(total @ total) / max(int(self.counts.sum()), 1))

    def between_fraction(self) -> float:
        """1 - within / total sum of squares: the share of the features' variance that lies
        between the parts (0: parts no better than random, 1: every part a single point)."""
        total = self.total_squares() if self.sums is not None else 0.0
        if total <= 0.0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.inertia() / total))


@dataclass
class PassJob:
    """What every piece needs (shipped once to a Ray cluster): the rows, the fitted
    extractor and rule (None: balanced random parts) and the batch size."""

    rows: StageRows
    extractor: Any
    model: CentroidModel | None
    clusters: int
    seed: int
    batch_rows: int
    torch_threads: int = 1
    """The driver's torch threads, which a Ray task uses too (torch's kernels may round
    differently with another count)."""


@dataclass
class PieceResult:
    sizes: dict[str, np.ndarray]  # int64 [K] rows per cluster, per split
    inertia: float
    means: PartMeans
    summary: Summary
    writes: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    """Rows of each write to each sink, when the sinks were piece files."""


def write_clusters(sinks: dict[tuple[str, int], ShardSink], split: str, batch: RowBatch,
                   clusters: np.ndarray, count: int) -> np.ndarray:
    """Each cluster's rows of `batch` to its sink (an empty write too); rows per cluster."""
    order = np.argsort(clusters, kind="stable")
    bounds = np.searchsorted(clusters[order], np.arange(count + 1))
    for cluster in range(count):
        sinks[(split, cluster)].write(batch.take(order[bounds[cluster]:bounds[cluster + 1]]))
    return np.diff(bounds)


def assign_piece(job: PassJob, span: Span, ordinals: dict[str, int],
                 sinks: dict[tuple[str, int], ShardSink]) -> PieceResult:
    """The rows of `span` assigned and written; `ordinals`: rows of each split before it
    (the random parts' running count)."""
    # OpenBLAS rounds a GEMM differently with another thread count (a Ray task gets one),
    # so every piece runs with one BLAS thread: the same bytes whichever process ran it.
    with threadpool_limits(limits=1, user_api="blas"):
        return _assign(job, span, ordinals, sinks)


def _assign(job: PassJob, span: Span, ordinals: dict[str, int],
            sinks: dict[tuple[str, int], ShardSink]) -> PieceResult:
    rows, model, clusters = job.rows, job.model, job.clusters
    sizes = {split: np.zeros(clusters, np.int64) for split in SPLITS}
    means = PartMeans(clusters)
    inertia = 0.0
    seen = dict(ordinals)
    summary = rows.source.summary(clusters)
    for batch in rows.source.batches(job.batch_rows, span):
        batch = rows.select(batch)
        if len(batch) == 0:
            continue
        features = np.asarray(job.extractor.transform(batch.items), dtype=np.float32)
        held = rows.split.heldout(batch.ids)
        assignment = np.full(len(batch), -1, np.int64)
        for split, where in (("train", ~held), ("heldout", held)):
            index = np.flatnonzero(where)
            if model is None:
                parts = balanced_parts(seen[split] + np.arange(len(index)), clusters,
                                       job.seed, PART_SALT + (split == "heldout"))
            elif split == "train":
                ids, sq = model.assign(features[index], job.batch_rows)
                parts = ids.astype(np.int64)
                inertia += float(sq.sum(dtype=np.float64))
            else:  # routed as new inputs are: by the rule, without capacity
                parts = model.without_prices().assign(features[index], job.batch_rows)[0]
                parts = parts.astype(np.int64)
            seen[split] += len(index)
            sizes[split] += write_clusters(sinks, split, batch.take(index), parts, clusters)
            if split == "train":
                means.add(features[index], parts)
                assignment[index] = parts
        summary.add(batch, assignment)
    return PieceResult(sizes, inertia, means, summary)
