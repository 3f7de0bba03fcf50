"""Parquet files on any fsspec URL read in bounded batches: row counts from the footers,
feature vectors from a list column or a batch transform, and a uniform row sample.

Work is cut into units (consecutive row groups of one file, about `unit_rows` rows): the
grain of a pass, of a Ray task and of an output file. Memory is bounded by one batch (and
one row group's column chunks), whatever the number of rows.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from runstore import storage
from runstore.errors import InputError

BatchTransform = Callable[[pa.RecordBatch], np.ndarray]


@dataclass(frozen=True)
class Unit:
    """Consecutive row groups of one file; rows are numbered across the whole dataset."""

    file: int  # index into ParquetSource.files
    row_groups: tuple[int, ...]
    group_rows: tuple[int, ...]
    first_row: int

    @property
    def rows(self) -> int:
        return sum(self.group_rows)


@dataclass(frozen=True)
class ParquetSource:
    url: str
    filesystem: pafs.FileSystem
    files: tuple[str, ...]  # paths on `filesystem`, in dataset order
    urls: tuple[str, ...]  # the same files as URLs, for messages
    schemas: tuple[pa.Schema, ...]
    units: tuple[Unit, ...]

    @property
    def rows(self) -> int:
        return sum(unit.rows for unit in self.units)

    def url_of(self, row: int) -> str:
        """The file holding dataset row `row` (the last file past the end)."""
        at = bisect.bisect_right([unit.first_row for unit in self.units], row) - 1
        return self.urls[self.units[max(at, 0)].file]

    def read(self, unit: Unit, columns: list[str] | None, batch_rows: int,
             row_groups: tuple[int, ...] | None = None) -> Iterator[pa.RecordBatch]:
        url = self.urls[unit.file]
        # One row group at a time: given them all, the reader pre-buffers them all.
        for group in row_groups or unit.row_groups:
            done = 0  # batches of this group already yielded: skipped when a read is retried
            for attempt in range(1, storage.RETRY_ATTEMPTS + 1):
                try:
                    with pq.ParquetFile(self.files[unit.file],
                                        filesystem=self.filesystem) as handle:
                        batches = handle.iter_batches(batch_size=batch_rows, columns=columns,
                                                      row_groups=[group])
                        for index, batch in enumerate(batches):
                            if index >= done:
                                done += 1
                                yield batch
                    break
                except Exception as err:  # sorted into answers and retries
                    _retry_or_raise(url, "read", attempt, err)


def _retry_or_raise(url: str, name: str, attempt: int, err: Exception) -> None:
    """Sleep before another try of a transient storage failure; raise anything else (or a
    failure still there after the retries) as one InputError naming the file."""
    refused = storage.access_error(url, err)
    if refused is not None:
        raise refused from None
    if isinstance(err, pa.ArrowInvalid | FileNotFoundError) or not isinstance(
            err, storage.TRANSIENT):
        if isinstance(err, pa.ArrowInvalid | OSError):
            raise InputError(url, f"not a readable Parquet file ({err})") from None
        raise err
    try:
        storage.backoff(f"parquet {name}", attempt, err)
    except OSError:
        raise InputError(url, f"not a readable Parquet file ({err})") from None


def _arrow_filesystem(fs: object) -> pafs.FileSystem:
    protocol = getattr(fs, "protocol", ())
    if "file" in (protocol if isinstance(protocol, tuple) else (protocol,)):
        return pafs.LocalFileSystem()  # native reads: faster than going through Python
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def open_parquet(url: str, unit_rows: int = 1 << 20,
                 files: tuple[str, ...] | None = None) -> ParquetSource:
    """A Parquet file or a folder of them (`*.parquet` at any depth, sorted), or the
    Parquet URLs `files` (on the filesystem of `url`) named `url`: footers only."""
    fs, path = storage.filesystem(files[0] if files else url)
    if files:
        paths = [storage.filesystem(file)[1] for file in files]
    elif not storage.exists(url):
        raise InputError(url, "does not exist")
    else:
        paths = [path]
    if not files and storage.isdir(fs, path):
        paths = sorted(p for p in storage.find(fs, path) if p.endswith(".parquet"))
        if not paths:
            raise InputError(url, "folder holds no .parquet files")
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    arrow_fs = _arrow_filesystem(fs)
    units: list[Unit] = []
    schemas = []
    row = 0
    for index, file in enumerate(paths):
        for attempt in range(1, storage.RETRY_ATTEMPTS + 1):
            try:
                with pq.ParquetFile(file, filesystem=arrow_fs) as handle:
                    meta = handle.metadata
                    schemas.append(handle.schema_arrow)
                break
            except Exception as err:  # sorted into answers and retries
                _retry_or_raise(protocol + file, "footer", attempt, err)
        groups: list[int] = []
        sizes: list[int] = []
        for group in range(meta.num_row_groups):
            groups.append(group)
            sizes.append(meta.row_group(group).num_rows)
            if sum(sizes) >= unit_rows or group == meta.num_row_groups - 1:
                if sum(sizes):
                    units.append(Unit(index, tuple(groups), tuple(sizes), row))
                row += sum(sizes)
                groups, sizes = [], []
    source = ParquetSource(url, arrow_fs, tuple(paths), tuple(protocol + p for p in paths),
                           tuple(schemas), tuple(units))
    if source.rows == 0:
        raise InputError(url, "holds no rows; expected at least one")
    return source


def require_columns(source: ParquetSource, names: list[str] | tuple[str, ...]) -> None:
    for url, schema in zip(source.urls, source.schemas, strict=True):
        for name in names:
            if name not in schema.names:
                raise InputError(f"{url} column {name!r}", "missing; the file has columns "
                                 f"{', '.join(schema.names)}")


def list_matrix(array: pa.Array | pa.ChunkedArray, where: str) -> np.ndarray:
    """float32 [rows, D] from a fixed-size list or list column of numbers, zero-copy when
    the values are float32 without nulls."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    kind = array.type
    expected = "expected a fixed-size list (or list) of floats, one vector per row"
    if pa.types.is_fixed_size_list(kind):
        width = kind.list_size
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = np.diff(np.asarray(array.offsets))
        width = int(lengths[0]) if len(lengths) else 0
        if len(lengths) and (lengths != width).any():
            raise InputError(where, f"vectors of different lengths ({width} and "
                             f"{int(lengths[lengths != width][0])}); {expected}")
    else:
        raise InputError(where, f"has type {kind}; {expected}")
    value = kind.value_type
    if not (pa.types.is_floating(value) or pa.types.is_integer(value)):
        raise InputError(where, f"has type {kind}; {expected}")
    values = array.flatten()  # honours the slice offset of a batch
    if array.null_count or values.null_count:
        raise InputError(where, f"has null vectors or values; {expected}")
    if len(array) and width == 0:
        raise InputError(where, f"holds empty vectors; {expected}")
    matrix = values.to_numpy(zero_copy_only=False).reshape(len(array), width)
    return np.asarray(matrix, dtype=np.float32)


