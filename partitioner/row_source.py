"""A dataset read lazily, batch by batch: the partition stage's input.

A `RowSource` yields `RowBatch`es in dataset order, reads any sorted sample of rows,
opens a streaming shard writer and summarises clusters as batches go by, so that the stage
holds one batch (plus the fit samples) whatever the number of rows. `ParquetRows` is the
one for Parquet over fsspec; `InMemoryRows` adapts a modality that returns its rows in
memory (`partitioner.request.Rows`).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from partitioner.parquet_rows import ParquetSource
from partitioner.request import Rows
from runstore import storage


def _take(values: Any, index: np.ndarray) -> Any:
    return values[index] if isinstance(values, np.ndarray) else [values[i] for i in index]


def _join(parts: list[Any]) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [value for part in parts for value in part]


@dataclass
class RowBatch:
    ids: np.ndarray  # int64 [n]: the rows' numbers in the dataset
    items: Any  # what the extractor reads: uint8 [n, H, W, C] images, a list of texts, ...
    columns: dict[str, Any]  # per-row values a shard keeps with the row (label, language)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: np.ndarray) -> RowBatch:
        return RowBatch(self.ids[index], _take(self.items, index),
                        {name: _take(values, index) for name, values in self.columns.items()})

    @staticmethod
    def concat(batches: list[RowBatch]) -> RowBatch:
        return RowBatch(np.concatenate([b.ids for b in batches]),
                        _join([b.items for b in batches]),
                        {name: _join([b.columns[name] for b in batches])
                         for name in batches[0].columns})


class Summary(Protocol):
    """What stats.json says about the data and each cluster's training rows."""

    def add(self, batch: RowBatch, clusters: np.ndarray) -> None:
        """`clusters`: each row's training cluster, -1 for held-out rows."""

    def result(self) -> dict[str, Any]: ...

    def merge(self, other: Any) -> None:
        """Fold in the summary of the rows that follow (a later piece of the pass)."""


class ShardSink(Protocol):
    def write(self, batch: RowBatch) -> None: ...
    def close(self) -> str:
        """Finish the file; return its sha256."""


class RowSource(Protocol):
    source: str
    count: int

    def batches(self, batch_rows: int, span: tuple[int, int] | None = None) -> Iterator[
            RowBatch]:
        """Every row (or those of `span`, a piece), in dataset order."""

    def pieces(self, piece_rows: int) -> list[tuple[int, int]]:
        """The pass cut into spans of about `piece_rows` rows, each inside one file."""

    def take(self, ids: np.ndarray, batch_rows: int) -> Iterator[RowBatch]:
        """The rows `ids` (sorted), reading only what holds them."""

    def shard(self, url: str) -> ShardSink: ...
    def summary(self, clusters: int) -> Summary: ...


class _HashingFile(io.RawIOBase):
    """Hashes what passes through, so a streamed file's sha256 needs no second read."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.handle.write(view)
        self.position += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.position


class ParquetShard:
    """One shard streamed into a Parquet file, a row group per non-empty write. On an
    object store the upload lands at close (one key, atomic there); elsewhere the file is
    written under a temporary name and moved into place, as storage.write_bytes does."""

    def __init__(self, url: str, to_table: Callable[[RowBatch], pa.Table]) -> None:
        self.to_table = to_table
        self.fs, self.path = storage.filesystem(url)
        self.target = self.path
        parent = self.path.rsplit("/", 1)[0] if "/" in self.path else ""
        if not storage.is_object_store(self.fs):
            if parent:
                self.fs.makedirs(parent, exist_ok=True)
            self.path = f"{parent}/.{self.path.rsplit('/', 1)[-1]}.tmp"
        self.file = _HashingFile(storage.open_write(self.fs, self.path))
        self.writer: pq.ParquetWriter | None = None
        self.empty: pa.Table | None = None

    def write(self, batch: RowBatch) -> None:
        if len(batch) == 0 and self.empty is not None:
            return  # the schema of a shard no row reaches is kept once
        self.write_table(self.to_table(batch))

    def write_table(self, table: pa.Table) -> None:
        """One row group (a piece file's write, appended by the driver of a Ray pass)."""
        if table.num_rows == 0:
            if self.empty is None:
                self.empty = table
            return
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.file, table.schema)
        self.writer.write_table(table)

    def close(self) -> str:
        if self.writer is None:
            assert self.empty is not None, "a shard needs at least one (possibly empty) batch"
            self.writer = pq.ParquetWriter(self.file, self.empty.schema)
            self.writer.write_table(self.empty)
        self.writer.close()
        self.file.handle.close()
        if self.path != self.target:
            storage.move(self.fs, self.path, self.target)
        return self.file.digest.hexdigest()


