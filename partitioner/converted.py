"""Folders and globs of image files, and JSONL / text files, converted once to Parquet under
`<storage>/.datasets/`, so that the partition stage reads every source as Parquet.

The file name is a fingerprint of the file list (paths, sizes, modification stamps, labels)
and of the conversion's own settings: re-running finds it and converts nothing; a changed,
added or removed file gives a new one. Images are stored as their encoded bytes (decoding,
colour and size fixes happen when the stage reads them), so one conversion serves any
`data.channels` or `data.image_size`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from partitioner.source_files import IMAGE_FILE, TXT, SourceListing
from runstore import storage
from runstore.errors import InputError

FORMAT = 1  # bumped when what a conversion writes changes
IMAGE_CHUNK = 256  # files per row group
TEXT_CHUNK = 4096  # texts per row group
IMAGE_COLUMN, LABEL_COLUMN, TEXT_COLUMN = "image", "label", "text"


def fingerprint(listing: SourceListing, settings: str) -> str:
    digest = hashlib.sha256(f"{FORMAT}\n{listing.kind}\n{settings}\n".encode())
    for file in listing.files:
        digest.update(f"{listing.url(file)}\t{file.size}\t{file.stamp}\t{file.label}\n"
                      .encode())
    return digest.hexdigest()[:24]


def _write(url: str, tables: Iterator[pa.Table]) -> None:
    """Stream tables into one Parquet file at `url`: a temporary name moved into place, or
    one upload of the final key on an object store, so a partial file is never found."""
    fs, path = storage.filesystem(url)
    target = path
    if not storage.is_object_store(fs):
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        path = f"{parent}/.tmp-{uuid.uuid4().hex}"
    writer: pq.ParquetWriter | None = None
    try:
        with fs.open(path, "wb") as handle:
            for table in tables:
                if writer is None:
                    writer = pq.ParquetWriter(handle, table.schema)
                writer.write_table(table)
            assert writer is not None, "a conversion writes at least one table"
            writer.close()
    except BaseException:
        if path != target and fs.exists(path):
            fs.rm(path)
        raise
    if path != target:
        fs.mv(path, target)


def _read(listing: SourceListing, path: str) -> bytes:
    fs, _ = storage.filesystem(listing.source)
    try:
        with fs.open(path, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise InputError(listing.protocol + path, f"not readable ({err})") from None


def _image_tables(listing: SourceListing) -> Iterator[pa.Table]:
    labelled = listing.labelled
    for start in range(0, len(listing.files), IMAGE_CHUNK):
        files = listing.files[start:start + IMAGE_CHUNK]
        columns = {IMAGE_COLUMN: pa.array([_read(listing, f.path) for f in files], pa.binary()),
                   "path": pa.array([f.path.rsplit("/", 1)[-1] for f in files], pa.string())}
        if labelled:
            columns[LABEL_COLUMN] = pa.array([f.label for f in files], pa.string())
        yield pa.table(columns)


def _texts(listing: SourceListing, field: str, unit: str) -> Iterator[str | None]:
    for file in listing.files:
        url = listing.url(file)
        content = _read(listing, file.path).decode("utf-8", errors="replace")
        if file.kind == TXT:
            if unit == "file":
                yield content
            else:
                yield from content.splitlines()
            continue
        seen = False
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{url} line {number}", f"not valid JSON ({err.msg}); "
                                 "expected one JSON object per line") from None
            if not isinstance(record, dict):
                raise InputError(f"{url} line {number}", "expected a JSON object with a "
                                 f"{field!r} field")
            seen = seen or field in record
            value = record.get(field)
            yield value if isinstance(value, str) else None  # counted as dropped later
        if not seen:
            raise InputError("data.text_column", f"no line of {url} has a {field!r} field")


def _text_tables(listing: SourceListing, field: str, unit: str) -> Iterator[pa.Table]:
    chunk: list[str | None] = []
    for text in _texts(listing, field, unit):
        chunk.append(text)
        if len(chunk) == TEXT_CHUNK:
            yield pa.table({TEXT_COLUMN: pa.array(chunk, pa.string())})
            chunk = []
    if chunk or not listing.files:
        yield pa.table({TEXT_COLUMN: pa.array(chunk, pa.string())})


def converted_url(listing: SourceListing, storage_url: str, text_column: str = TEXT_COLUMN,
                  text_unit: str = "line") -> str:
    """The Parquet URL holding `listing`'s rows, converting it the first time."""
    if listing.kind == IMAGE_FILE:
        settings, tables = "", lambda: _image_tables(listing)
    else:
        settings = json.dumps([text_column, text_unit])
        tables = lambda: _text_tables(listing, text_column, text_unit)  # noqa: E731
    name = f"{listing.kind}-{fingerprint(listing, settings)}.parquet"
    url = storage.join(storage_url, ".datasets", name)
    if not storage.exists(url):
        _write(url, tables())
    return url

