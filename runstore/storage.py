"""Storage over fsspec: atomic writes, sha256, retries, and URL joining for any protocol.

Object stores fail transiently (throttling, dropped connections). Every operation here is
retried with exponential backoff before the error reaches the caller; a missing file is
an answer, not a failure, and is never retried.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from runstore.errors import InputError

log = logging.getLogger(__name__)
T = TypeVar("T")
# Attempts and first delay; the environment lets a deployment tune them for its store.
RETRY_ATTEMPTS = int(os.environ.get("ISLANDS_STORAGE_RETRIES", "5"))
RETRY_DELAY = float(os.environ.get("ISLANDS_STORAGE_RETRY_DELAY", "0.2"))


# Answers, not failures: never retried.
FINAL = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, InputError)
TRANSIENT = (OSError, TimeoutError, ConnectionError)
# Stores whose single PUT (or multipart upload) is atomic: a reader sees the whole object
# or none, so writes go straight to the final key. memory:// is one in-process dict.
REMOTE_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
OBJECT_STORES = (*REMOTE_STORES, "memory")


def backoff(name: str, attempt: int, err: BaseException) -> None:
    """Sleep before retry `attempt + 1`, or re-raise `err` when the attempts are spent."""
    if attempt >= RETRY_ATTEMPTS:
        raise err
    delay = RETRY_DELAY * 2 ** (attempt - 1)
    log.warning("storage %s failed (%s); retry %d/%d in %.1fs", name, err, attempt,
                RETRY_ATTEMPTS - 1, delay)
    time.sleep(delay)


# What each store's client raises when it finds no credentials, by class name (so that the
# clients need not be imported), and what a user can do about it.
MISSING_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError",
                       "DefaultCredentialsError", "CredentialRetrievalError")
CREDENTIALS_HELP = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), or "
          "AWS_PROFILE with ~/.aws/credentials, or run on a node with an instance role",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run "
          "`gcloud auth application-default login`, or run on a node with workload identity",
}
EXTRAS = {"s3": "pip install 'islands[s3]'", "s3a": "pip install 'islands[s3]'",
          "gs": "pip install 'islands[gcs]'", "gcs": "pip install 'islands[gcs]'",
          "az": "pip install adlfs", "abfs": "pip install adlfs", "abfss": "pip install adlfs"}


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def access_error(url: str, err: BaseException) -> InputError | None:
    """Missing credentials or a refused access as one line naming the remedy; None when
    `err` is neither (a transient failure, say)."""
    protocol = {"s3a": "s3", "gcs": "gs"}.get(_protocol(url), _protocol(url))
    if any(cls.__name__ in MISSING_CREDENTIALS for cls in type(err).__mro__):
        remedy = CREDENTIALS_HELP.get(protocol, "configure the store's credentials")
        return InputError(url, f"no credentials for {protocol}:// ({err}): {remedy}")
    if isinstance(err, PermissionError):
        if protocol == "file":
            return InputError(url, f"permission denied ({err})")
        return InputError(url, f"access denied ({err}): check the credentials' permissions "
                          "on this bucket and path")
    return None


def retried(operation: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(operation)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                return operation(*args, **kwargs)
            except FINAL:
                raise
            except Exception as err:
                # A refused access or missing credentials will not mend with retries.
                url = args[0] if args and isinstance(args[0], str) else ""
                refused = access_error(url, err)
                if refused is not None:
                    raise refused from None
                if not isinstance(err, TRANSIENT):
                    raise
                backoff(operation.__name__, attempt, err)
        raise AssertionError("unreachable")

    return wrapper


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    return any(name in OBJECT_STORES for name in protocols(fs))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    # An object store's listings cache would hide what other processes (the driver, the
    # workers, a second driver) wrote since this one last listed a folder.
    protocol = _protocol(url)
    options = {"use_listings_cache": False} if protocol in REMOTE_STORES else {}
    try:
        return url_to_fs(url, **options)
    except ImportError as err:
        hint = f": {EXTRAS[protocol]}" if protocol in EXTRAS else ""
        raise InputError(url, f"{protocol}:// needs a package that is not installed "
                         f"({err}){hint}") from None
    except ValueError as err:
        raise InputError(url, f"no fsspec filesystem for this URL ({err})") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@retried
def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


@retried
def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as handle:
        return handle.read()


@retried
def write_bytes(url: str, data: bytes) -> str:
    """Write atomically and return the sha256 of what was written: on an object store one
    PUT (or multipart upload) of the final key, which is atomic there, so a crash leaves
    no temporary object; elsewhere a temporary name in the same folder, then a move."""
    fs, path = filesystem(url)
    if is_object_store(fs):
        fs.pipe_file(path, data)
        return sha256_bytes(data)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}" if parent else f".tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    fs.mv(tmp, path)
    return sha256_bytes(data)


@retried
def put_file(local: str | os.PathLike[str], url: str) -> str:
    """Copy a local file to `url` in blocks, never whole in memory, as atomically as
    `write_bytes`; return its sha256."""
    fs, path = filesystem(url)
    digest = hashlib.sha256()
    if is_object_store(fs):
        with open(local, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        fs.put_file(os.fspath(local), path)   # one PUT or a multipart upload: atomic
        return digest.hexdigest()
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}" if parent else f".tmp-{uuid.uuid4().hex}"
    with open(local, "rb") as source, fs.open(tmp, "wb") as handle:
        while block := source.read(1 << 22):
            digest.update(block)
            handle.write(block)
    fs.mv(tmp, path)
    return digest.hexdigest()


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url).decode("utf-8"))


def write_json(url: str, obj: Any) -> str:
    return write_bytes(url, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def sha256_file(url: str) -> str:
    return sha256_bytes(read_bytes(url))


@retried
def listdir(url: str) -> list[str]:
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


@retried
def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def parquet_bytes(table: Any) -> bytes:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def read_parquet(url: str, columns: list[str] | None = None) -> Any:
    """A Parquet file, or every `*.parquet` file under a folder (hive folders included), as
    one table. Bytes come through the retried reads above; a file that is not Parquet is
    an InputError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = filesystem(url)
    if not exists(url):
        raise InputError(url, "does not exist")
    files = [url]
    if isdir(fs, path):
        protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
        files = [protocol + found for found in sorted(find(fs, path))
                 if found.endswith(".parquet")]
        if not files:
            raise InputError(url, "folder holds no .parquet files")
    tables = []
    for file_url in files:
        try:
            tables.append(pq.read_table(io.BytesIO(read_bytes(file_url)), columns=columns))
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as err:
            raise InputError(file_url, f"not a readable Parquet file ({err})") from None
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as err:
        raise InputError(url, f"Parquet files disagree on their schema ({err})") from None


@retried
def isdir(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return fs.isdir(path)


@retried
def find(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    return fs.find(path)


@retried
def open_write(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """A file opened for a streamed write (a shard written a row group at a time)."""
    return fs.open(path, "wb")


@retried
def move(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    fs.mv(source, target)