@dataclass(frozen=True)
class Features:
    """Where a row's vector comes from: a list `column`, or `transform(batch)` reading
    `reads` (None: every column). A transform must be picklable to run on Ray."""

    column: str | None = None
    transform: BatchTransform | None = None
    reads: tuple[str, ...] | None = None

    @classmethod
    def of(cls, features: str | BatchTransform | Features) -> Features:
        if isinstance(features, Features):
            return features
        return cls(column=features) if isinstance(features, str) else cls(transform=features)

    def columns(self) -> list[str] | None:
        if self.column is not None:
            return [self.column]
        return None if self.reads is None else list(self.reads)

    def check(self, source: ParquetSource) -> None:
        """Missing columns and wrong types, per file, before any row is read."""
        require_columns(source, self.columns() or [])
        for url, schema in zip(source.urls, source.schemas, strict=True):
            if self.column is not None:
                list_matrix(pa.array([], type=schema.field(self.column).type),
                            f"{url} column {self.column!r}")

    def __call__(self, batch: pa.RecordBatch, where: str) -> np.ndarray:
        if self.column is not None:
            return list_matrix(batch.column(self.column), f"{where} column {self.column!r}")
        assert self.transform is not None, "Features needs a column or a transform"
        out = np.asarray(self.transform(batch), dtype=np.float32)
        if out.ndim != 2 or len(out) != batch.num_rows:
            raise InputError(f"{where} features", f"transform returned shape {out.shape}; "
                             f"expected [{batch.num_rows}, D]")
        return out


def sample_indices(total: int, rows: int, seed: int, block: int = 1 << 16) -> np.ndarray:
    """Sorted uniform sample of `rows` of `total` row numbers, without replacement, in
    O(rows + total / block) memory: a multivariate hypergeometric draw splits the sample
    over fixed blocks, then each block picks its rows."""
    if rows >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    sizes = np.full(-(-total // block), block, dtype=np.int64)
    sizes[-1] = total - block * (len(sizes) - 1)
    counts = rng.multivariate_hypergeometric(sizes, rows)
    parts = [start + np.sort(rng.choice(size, count, replace=False))
             for start, size, count in zip(np.arange(len(sizes)) * block, sizes, counts,
                                           strict=True) if count]
    return np.concatenate(parts).astype(np.int64)


def sample_features(source: ParquetSource, features: Features, rows: int, seed: int,
                    batch_rows: int) -> np.ndarray:
    """float32 [min(rows, total), D]: the features of a uniform row sample; only row
    groups holding sampled rows are read, and only sampled rows are transformed."""
    picked = sample_indices(source.rows, rows, seed)
    out: np.ndarray | None = None
    filled = 0
    for unit in source.units:
        start = unit.first_row
        for group, size in zip(unit.row_groups, unit.group_rows, strict=True):
            lo, hi = np.searchsorted(picked, [start, start + size])
            if hi > lo:
                offset = start
                for batch in source.read(unit, features.columns(), batch_rows, (group,)):
                    a, b = np.searchsorted(picked, [offset, offset + batch.num_rows])
                    if b > a:
                        taken = batch.take(pa.array(picked[a:b] - offset))
                        vectors = features(taken, source.urls[unit.file])
                        if out is None:
                            out = np.empty((len(picked), vectors.shape[1]), np.float32)
                        if vectors.shape[1] != out.shape[1]:
                            raise InputError(f"{source.urls[unit.file]} features",
                                             f"vectors of {vectors.shape[1]} values; expected "
                                             f"{out.shape[1]} like the rows before")
                        out[filled:filled + len(vectors)] = vectors
                        filled += len(vectors)
                    offset += batch.num_rows
            start += size
    assert out is not None and filled == len(picked)
    return out
