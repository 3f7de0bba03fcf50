"""Peak memory of reading a partition's split: whole files (the reader before sampling
existed, still `read_image_shard`), the row-group reader with no cap, and the row-group
reader capped at a seeded sample (the image router's 100,000 rows).

    python scripts/bench_split_read.py [--rows 200000] [--cap 100000] [--side 28]
        [--json out.json]

Data: `--rows` random `--side` x `--side` uint8 images dealt to 2 clusters, written as the
partition writes shards (row groups of 32,768 rows) in a temporary folder by a subprocess.
Each reader runs in a fresh subprocess of a small parent, so its peak RSS (ru_maxrss, the
interpreter and libraries included; `imports` is that figure before the read) is its own.
Prints a table, then JSON (also to --json).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runstore.layout import RunLayout
from runstore.shards import image_shard_table

GROUP_ROWS = 32_768


def write_run(root: Path, rows: int, side: int) -> RunLayout:
    rng = np.random.default_rng(0)
    layout = RunLayout(f"file://{root}")
    cluster = rng.integers(0, 2, rows)
    for k in range(2):
        ids = np.flatnonzero(cluster == k)
        path = Path(layout.shard(k, "train").removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = None
        for start in range(0, len(ids), GROUP_ROWS):
            part = ids[start:start + GROUP_ROWS]
            table = image_shard_table(rng.integers(0, 256, (len(part), side, side, 1),
                                                   dtype=np.uint8),
                                      rng.integers(0, 10, len(part)), part)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
        assert writer is not None
        writer.close()
    return layout


def worker(job: dict) -> dict:
    from runstore.shards import read_image_shard, read_image_split

    layout = RunLayout(job["root"])
    imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if job["reader"] == "whole files":
        rows = sum(len(read_image_shard(layout.shard(k, "train")).images) for k in range(2))
    else:
        table, _ = read_image_split(layout, 2, "train", job["cap"], 0)
        rows = len(table.row_ids)
    return {"reader": job["reader"], "rows": rows,
            "seconds": round(time.perf_counter() - started, 2),
            "imports_mib": round(imports),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--cap", type=int, default=100_000)
    parser.add_argument("--side", type=int, default=28)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        if job["reader"] == "write":
            write_run(Path(job["root"]), args.rows, args.side)
            return
        print("RESULT " + json.dumps(worker(job)))
        return
    results = []
    with tempfile.TemporaryDirectory() as folder:
        # Written by a subprocess too: a child's ru_maxrss starts from its parent's at fork.
        layout = RunLayout(f"file://{folder}")
        subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--side",
                        str(args.side), "--worker", json.dumps({"root": folder,
                                                                "reader": "write"})],
                       check=True)
        for reader, cap in (("whole files", None), ("row groups, no cap", None),
                            (f"row groups, sample of {args.cap:,}", args.cap)):
            job = {"root": layout.root, "reader": reader, "cap": cap}
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                                  capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]
                                      .removeprefix("RESULT ")))
    data_mib = args.rows * args.side * args.side / 2**20
    print(f"{args.rows:,} images of {args.side}x{args.side} (uint8 pixels {data_mib:.0f} MiB)")
    print(f"{'reader':<32} {'rows':>9} {'s':>6} {'imports MiB':>12} {'peak RSS MiB':>13}")
    for row in results:
        print(f"{row['reader']:<32} {row['rows']:>9,} {row['seconds']:>6.2f} "
              f"{row['imports_mib']:>12} {row['peak_rss_mib']:>13}")
    out = {"rows": args.rows, "side": args.side, "cap": args.cap, "results": results}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