class ParquetRows:
    """A Parquet file or folder read `columns` at a time, cut at `max_rows` without reading
    further; `decode(table, ids)` turns raw rows into a RowBatch (PNG decoding, checks)."""

    def __init__(self, parquet: ParquetSource, columns: list[str],
                 decode: Callable[[pa.Table, np.ndarray], RowBatch],
                 to_table: Callable[[RowBatch], pa.Table],
                 summary: Callable[[int], Summary], max_rows: int | None) -> None:
        self.source = parquet.url
        self.parquet = parquet
        self.columns = columns
        self.decode = decode
        self.to_table = to_table
        self.make_summary = summary
        self.count = min(self.parquet.rows, max_rows or self.parquet.rows)

    def _tables(self, batch_rows: int, ids: np.ndarray | None,
                span: tuple[int, int] | None = None) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """Raw rows (all of them, or those in sorted `ids`, within `span` when given)
        gathered into tables of about `batch_rows`, with their row numbers; row groups
        holding none are not read."""
        parts: list[pa.Table] = []
        part_ids: list[np.ndarray] = []
        held = 0
        first, last = span or (0, self.count)
        for unit in self.parquet.units:
            start = unit.first_row
            if start >= min(last, self.count):
                break
            if start + unit.rows <= first:
                continue
            stop = min(start + unit.rows, self.count, last)
            if ids is not None:
                lo, hi = np.searchsorted(ids, [start, stop])
                if lo == hi:
                    continue
            row = start
            for record in self.parquet.read(unit, self.columns, batch_rows):
                end = min(row + record.num_rows, stop)
                if ids is None:
                    wanted = np.arange(row, end, dtype=np.int64)
                else:
                    a, b = np.searchsorted(ids, [row, end])
                    wanted = ids[a:b]
                if len(wanted):
                    table = pa.Table.from_batches([record])
                    parts.append(table.slice(0, len(wanted)) if ids is None else
                                 table.take(pa.array(wanted - row)))
                    part_ids.append(wanted)
                    held += len(wanted)
                row = end
                if held >= batch_rows:
                    yield pa.concat_tables(parts), np.concatenate(part_ids)
                    parts, part_ids, held = [], [], 0
                if row >= stop:
                    break
        if held:
            yield pa.concat_tables(parts), np.concatenate(part_ids)

    def batches(self, batch_rows: int, span: tuple[int, int] | None = None) -> Iterator[
            RowBatch]:
        for table, ids in self._tables(batch_rows, None, span):
            yield self.decode(table, ids)

    def pieces(self, piece_rows: int) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        start = stop = file = -1
        for unit in self.parquet.units:
            if unit.first_row >= self.count:
                break
            if start >= 0 and (unit.file != file or stop - start >= piece_rows):
                spans.append((start, stop))
                start = -1
            if start < 0:
                start, file = unit.first_row, unit.file
            stop = min(unit.first_row + unit.rows, self.count)
        return [*spans, (start, stop)]

    def take(self, ids: np.ndarray, batch_rows: int) -> Iterator[RowBatch]:
        for table, part in self._tables(batch_rows, np.asarray(ids, dtype=np.int64)):
            yield self.decode(table, part)

    def shard(self, url: str) -> ShardSink:
        return ParquetShard(url, self.to_table)

    def summary(self, clusters: int) -> Summary:
        return self.make_summary(clusters)


class _RowsShard:
    def __init__(self, rows: Rows, url: str) -> None:
        self.rows, self.url, self.ids = rows, url, []

    def write(self, batch: RowBatch) -> None:
        self.ids.append(batch.ids)

    def close(self) -> str:
        return self.rows.write(self.url, np.concatenate(self.ids))


class _RowsSummary:
    def __init__(self, rows: Rows, clusters: int) -> None:
        self.rows, self.clusters = rows, clusters
        self.ids: list[np.ndarray] = []
        self.assignment: list[np.ndarray] = []

    def add(self, batch: RowBatch, clusters: np.ndarray) -> None:
        train = clusters >= 0
        self.ids.append(batch.ids[train])
        self.assignment.append(clusters[train])

    def merge(self, other: _RowsSummary) -> None:
        self.ids += other.ids
        self.assignment += other.assignment

    def result(self) -> dict[str, Any]:
        return {**self.rows.stats, **self.rows.describe(
            np.concatenate(self.ids), np.concatenate(self.assignment), self.clusters)}


class InMemoryRows:
    """A modality's rows already in memory (`Rows`), served as a RowSource."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows
        self.source = rows.source
        self.count = rows.count

    def batches(self, batch_rows: int, span: tuple[int, int] | None = None) -> Iterator[
            RowBatch]:
        first, last = span or (0, self.count)
        for start in range(first, last, batch_rows):
            ids = np.arange(start, min(start + batch_rows, last), dtype=np.int64)
            yield RowBatch(ids, self.rows.take(ids), {})

    def pieces(self, piece_rows: int) -> list[tuple[int, int]]:
        return [(0, self.count)]  # held in this process: one piece, never shipped

    def take(self, ids: np.ndarray, batch_rows: int) -> Iterator[RowBatch]:
        for start in range(0, len(ids), batch_rows):
            part = np.asarray(ids[start:start + batch_rows], dtype=np.int64)
            yield RowBatch(part, self.rows.take(part), {})

    def shard(self, url: str) -> ShardSink:
        return _RowsShard(self.rows, url)

    def summary(self, clusters: int) -> Summary:
        return _RowsSummary(self.rows, clusters)
