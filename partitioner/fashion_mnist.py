"""Fashion-MNIST from Debian's package dataset-fashion-mnist: gzipped IDX files (a magic
number naming the element type and rank, big-endian dimensions, raw bytes), read with
numpy; nothing in them is executed or unpickled."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from runstore.errors import InputError

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_SPLITS = ("train", "test")  # the first is the default
_FILE_PREFIX = {"train": "train", "test": "t10k"}
_UBYTE = 0x08  # the IDX type code of unsigned bytes


def read_idx(path: Path, rank: int) -> np.ndarray:
    """The uint8 array of a gzipped IDX file of `rank` dimensions, its header checked."""
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as err:
        raise InputError(str(path), f"expected a gzipped IDX file ({err})") from None
    if len(data) < 4 + 4 * rank:
        raise InputError(str(path), "expected an IDX file; it is shorter than its header")
    zeros, kind, held_rank = data[0:2], data[2], data[3]
    if zeros != b"\0\0" or kind != _UBYTE or held_rank != rank:
        raise InputError(str(path), f"expected an IDX file of unsigned bytes in {rank} "
                         f"dimension(s); its header reads {data[:4].hex()}")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=rank, offset=4))
    body = memoryview(data)[4 + 4 * rank:]
    if len(body) != int(np.prod(shape)):
        raise InputError(str(path), f"header says {shape} = {int(np.prod(shape)):,} bytes "
                         f"but {len(body):,} follow")
    return np.frombuffer(body, np.uint8).reshape(shape)


def split_files(split: str, root: Path | None = None) -> tuple[Path, Path]:
    """The split's (images, labels) files; absent ones are bad input naming the package."""
    root = FASHION_MNIST_ROOT if root is None else root  # read at call time: tests move it
    prefix = _FILE_PREFIX[split]
    images_file = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_file = root / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [file.name for file in (images_file, labels_file) if not file.is_file()]
    if missing:
        raise InputError("data.source", f"builtin:fashion-mnist needs the Debian package "
                         f"{FASHION_MNIST_PACKAGE} (sudo apt-get install "
                         f"{FASHION_MNIST_PACKAGE}): {', '.join(missing)} not found in "
                         f"{root}")
    return images_file, labels_file


def read_fashion_mnist(split: str, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, 28, 28] images, int64 [n] labels 0-9) of the split."""
    images_file, labels_file = split_files(split, root)
    images, labels = read_idx(images_file, 3), read_idx(labels_file, 1)
    if len(images) != len(labels):
        raise InputError(str(labels_file), f"expected {len(images):,} labels, one per image "
                         f"of {images_file.name}; it holds {len(labels):,}")
    return images, labels.astype(np.int64)
