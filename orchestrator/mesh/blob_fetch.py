"""Fetch a blob into a local file from one or several chunk sources at once.

Chunks are spread over every source that has the blob, each read bounded by a timeout and
verified against its sha256 before it is written. A chunk that fails (error, timeout, bad
bytes) goes to another source; a source that keeps failing, or serves bad bytes, is
dropped and named in the result. Progress lives in `<dest>.part` and its bitfield
(`blob_partial`), so a fetch that stops anywhere resumes with only the missing chunks.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from orchestrator.mesh.blob_manifest import BlobManifest, ManifestError, is_root
from orchestrator.mesh.blob_partial import PartialBlob
from runstore.errors import InputError


@runtime_checkable
class ChunkSource(Protocol):
    """Anything that can serve a blob's bytes: a bucket, a peer over libp2p. Both methods may
    raise (any exception counts as a failure of this source) and may be called from
    several threads at once."""

    name: str

    def manifest(self, root: str) -> BlobManifest | None:
        """The blob's manifest, or None when this source does not have the blob."""
        ...

    def read(self, root: str, offset: int, length: int) -> bytes:
        """`length` bytes of the blob from `offset`."""
        ...


@dataclass
class SourceReport:
    name: str
    has_blob: bool = False
    chunks: int = 0          # verified chunks taken from this source
    bytes: int = 0           # their bytes
    bad_chunks: int = 0      # chunks whose bytes did not match their sha256
    bad_manifest: bool = False
    failures: int = 0        # errors and timeouts (bad chunks not included)
    dropped: bool = False
    last_error: str | None = None
    _in_a_row: int = field(default=0, repr=False)


@dataclass
class FetchResult:
    root: str
    dest: Path
    size: int
    chunks_total: int
    chunks_present: int = 0    # already done by an earlier, interrupted fetch: not sent again
    chunks_fetched: int = 0    # verified and written by this fetch
    chunks_refetched: int = 0  # chunks this fetch had to read more than once
    chunks_repaired: int = 0   # chunks of an earlier fetch found corrupt on disk, fetched again
    sources: dict[str, SourceReport] = field(default_factory=dict)

    @property
    def bytes_by_source(self) -> dict[str, int]:
        return {name: report.bytes for name, report in self.sources.items()}

    @property
    def bad_sources(self) -> dict[str, int]:
        """Sources that served bad bytes, with how many bad chunks (0: a bad manifest)."""
        return {name: report.bad_chunks for name, report in self.sources.items()
                if report.bad_chunks or report.bad_manifest}

    @property
    def dropped(self) -> list[str]:
        return [name for name, report in self.sources.items() if report.dropped]


class BlobFetchError(RuntimeError):
    """The blob could not be fetched; `missing` lists the chunks no source delivered, and the
    `.part` state stays for a later fetch to resume."""

    def __init__(self, message: str, root: str, missing: list[int],
                 result: FetchResult | None) -> None:
        super().__init__(message)
        self.root = root
        self.missing = missing
        self.result = result


class UnknownBlobError(BlobFetchError):
    """No source has a valid manifest for the root."""


class _BadChunk(Exception):
    pass


def fetch_blob(root: str, dest: str | Path, sources: Sequence[ChunkSource], *,
               max_workers: int = 8, per_source: int = 4, read_timeout: float = 60.0,
               max_failures: int = 3, max_bad_chunks: int = 1,
               verify_whole: bool = False) -> FetchResult:
    """Fetch blob `root` into the local file `dest`, resuming any earlier partial fetch.

    Every chunk is checked against its sha256 in the manifest, and the manifest against its
    root, which covers every field: so the file is the blob the root names. `verify_whole`
    also hashes the finished file against the manifest's whole-file sha256 (a second pass
    over every byte), which only catches a publisher whose manifest contradicts itself.

    `max_workers` bounds the reads in flight, `per_source` those on one source; a source is
    dropped after `max_failures` failures in a row or `max_bad_chunks` bad chunks, and is
    asked for one chunk at most `max_failures` times.
    """
    if not is_root(root):
        raise InputError(str(root), "not a blob root (64 lowercase hex digits)")
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"chunk sources need distinct names, got {names}")
    dest = Path(dest)
    reports = {source.name: SourceReport(source.name) for source in sources}
    manifest, holders = _find_manifest(root, sources, reports, read_timeout)
    partial = PartialBlob(dest, manifest)
    try:
        result = FetchResult(root, dest, manifest.size, manifest.chunk_count,
                             chunks_present=partial.resumed, sources=reports)
        # Chunks recorded by an earlier fetch were verified then; the disk may have changed
        # them since. Chunks fetched now are verified in memory before they are written.
        if corrupt := partial.corrupt_chunks():
            partial.forget(corrupt)
            result.chunks_repaired = len(corrupt)
        fetcher = _Fetcher(partial, holders, reports, result, max_workers=max_workers,
                           per_source=per_source, read_timeout=read_timeout,
                           max_failures=max_failures, max_bad_chunks=max_bad_chunks)
        fetcher.run(partial.missing())
        if verify_whole and partial.whole_sha256() != manifest.sha256:
            partial.discard()
            raise BlobFetchError(f"blob {root}: every chunk verifies but the whole file's "
                                 "sha256 does not match the manifest's (an inconsistent "
                                 "manifest from its publisher)", root, [], result)
        partial.commit()
        return result
    finally:
        partial.close()


