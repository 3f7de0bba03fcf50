"""Shard files: the format the partitioner writes and the worker reads (raw uint8 pixels)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout


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
# cluster counts (a monolith, say) see the same rows in the same order.


def read_image_split(layout: RunLayout, clusters: int,
                     split: str) -> tuple[ImageTable, np.ndarray]:
    """Every cluster's images of `split` ("train" or "heldout"), and each row's cluster."""
    shards = [read_image_shard(layout.shard(cluster, split)) for cluster in range(clusters)]
    row_ids = np.concatenate([shard.row_ids for shard in shards])
    order = row_ids.argsort()
    cluster = np.concatenate([np.full(len(shard.images), k, dtype=np.int64)
                              for k, shard in enumerate(shards)])
    labels = None
    if all(shard.labels is not None for shard in shards):
        labels = np.concatenate([shard.labels for shard in shards]).astype(np.int64)[order]
    images = np.concatenate([shard.images for shard in shards])[order]
    return ImageTable(images, labels, row_ids[order]), cluster[order]


def read_text_split(layout: RunLayout, clusters: int,
                    split: str) -> tuple[list[str], np.ndarray]:
    """Every cluster's texts of `split`, and each text's cluster."""
    shards = [read_text_shard(layout.shard(cluster, split)) for cluster in range(clusters)]
    row_ids = np.concatenate([shard.column("row_id").to_numpy() for shard in shards])
    texts = [text for shard in shards for text in shard.column("text").to_pylist()]
    cluster = np.concatenate([np.full(shard.num_rows, k, dtype=np.int64)
                              for k, shard in enumerate(shards)])
    order = row_ids.argsort()
    return [texts[i] for i in order], cluster[order]
