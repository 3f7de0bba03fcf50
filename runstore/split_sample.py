"""A split of the run's shards read in bounded memory: at most `rows` rows, chosen by a
hash of (seed, dataset row) so the same seed picks the same rows, read one row group at a
time.

Pass 1 reads only the `row_id` column and keeps the `rows` smallest hashes (memory: the
sample's ids plus one row group's ids); pass 2 reads the other columns of the row groups
holding a chosen row and hands each chosen row over with its place in dataset order, so a
caller fills arrays of the sample's size directly. A split no larger than `rows` is read
whole, ordered by dataset row, as before sampling existed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from runstore.row_hash import row_hash

T = TypeVar("T")
SAMPLE_SALT = 5  # apart from the partition's salts (held-out 1, fit samples 2-4)
ROUTER_ROWS = 100_000
"""Training rows the image router learns from: a seeded sample of the train split."""
EVAL_ROWS = 65_536
"""Held-out rows evaluation draws its rows from (at least; more when eval.heldout_rows
asks for more)."""
READ_ROWS = 4_096
"""Rows decoded at a time from a shard's row group."""
FRECHET_ROWS = 65_536
"""Rows of the Fréchet distance's reference set (and its classifier's training set)."""


@dataclass
class ReadCount:
    """What a read pulled from storage: tables (row groups, or READ_ROWS slices of them),
    their rows, and the largest held at once (never more than one row group)."""

    groups: int = 0
    rows: int = 0
    largest: int = 0

    def add(self, table: pa.Table) -> None:
        self.groups += 1
        self.rows += table.num_rows
        self.largest = max(self.largest, table.num_rows)


class ShardFile:
    """One shard file read a row group at a time. A transient storage failure reopens the
    file and retries (runstore.storage's attempts and backoff)."""

    def __init__(self, url: str, count: ReadCount | None = None) -> None:
        self.url = url
        self.count = count
        self.handle: Any = None
        self.file: pq.ParquetFile | None = None
        self._retrying("open", lambda: None)

    def _open(self) -> pq.ParquetFile:
        if self.file is None:
            fs, path = storage.filesystem(self.url)
            self.handle = fs.open(path, "rb")
            self.file = pq.ParquetFile(self.handle)
        return self.file

    def _retrying(self, name: str, action: Callable[[], T]) -> T:
        for attempt in range(1, storage.RETRY_ATTEMPTS + 1):
            try:
                self._open()
                return action()
            except Exception as err:  # sorted into answers and retries
                self._failed(name, attempt, err)
        raise AssertionError("unreachable")

    def _failed(self, name: str, attempt: int, err: Exception) -> None:
        """Close the file and return to retry a transient failure (after a backoff); raise
        anything else, or a failure still there after the attempts, naming the shard."""
        self.__exit__()
        refused = storage.access_error(self.url, err)
        if refused is not None:
            raise refused from None
        if isinstance(err, FileNotFoundError):
            raise InputError(self.url, "missing; expected a shard of the partition") from None
        if isinstance(err, storage.TRANSIENT) and not isinstance(err, pa.ArrowInvalid):
            try:
                storage.backoff(f"shard {name}", attempt, err)
                return
            except OSError:
                pass
        if isinstance(err, pa.ArrowInvalid | OSError | KeyError):
            raise InputError(self.url, f"not a valid islands shard ({err})") from None
        raise err

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, *_: object) -> None:
        if self.file is not None:
            self.file.close()
        if self.handle is not None:
            self.handle.close()
        self.file = self.handle = None

    @property
    def schema(self) -> pa.Schema:
        return self._retrying("footer", lambda: self._open().schema_arrow)

    @property
    def groups(self) -> int:
        return self._retrying("footer", lambda: self._open().num_row_groups)

    @property
    def rows(self) -> int:
        return self._retrying("footer", lambda: self._open().metadata.num_rows)

    def read(self, group: int, columns: list[str]) -> Iterator[pa.Table]:
        """Row group `group` in tables of at most READ_ROWS rows: decoding a list column
        (pixels) takes several times its size, so a whole large group at once would not."""
        done = 0  # tables already yielded: skipped when a read is retried
        for attempt in range(1, storage.RETRY_ATTEMPTS + 1):
            try:
                batches = self._open().iter_batches(batch_size=READ_ROWS, row_groups=[group],
                                                    columns=columns)
                for index, batch in enumerate(batches):
                    if index >= done:
                        done += 1
                        table = pa.Table.from_batches([batch])
                        if self.count is not None:
                            self.count.add(table)
                        yield table
                return
            except Exception as err:  # sorted into answers and retries
                self._failed("read", attempt, err)


def _group_ids(shard: ShardFile, group: int) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.int64), *(
        np.asarray(table.column("row_id").to_numpy(), dtype=np.int64)
        for table in shard.read(group, ["row_id"]))])


def choose_rows(urls: list[str], rows: int | None, seed: int,
                count: ReadCount | None = None) -> np.ndarray:
    """Sorted dataset rows of the sample: every row when there are at most `rows` (or
    `rows` is None), else the `rows` whose hash of (seed, row) is smallest."""
    kept_ids = np.zeros(0, np.int64)
    kept_hash = np.zeros(0, np.uint64)
    for url in urls:
        with ShardFile(url, count) as shard:
            for group in range(shard.groups):
                ids = _group_ids(shard, group)
                kept_ids = np.concatenate([kept_ids, ids])
                if rows is None:
                    continue
                kept_hash = np.concatenate([kept_hash, row_hash(ids, seed, SAMPLE_SALT)])
                if len(kept_ids) > rows:
                    smallest = np.argpartition(kept_hash, rows - 1)[:rows]
                    kept_ids, kept_hash = kept_ids[smallest], kept_hash[smallest]
    return np.sort(kept_ids)


@dataclass
class Chosen:
    """Chosen rows of one row group: `table` holds just them, `at` their places in the
    sample (dataset order), `cluster` the shard they came from."""

    cluster: int
    at: np.ndarray
    table: pa.Table


def read_chosen(urls: list[str], chosen: np.ndarray, columns: list[str],
                count: ReadCount | None = None) -> Iterator[Chosen]:
    """The `columns` of the chosen rows, a row group at a time; groups holding none of
    them are not read past their row ids."""
    for cluster, url in enumerate(urls):
        with ShardFile(url, count) as shard:
            for group in range(shard.groups):
                ids = _group_ids(shard, group)
                at = np.minimum(np.searchsorted(chosen, ids), max(len(chosen) - 1, 0))
                hit = chosen[at] == ids if len(chosen) else np.zeros(len(ids), bool)
                if not hit.any():
                    continue
                start = 0
                for table in shard.read(group, columns):
                    part = slice(start, start + table.num_rows)
                    start += table.num_rows
                    if hit[part].any():
                        yield Chosen(cluster, at[part][hit[part]],
                                     table.filter(pa.array(hit[part])))


def split_urls(layout: RunLayout, clusters: int, split: str) -> list[str]:
    return [layout.shard(cluster, split) for cluster in range(clusters)]


def schema_of(url: str) -> pa.Schema:
    with ShardFile(url) as shard:
        return shard.schema