def _start(call: Callable[[], Any], answers: queue.Queue, token: Any) -> None:
    # Daemon threads: a read hung in a dead peer's socket must not keep the process alive.
    def run() -> None:
        try:
            answers.put((token, True, call()))
        except BaseException as err:  # any failure is the source's answer, not ours
            answers.put((token, False, err))

    threading.Thread(target=run, name="blob-read", daemon=True).start()


def _find_manifest(root: str, sources: Sequence[ChunkSource], reports: dict[str, SourceReport],
                   timeout: float) -> tuple[BlobManifest, list[ChunkSource]]:
    """Ask every source at once; keep those whose manifest is the one of `root`."""
    answers: queue.Queue = queue.Queue()
    for source in sources:
        _start(lambda source=source: source.manifest(root), answers, source.name)
    deadline = time.monotonic() + timeout
    pending = {source.name for source in sources}
    found: dict[str, BlobManifest] = {}
    while pending:
        try:
            name, ok, value = answers.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        pending.discard(name)
        report = reports[name]
        if not ok:
            report.failures += 1
            report.bad_manifest = isinstance(value, ManifestError)
            report.last_error = f"manifest: {type(value).__name__}: {value}"
        elif value is None:
            continue
        elif not isinstance(value, BlobManifest) or value.root != root:
            report.bad_manifest = True
            report.last_error = f"manifest: answered with a manifest of another blob ({value!r})"
        else:
            report.has_blob = True
            found[name] = value
    for name in pending:
        reports[name].failures += 1
        reports[name].last_error = f"manifest: no answer in {timeout:g}s"
    if not found:
        told = "; ".join(f"{r.name}: {r.last_error}" for r in reports.values() if r.last_error)
        raise UnknownBlobError(f"blob {root}: no source has it (asked {len(sources)}: "
                               f"{', '.join(reports) or 'none'})" + (f"; {told}" if told else ""),
                               root, [], None)
    holders = [source for source in sources if source.name in found]
    return found[holders[0].name], holders


