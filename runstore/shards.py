"""Shard files: the format the partitioner writes and the worker reads (raw uint8 pixels)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from runstore.split_sample import (
    ReadCount,
    ShardFile,
    choose_rows,
    read_chosen,
    schema_of,
    split_urls,
)


@dataclass
class ImageTable:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray | None  # int64 [N]
    row_ids: np.ndarray | None = None  # int64 [N]: rows of the source dataset


def image_shard_table(images: np.ndarray, labels: np.ndarray | None,
                      row_ids: np.ndarray) -> pa.Table:
    """A shard stores raw uint8 pixels (fixed-size list) so experts skip PNG decoding."""
    _count, height, width, channels = images.shape
    flat = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1), pa.uint8()),
                                             height * width * channels)
    columns = {"pixels": flat, "row_id": pa.array(row_ids, pa.int64())}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
    return pa.table(columns).replace_schema_metadata({"shape": f"{height},{width},{channels}"})


def write_image_shard(url: str, images: np.ndarray, labels: np.ndarray | None,
                      row_ids: np.ndarray) -> str:
    return storage.write_bytes(url, storage.parquet_bytes(
        image_shard_table(images, labels, row_ids)))


def read_image_shard(url: str) -> ImageTable:
    data = storage.read_bytes(url)
    try:
        table = pq.read_table(io.BytesIO(data))
        height, width, channels = (int(v) for v in table.schema.metadata[b"shape"].split(b","))
    except (pa.ArrowInvalid, KeyError, TypeError, ValueError) as err:
        raise InputError(url, f"not a valid islands shard ({err})") from None
    pixels = table.column("pixels").combine_chunks().flatten().to_numpy()
    images = pixels.reshape(table.num_rows, height, width, channels)
    labels = table.column("label").to_numpy() if "label" in table.schema.names else None
    return ImageTable(images=images, labels=labels, row_ids=table.column("row_id").to_numpy())


def text_shard_table(texts: list[str], row_ids: np.ndarray,
                     extra: dict[str, list] | None = None) -> pa.Table:
    columns = {"text": pa.array(texts, pa.string()), "row_id": pa.array(row_ids, pa.int64())}
    for name, values in (extra or {}).items():
        columns[name] = pa.array(values)
    return pa.table(columns)


def write_text_shard(url: str, texts: list[str], row_ids: np.ndarray,
                     extra: dict[str, list] | None = None) -> str:
    return storage.write_bytes(url, storage.parquet_bytes(text_shard_table(texts, row_ids,
                                                                           extra)))


def read_text_shard(url: str) -> pa.Table:
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(url)))
    except pa.ArrowInvalid as err:
        raise InputError(url, f"not a valid islands shard ({err})") from None
    if "text" not in table.schema.names:
        raise InputError(url, "text shard has no 'text' column")
    return table


# A split is read across every cluster and ordered by dataset row, so that runs with other
# cluster counts (a monolith, say) see the same rows in the same order. `rows` caps it at a
# seeded sample (runstore/split_sample.py), read a row group at a time.


def _shape(schema: pa.Schema, url: str) -> tuple[int, int, int]:
    try:
        height, width, channels = (int(v) for v in schema.metadata[b"shape"].split(b","))
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(url, f"not a valid islands shard (no image shape: {err})") from None
    return height, width, channels


def read_image_split(layout: RunLayout, clusters: int, split: str, rows: int | None = None,
                     seed: int = 0, count: ReadCount | None = None) -> tuple[ImageTable,
                                                                              np.ndarray]:
    """Every cluster's images of `split` ("train" or "heldout"), or a seeded sample of at
    most `rows` of them, in dataset order; and each row's cluster."""
    urls = split_urls(layout, clusters, split)
    chosen = choose_rows(urls, rows, seed, count)
    schemas = [schema_of(url) for url in urls]
    shape = _shape(schemas[0], urls[0])
    labelled = all("label" in schema.names for schema in schemas)
    images = np.empty((len(chosen), *shape), np.uint8)
    labels = np.empty(len(chosen), np.int64) if labelled else None
    cluster = np.empty(len(chosen), np.int64)
    columns = ["pixels", *(["label"] if labelled else [])]
    for part in read_chosen(urls, chosen, columns, count):
        pixels = part.table.column("pixels").combine_chunks().flatten().to_numpy()
        images[part.at] = pixels.reshape(len(part.at), *shape)
        if labels is not None:
            labels[part.at] = part.table.column("label").to_numpy()
        cluster[part.at] = part.cluster
    return ImageTable(images, labels, chosen), cluster


def read_text_split(layout: RunLayout, clusters: int, split: str, rows: int | None = None,
                    seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Every cluster's texts of `split`, or a seeded sample of at most `rows`, in dataset
    order; and each text's cluster."""
    urls = split_urls(layout, clusters, split)
    chosen = choose_rows(urls, rows, seed)
    texts: list[str] = [""] * len(chosen)
    cluster = np.empty(len(chosen), np.int64)
    for part in read_chosen(urls, chosen, ["text"]):
        for at, text in zip(part.at.tolist(), part.table.column("text").to_pylist(),
                            strict=True):
            texts[at] = text
        cluster[part.at] = part.cluster
    return texts, cluster


def longest_text(layout: RunLayout, clusters: int, split: str) -> tuple[int, int]:
    """(UTF-8 bytes of the longest text, texts) of a split, read a row group at a time."""
    longest = total = 0
    for url in split_urls(layout, clusters, split):
        with ShardFile(url) as shard:
            for group in range(shard.groups):
                for table in shard.read(group, ["text"]):
                    lengths = pc.binary_length(pc.cast(table.column("text"), pa.binary()))
                    if len(lengths):
                        longest = max(longest, int(pc.max(lengths).as_py() or 0))
                    total += table.num_rows
    return longest, total


def read_shard_pixels(urls: list[str], count: ReadCount | None = None) -> np.ndarray:
    """uint8 [N, H, W, C]: the images of these shards in order, filled a row group at a
    time into one array (no float copy, no whole-file buffer)."""
    shards = [ShardFile(url, count) for url in urls]
    try:
        shape = _shape(shards[0].schema, urls[0])
        for shard in shards[1:]:
            if _shape(shard.schema, shard.url) != shape:
                raise InputError(shard.url, f"images of shape {_shape(shard.schema, shard.url)}"
                                 f"; expected {shape} like {urls[0]}")
        images = np.empty((sum(shard.rows for shard in shards), *shape), np.uint8)
        row = 0
        for shard in shards:
            for group in range(shard.groups):
                for table in shard.read(group, ["pixels"]):
                    pixels = table.column("pixels").combine_chunks()
                    part = pixels.flatten().to_numpy().reshape(len(pixels), *shape)
                    images[row:row + len(part)] = part
                    row += len(part)
        return images
    finally:
        for shard in shards:
            shard.__exit__()


def iter_shard_texts(urls: list[str], count: ReadCount | None = None) -> Iterator[list[str]]:
    """The texts of these shards in order, a row group at a time."""
    for url in urls:
        with ShardFile(url, count) as shard:
            for group in range(shard.groups):
                for table in shard.read(group, ["text"]):
                    yield table.column("text").to_pylist()
