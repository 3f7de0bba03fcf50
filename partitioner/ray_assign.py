"""The assignment pass as a Ray Data job: one task per unit (consecutive row groups of one
file), each reading its rows straight from storage, extracting features and assigning
them with the same code as the local pass, so both give the same ids and the same files.

Units rather than `ray.data.read_parquet` blocks because a unit knows its global row
numbers: the ids come back (and are written) in dataset order whatever order tasks end.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from partitioner.centroids import CentroidModel
from partitioner.parquet_rows import Features, ParquetSource
from partitioner.streaming import UnitResult, assign_unit
from runstore.errors import InputError


def _connect(address: str) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)


def assign_on_ray(source: ParquetSource, features: Features, model: CentroidModel,
                  batch_rows: int, out: str | None, keep: tuple[str, ...],
                  return_clusters: bool, address: str) -> list[UnitResult]:
    import ray.data

    _connect(address)

    def run(batch: pa.Table) -> pa.Table:
        done: list[UnitResult] = []
        for index in batch.column("unit").to_pylist():
            try:
                done.append(assign_unit(source, index, features, model, batch_rows, out, keep,
                                        return_clusters))
            except InputError as err:
                # Ray Data keeps only the message of a task's exception: send it as data
                # so the driver raises the same InputError the local pass would.
                return pa.table({"unit": [index], "where": [err.where],
                                 "problem": [err.problem]})
        ids = [r.clusters if r.clusters is not None else np.zeros(0, np.int32) for r in done]
        offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int32)
        return pa.table({
            "unit": pa.array([r.unit for r in done], pa.int64()),
            "sizes": pa.array([r.sizes.tolist() for r in done], pa.list_(pa.int64())),
            "inertia": pa.array([r.inertia for r in done], pa.float64()),
            "clusters": pa.ListArray.from_arrays(offsets, np.concatenate(ids)),
        })

    units = len(source.units)
    dataset = ray.data.from_items([{"unit": i} for i in range(units)],
                                  override_num_blocks=units)
    dataset.context.enable_progress_bars = False  # this dataset's own copy of the context
    dataset = dataset.map_batches(run, batch_size=1, batch_format="pyarrow")
    results = []
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        if "where" in table.column_names:
            raise InputError(table.column("where")[0].as_py(), table.column("problem")[0].as_py())
        for row in range(table.num_rows):
            ids = table.column("clusters")[row].values.to_numpy()
            results.append(UnitResult(
                table.column("unit")[row].as_py(),
                np.asarray(table.column("sizes")[row].values, dtype=np.int64),
                table.column("inertia")[row].as_py(), ids if return_clusters else None))
    return results