class _Fetcher:
    """The scheduler: runs in the caller's thread, hands reads to daemon threads, and alone
    writes to the partial blob, so the `.part` and its bitfield have a single writer."""

    def __init__(self, partial: PartialBlob, sources: list[ChunkSource],
                 reports: dict[str, SourceReport], result: FetchResult, *, max_workers: int,
                 per_source: int, read_timeout: float, max_failures: int,
                 max_bad_chunks: int) -> None:
        self.partial, self.manifest = partial, partial.manifest
        self.sources, self.reports, self.result = sources, reports, result
        self.max_workers, self.per_source = max(1, max_workers), max(1, per_source)
        self.read_timeout = read_timeout
        self.max_failures, self.max_bad_chunks = max(1, max_failures), max(1, max_bad_chunks)
        self.answers: queue.Queue = queue.Queue()
        self.busy = {source.name: 0 for source in sources}      # reads in flight per source
        self.assigned = {source.name: 0 for source in sources}  # reads ever given
        # (chunk, source) -> failed reads; bounds how often one source is asked for a chunk.
        self.failed: dict[tuple[int, str], int] = {}
        self.reads: dict[int, int] = {}
        self.tokens = iter(range(1 << 62))

    def run(self, chunks: list[int]) -> None:
        pending = deque(chunks)
        inflight: dict[int, tuple[int, ChunkSource, float]] = {}
        given_up: set[int] = set()
        while True:
            self._schedule(pending, inflight, given_up)
            if not inflight:
                break
            token, ok, value = self._next_answer(inflight, pending)
            if token is None:
                continue
            chunk, source, _ = inflight.pop(token)
            self.busy[source.name] -= 1
            if ok:
                self._accept(chunk, source, value)
            else:
                self._fail(chunk, source, value)
                pending.append(chunk)
        if given_up:
            self._raise_missing(sorted(given_up))

    def _schedule(self, pending: deque, inflight: dict, given_up: set[int]) -> None:
        deferred = []
        while pending and len(inflight) < self.max_workers:
            chunk = pending.popleft()
            live = [s for s in self.sources if not self.reports[s.name].dropped
                    and self.failed.get((chunk, s.name), 0) < self.max_failures]
            if not live:
                given_up.add(chunk)
                continue
            free = [s for s in live if self.busy[s.name] < self.per_source]
            if not free:
                deferred.append(chunk)
                continue
            # A source that has not failed this chunk first, then the least loaded one.
            source = min(free, key=lambda s: (self.failed.get((chunk, s.name), 0),
                                              self.busy[s.name], self.assigned[s.name]))
            self._read(chunk, source, inflight)
        pending.extendleft(reversed(deferred))

    def _read(self, chunk: int, source: ChunkSource, inflight: dict) -> None:
        offset, length = self.manifest.span(chunk)
        expected, root = self.manifest.chunks[chunk], self.manifest.root

        def read_and_verify() -> bytes:
            data = source.read(root, offset, length)
            if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != length:
                size = len(data) if hasattr(data, "__len__") else type(data).__name__
                raise _BadChunk(f"chunk {chunk}: {size} bytes, expected {length}")
            if hashlib.sha256(data).hexdigest() != expected:
                raise _BadChunk(f"chunk {chunk}: sha256 does not match the manifest")
            return data

        token = next(self.tokens)
        inflight[token] = (chunk, source, time.monotonic() + self.read_timeout)
        self.busy[source.name] += 1
        self.assigned[source.name] += 1
        self.reads[chunk] = self.reads.get(chunk, 0) + 1
        if self.reads[chunk] == 2:
            self.result.chunks_refetched += 1
        _start(read_and_verify, self.answers, token)

    def _next_answer(self, inflight: dict, pending: deque) -> tuple[Any, bool, Any]:
        """The next answer of a read still in flight; on a deadline, fail the overdue reads
        (their late answers are ignored) and return no token."""
        while True:
            wait = min(deadline for _, _, deadline in inflight.values()) - time.monotonic()
            try:
                token, ok, value = self.answers.get(timeout=max(0.0, wait))
            except queue.Empty:
                now = time.monotonic()
                for token in [t for t, (_, _, d) in inflight.items() if d <= now]:
                    chunk, source, _ = inflight.pop(token)
                    self.busy[source.name] -= 1
                    self._fail(chunk, source,
                               TimeoutError(f"read of chunk {chunk} gave no answer in "
                                            f"{self.read_timeout:g}s"))
                    pending.append(chunk)
                return None, False, None
            if token in inflight:
                return token, ok, value

    def _accept(self, chunk: int, source: ChunkSource, data: bytes) -> None:
        self.partial.write_chunk(chunk, data)
        report = self.reports[source.name]
        report.chunks += 1
        report.bytes += len(data)
        report._in_a_row = 0
        self.result.chunks_fetched += 1

    def _fail(self, chunk: int, source: ChunkSource, error: BaseException) -> None:
        report = self.reports[source.name]
        self.failed[(chunk, source.name)] = self.failed.get((chunk, source.name), 0) + 1
        report.last_error = f"{type(error).__name__}: {error}"
        if isinstance(error, _BadChunk):
            report.bad_chunks += 1
            report.last_error = f"bad bytes: {error}"
        else:
            report.failures += 1
        report._in_a_row += 1
        if report._in_a_row >= self.max_failures or report.bad_chunks >= self.max_bad_chunks:
            report.dropped = True

    def _raise_missing(self, missing: list[int]) -> None:
        told = "; ".join(f"{r.name}: {r.last_error}" + (" (dropped)" if r.dropped else "")
                         for r in self.reports.values() if r.has_blob and r.last_error)
        raise BlobFetchError(
            f"blob {self.manifest.root}: {len(missing)} of {self.manifest.chunk_count} chunks "
            f"could not be fetched from any source (chunks {_ranges(missing)}); "
            f"{told or 'no source left'}; progress kept in {self.partial.part} for a resume",
            self.manifest.root, missing, self.result)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    spans: list[list[int]] = []
    for index in indices:
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
