"""k-means over Parquet of any size: fit on a uniform sample, then assign every row in
batches, here or as a Ray Data job, with peak memory flat in the number of rows.

    result = kmeans_parquet("s3://bucket/embeddings/", "embedding",
                            KMeansSpec(clusters=16, fine_clusters=128), out="s3://bucket/ids/")

`out` receives one Parquet file per unit (`part-<first row>.parquet`: row, cluster,
distance and any `keep` columns), the same files whether the pass ran here or on Ray.

Memory: the sample (sample_rows x D float32, on the driver) plus, per pass, one batch and
one row group of the columns read. The fit always runs on the driver; with a Ray address
the assignment (and the feature transform) runs in Ray tasks, so the data URL and `out`
must be reachable from every node (an object store or shared filesystem) and a transform
must pickle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from partitioner.centroids import CentroidModel, KMeansSpec, fit_model
from partitioner.parquet_rows import (
    BatchTransform,
    Features,
    ParquetSource,
    Unit,
    open_parquet,
    require_columns,
    sample_features,
)
from runstore import storage
from runstore.errors import InputError


@dataclass
class UnitResult:
    unit: int
    sizes: np.ndarray  # int64 [K]
    inertia: float
    clusters: np.ndarray | None  # int32 [unit rows], when asked for


@dataclass
class Assignment:
    rows: int
    sizes: list[int]
    inertia: float
    """Sum over rows of the squared distance to their cluster's centroid."""
    clusters: np.ndarray | None
    """int32 [rows] in dataset order (files sorted, then row order), when asked for."""
    out: str | None


@dataclass
class StreamingResult:
    model: CentroidModel
    assignment: Assignment
    sample_rows: int


def fit_parquet(source: ParquetSource, features: Features, spec: KMeansSpec) -> tuple[
        CentroidModel, int]:
    """The rule fitted on a uniform sample of `spec.sample_rows` rows, and the sample size."""
    spec.check()
    features.check(source)
    if spec.clusters > source.rows:
        raise InputError(source.url, f"{spec.clusters} clusters asked for but it holds "
                         f"{source.rows} rows")
    sample = sample_features(source, features, spec.sample_rows, spec.seed, spec.batch_rows)
    return fit_model(sample, spec, population=source.rows), len(sample)


def _unit_file(out: str, unit: Unit) -> str:
    return storage.join(out, f"part-{unit.first_row:012d}.parquet")


def assign_unit(source: ParquetSource, index: int, features: Features, model: CentroidModel,
                batch_rows: int, out: str | None = None, keep: tuple[str, ...] = (),
                return_clusters: bool = True) -> UnitResult:
    """One unit's rows assigned batch by batch; the shared step of the local and Ray passes."""
    unit = source.units[index]
    wanted = features.columns()
    columns = None if wanted is None else list(dict.fromkeys([*wanted, *keep]))
    where = source.urls[unit.file]
    sizes = np.zeros(model.clusters, np.int64)
    inertia, parts, row = 0.0, [], unit.first_row
    writer = _Writer(_unit_file(out, unit)) if out else None
    try:
        for batch in source.read(unit, columns, batch_rows):
            vectors = features(batch, where)
            if vectors.shape[1] != model.dim:
                raise InputError(f"{where} features", f"vectors of {vectors.shape[1]} values; "
                                 f"expected {model.dim} like the fitted centroids")
            ids, sq = model.assign(vectors, batch_rows)
            sizes += np.bincount(ids, minlength=model.clusters)
            inertia += float(sq.sum(dtype=np.float64))
            if return_clusters:
                parts.append(ids)
            if writer:
                rows = np.arange(row, row + len(ids), dtype=np.int64)
                writer.write(pa.table({"row": rows, "cluster": ids, "distance": sq,
                                       **{name: batch.column(name) for name in keep}}))
            row += len(ids)
    finally:
        if writer:
            writer.close()
    clusters = np.concatenate(parts) if return_clusters else None
    return UnitResult(index, sizes, inertia, clusters)


class _Writer:
    """Streams tables into one Parquet file under a temporary name, moved into place when
    closed, so a reader never sees half a file (as runstore.storage.write_bytes does)."""

    def __init__(self, url: str) -> None:
        self.fs, self.path = storage.filesystem(url)
        parent = self.path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        self.tmp = f"{parent}/.{self.path.rsplit('/', 1)[-1]}.tmp"  # not *.parquet: unseen
        self.handle = storage.open_write(self.fs, self.tmp)
        self.writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.handle, table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.handle.close()
        storage.move(self.fs, self.tmp, self.path)


def assign_parquet(source: ParquetSource, features: Features, model: CentroidModel, *,
                   batch_rows: int = 65_536, out: str | None = None,
                   keep: tuple[str, ...] = (), return_clusters: bool = True,
                   ray_address: str | None = None) -> Assignment:
    """Every row's cluster, one unit at a time here, or one Ray Data task per unit when
    `ray_address` is given (a running Ray session is used as it is)."""
    features.check(source)
    require_columns(source, keep)
    if out is not None and storage.listdir(out):
        raise InputError(out, "is not empty; expected a new or empty folder for cluster ids")
    if ray_address is not None:
        from partitioner.ray_assign import assign_on_ray

        results = assign_on_ray(source, features, model, batch_rows, out, keep,
                                return_clusters, ray_address)
    else:
        results = [assign_unit(source, index, features, model, batch_rows, out, keep,
                               return_clusters) for index in range(len(source.units))]
    results.sort(key=lambda result: result.unit)
    sizes = np.sum([result.sizes for result in results], axis=0)
    clusters = None
    if return_clusters:
        clusters = np.concatenate([result.clusters for result in results])  # type: ignore[misc]
    return Assignment(source.rows, sizes.tolist(), float(sum(r.inertia for r in results)),
                      clusters, out)


def kmeans_parquet(url: str | ParquetSource, features: str | BatchTransform | Features,
                   spec: KMeansSpec, *, out: str | None = None, keep: tuple[str, ...] = (),
                   return_clusters: bool = True, ray_address: str | None = None,
                   model: CentroidModel | None = None) -> StreamingResult:
    """Fit on a sample (unless `model` is given), then assign every row.

    `features` is a list column (fixed-size list or list of numbers) or a transform of a
    pyarrow batch to float32 [rows, D]. `return_clusters=False` with `out` keeps memory
    flat in rows; the returned ids otherwise take 4 bytes a row.
    """
    source = url if isinstance(url, ParquetSource) else open_parquet(url)
    features = Features.of(features)
    sample_rows = 0
    if model is None:
        model, sample_rows = fit_parquet(source, features, spec)
    assignment = assign_parquet(source, features, model, batch_rows=spec.batch_rows, out=out,
                                keep=keep, return_clusters=return_clusters,
                                ray_address=ray_address)
    return StreamingResult(model, assignment, sample_rows)
