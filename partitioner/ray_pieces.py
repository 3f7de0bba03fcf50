"""The partition stage's assignment pass on a Ray cluster: one task per piece, each
running `assign_piece` with Arrow IPC piece files as its sinks (one per split and cluster,
under partition/.pieces/), which the driver appends to the shards in dataset order. The
shards get the same row groups, in the same order, as on the local pass: the same bytes.

Storage and the dataset must be reachable from every node (an object store or a shared
filesystem); the fit (samples, PCA, k-means, prices) stays on the driver.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from partitioner.pieces import SPLITS, PassJob, PieceResult, Span, assign_piece
from partitioner.row_source import ParquetRows, RowBatch
from runstore import storage
from runstore.errors import InputError, OperationalError
from runstore.layout import RunLayout

IN_FLIGHT_PER_CPU = 2  # pieces submitted ahead of the one the driver appends next


class PieceFile:
    """One split and cluster of one piece as an Arrow IPC stream, a record batch per write,
    streamed to storage as the piece goes (a piece's rows are never all in memory); on a
    file system under a temporary name, moved into place when the piece ends."""

    def __init__(self, url: str, source: ParquetRows) -> None:
        self.source = source
        self.fs, self.target = storage.filesystem(url)
        self.path = self.target
        self.handle: Any = None
        self.writer: pa.ipc.RecordBatchStreamWriter | None = None
        self.rows: list[int] = []

    def _open(self, schema: pa.Schema) -> pa.ipc.RecordBatchStreamWriter:
        if not storage.is_object_store(self.fs):
            parent, name = self.target.rsplit("/", 1)
            self.fs.makedirs(parent, exist_ok=True)
            self.path = f"{parent}/.{name}.tmp"
        self.handle = self.fs.open(self.path, "wb")
        return pa.ipc.new_stream(self.handle, schema)

    def write(self, batch: RowBatch) -> None:
        if len(batch) == 0 and self.writer is not None:
            return
        table = self.source.to_table(batch).combine_chunks()
        if self.writer is None:
            self.writer = self._open(table.schema)
        if table.num_rows:
            self.writer.write_table(table)
            self.rows.append(table.num_rows)

    def close(self) -> list[int] | None:
        """Rows of each write; None when the piece wrote nothing here (no file)."""
        if self.writer is None:
            return None
        self.writer.close()
        self.handle.close()
        if self.path != self.target:
            self.fs.mv(self.path, self.target)
        return self.rows


def _piece_folder(layout: RunLayout, index: int) -> str:
    return storage.join(layout.partition, ".pieces", f"piece-{index:06d}")


def _piece_url(folder: str, split: str, cluster: int) -> str:
    return storage.join(folder, f"{split}-{cluster}.arrow")


def run_piece(job: PassJob, index: int, span: Span, ordinals: dict[str, int],
              folder: str) -> PieceResult:
    """A Ray task's body: one piece into its own files."""
    source = job.rows.source
    assert isinstance(source, ParquetRows), "a Ray pass reads Parquet from storage"
    import torch

    torch.set_num_threads(job.torch_threads)
    files = {(split, k): PieceFile(_piece_url(folder, split, k), source)
             for split in SPLITS for k in range(job.clusters)}
    result = assign_piece(job, span, ordinals, files)  # type: ignore[arg-type]
    closed = {key: file.close() for key, file in files.items()}
    result.writes = {key: rows for key, rows in closed.items() if rows is not None}
    return result


def _append(result: PieceResult, folder: str, sinks: dict[tuple[str, int], Any]) -> None:
    """A finished piece's files appended to the shards, a row group per write, read a
    record batch at a time."""
    for (split, k), rows in result.writes.items():
        _append_file(_piece_url(folder, split, k), rows, sinks[(split, k)])
    storage.remove(folder)


def _append_file(url: str, rows: list[int], sink: Any) -> None:
    fs, path = storage.filesystem(url)
    done = 0  # record batches already appended: skipped when a read is retried
    for attempt in range(1, storage.RETRY_ATTEMPTS + 1):
        try:
            with fs.open(path, "rb") as handle:
                reader = pa.ipc.open_stream(handle)
                if not rows:
                    sink.write_table(reader.schema.empty_table())  # the schema only
                for index, batch in enumerate(reader):
                    if index >= done:
                        assert batch.num_rows == rows[index], "a write is one record batch"
                        sink.write_table(pa.Table.from_batches([batch]))
                        done += 1
            return
        except FileNotFoundError:
            raise InputError("storage", f"{url}, written by a Ray task, is not visible here: "
                             "with islands.address the storage must be shared by every node "
                             "(an object store or a shared filesystem)") from None
        except storage.TRANSIENT as err:
            storage.backoff("partition piece read", attempt, err)


def _where(job: PassJob, span: Span) -> str:
    source = job.rows.source
    assert isinstance(source, ParquetRows)
    return source.parquet.url_of(span[0])


def assign_on_ray(job: PassJob, spans: list[Span], ordinals: list[dict[str, int]],
                  sinks: dict[tuple[str, int], Any], layout: RunLayout,
                  address: str) -> Any:
    """Yield each piece's result in dataset order once its files are in the shards; at
    most IN_FLIGHT_PER_CPU x the cluster's CPUs pieces run or wait at a time."""
    import ray

    if layout.root.startswith("memory://"):
        raise InputError("storage", "memory:// lives inside one process and Ray workers "
                         "cannot see it; use a shared path or an object store URL")
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise InputError("islands.address", f"cannot reach Ray at {address} ({err})") \
                from None
        started = True
    storage.remove(storage.join(layout.partition, ".pieces"))  # left by a killed pass
    # A task lost with its worker, or failed on storage, runs again (its files rewritten).
    task = ray.remote(num_cpus=1, max_retries=2,
                      retry_exceptions=list(storage.TRANSIENT))(run_piece)
    shared = ray.put(job)
    window = max(2, int(ray.cluster_resources().get("CPU", 1)) * IN_FLIGHT_PER_CPU)
    refs: dict[int, Any] = {}
    try:
        for index in range(len(spans)):
            for ahead in range(len(refs) + index, min(index + window, len(spans))):
                refs[ahead] = task.remote(shared, ahead, spans[ahead], ordinals[ahead],
                                          _piece_folder(layout, ahead))
            try:
                result = ray.get(refs.pop(index))
            except ray.exceptions.RayError as err:  # a task's error, or its worker lost
                cause = getattr(err, "cause", None) or err
                if isinstance(cause, InputError):
                    raise InputError(cause.where, cause.problem) from None
                raise OperationalError(
                    f"partition piece of rows {spans[index][0]}..{spans[index][1] - 1} of "
                    f"{_where(job, spans[index])} failed: {type(cause).__name__}: "
                    f"{cause}") from None
            _append(result, _piece_folder(layout, index), sinks)
            yield result
    finally:
        for ref in refs.values():
            ray.cancel(ref)
        storage.remove(storage.join(layout.partition, ".pieces"))
        if started:
            ray.shutdown()
