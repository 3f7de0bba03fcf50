"""Compare-and-swap on one small object, per store: what the run lease and the fenced
manifest stand on.

`read` returns an object's bytes and its version; `create` writes only where nothing is;
`replace` writes only while the object is still at the version the caller read. The loser
of a race gets `CasConflict`. Versions are opaque strings:

- local disks: the content's sha256. Both writes happen under an exclusive `flock` of a
  sidecar `.<name>.lock` (held for the microseconds of a compare and a rename, released
  by the kernel if its holder dies); `create` publishes a finished temporary file with
  `os.link`, which fails when the name exists. Callers make every write's content unique
  (the lease's owner and renewal time, the manifest's epoch), so a sha256 never returns.
- s3://: the ETag, through conditional PUTs (`If-None-Match: *` to create, `If-Match` to
  replace), which S3 checks atomically.
- memory://: the sha256, under one lock of this process (tests).

Any other store (gs:// included, for now) is refused with an InputError: a read, then an
unconditional write, would let two drivers both believe they won.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from runstore import storage
from runstore.errors import InputError

LOCK_WAIT = 10.0  # seconds; the lock is held for microseconds unless its holder is stopped
S3_CONFLICTS = ("PreconditionFailed", "ConditionalRequestConflict")


class CasConflict(Exception):
    """Another writer changed (or created) the object first."""


@dataclass(frozen=True)
class Versioned:
    data: bytes
    version: str


def read(url: str) -> Versioned | None:
    """The object and its version, or None when there is none."""
    fs, path = storage.filesystem(url)
    backend = _backend(fs, url)
    for attempt in range(1, storage.RETRY_ATTEMPTS + 1):
        try:
            return backend.read(fs, path)
        except storage.FINAL:
            raise
        except storage.TRANSIENT as err:
            storage.backoff("cas read", attempt, err)
    raise AssertionError("unreachable")


def create(url: str, data: bytes) -> str:
    """Write `data` only if the object does not exist; its version."""
    return _write(url, data, None)


def replace(url: str, data: bytes, version: str) -> str:
    """Write `data` only if the object is still at `version`; its new version."""
    return _write(url, data, version)


def _write(url: str, data: bytes, expected: str | None) -> str:
    fs, path = storage.filesystem(url)
    backend = _backend(fs, url)
    uncertain = False  # a failed try may have been written, its answer lost
    for attempt in range(1, storage.RETRY_ATTEMPTS + 1):
        try:
            return backend.write(fs, path, data, expected)
        except CasConflict:
            if uncertain and (now := backend.read(fs, path)) is not None and now.data == data:
                return now.version  # it was our own earlier try
            raise
        except storage.FINAL:
            raise
        except storage.TRANSIENT as err:
            uncertain = True
            storage.backoff("cas write", attempt, err)
    raise AssertionError("unreachable")


class _Local:
    @staticmethod
    def read(fs: Any, path: str) -> Versioned | None:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        return Versioned(data, storage.sha256_bytes(data))

    @classmethod
    def write(cls, fs: Any, path: str, data: bytes, expected: str | None) -> str:
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        temp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}")
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            with _locked(path):
                if expected is None:
                    try:
                        os.link(temp, path)
                    except FileExistsError:
                        raise CasConflict(path) from None
                else:
                    current = cls.read(fs, path)
                    if current is None or current.version != expected:
                        raise CasConflict(path)
                    os.replace(temp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        return storage.sha256_bytes(data)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    parent, name = os.path.split(path)
    fd = os.open(os.path.join(parent, f".{name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path}: its lock has been held for over "
                                       f"{LOCK_WAIT:.0f} s (by a stopped process?)") from None
                time.sleep(0.005)
            except OSError as err:
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise InputError(path, "this file system has no file locks, which the "
                                     "run lease needs; use a local disk or s3://") from None
                raise
        yield
    finally:
        os.close(fd)  # releases the lock


class _Memory:
    lock = threading.Lock()

    @staticmethod
    def read(fs: Any, path: str) -> Versioned | None:
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            return None
        return Versioned(data, storage.sha256_bytes(data))

    @classmethod
    def write(cls, fs: Any, path: str, data: bytes, expected: str | None) -> str:
        with cls.lock:
            current = cls.read(fs, path)
            if (current.version if current else None) != expected:
                raise CasConflict(path)
            fs.pipe_file(path, data)
        return storage.sha256_bytes(data)


class _S3:
    @staticmethod
    def read(fs: Any, path: str) -> Versioned | None:
        from fsspec.asyn import sync

        bucket, key, _ = fs.split_path(path)

        async def get() -> Versioned | None:
            try:
                response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return None
            body = response["Body"]
            try:
                return Versioned(await body.read(), response["ETag"])
            finally:
                body.close()

        return sync(fs.loop, get)

    @staticmethod
    def write(fs: Any, path: str, data: bytes, expected: str | None) -> str:
        bucket, key, _ = fs.split_path(path)
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            response = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except (FileExistsError, FileNotFoundError):  # created meanwhile; or gone
            raise CasConflict(path) from None
        except OSError as err:
            answer = getattr(err.__cause__, "response", None) or {}
            if answer.get("Error", {}).get("Code") in S3_CONFLICTS:
                raise CasConflict(path) from None
            raise
        finally:
            fs.invalidate_cache(path)
        return str(response["ETag"])


def _backend(fs: fsspec.AbstractFileSystem, url: str) -> Any:
    if isinstance(fs, LocalFileSystem):
        return _Local
    names = storage.protocols(fs)
    if "memory" in names:
        return _Memory
    if "s3" in names or "s3a" in names:
        return _S3
    raise InputError(url, f"no compare-and-swap on {names[0]}:// in islands yet, and the run "
                     "lease needs one so that two drivers never run the same run; use a "
                     "local disk or s3://")
