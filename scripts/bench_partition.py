"""Benchmark the partitioner's streaming k-means against faiss-cpu and scikit-learn.

    python scripts/bench_partition.py [--rows 1000000] [--streamed-rows 10000000] [--dim 64]
        [--k 16] [--iters 20] [--sample-rows 131072] [--threads N] [--json out.json]

Data: a seeded Gaussian mixture (k true components, float32). In memory: `--rows` rows.
Streamed: `--streamed-rows` rows written to Parquet files of `--rows` rows each (row groups
of 65,536) in a temporary folder, chunk by chunk; the first file holds the in-memory rows.

Every measured method runs in a fresh subprocess, so peak RSS (ru_maxrss of that process,
read when the method ends, data included) is its own. Time is wall clock of fit + assigning
every row (loading included for methods that need the data in memory); inertia is the sum
over all rows of the squared distance to the nearest of the method's centroids, computed by
the same code for every method, outside the timing.

  in memory, --rows rows:
    faiss           faiss.Kmeans on all rows (no subsampling), then index.search for labels
    faiss-default   faiss.Kmeans as shipped: trains on 256 x k sampled rows
    sklearn-mbk     MiniBatchKMeans(max_iter=iters, batch_size=4096), then predict
    islands         fit on --sample-rows sampled rows, assign all (partitioner.centroids)
    islands-all     the same fit on all rows: same data and iterations as faiss
    islands-hier    hierarchical: 8 x k fine centroids on the sample, grouped into k
  streamed from Parquet, --rows and --streamed-rows rows:
    islands         kmeans_parquet: sample pass + assignment pass, ids written to Parquet
    faiss           (streamed rows only) the files loaded into one array, then as above
    sklearn-mbk     (streamed rows only) partial_fit over 65,536-row batches, --mbk-epochs
                    passes (default 1), then predict

Ratios are against faiss on the same rows. Prints a table, then JSON (also to --json).
--threads sets OMP/OpenBLAS/faiss threads of every worker; on a shared or loaded machine
use --threads 1: spin-waiting OpenMP threads (faiss, scikit-learn) slow down many-fold when
the cores are oversubscribed, and cpu s is then the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BLOCK = 1 << 16  # rows generated per seeded block; also the Parquet row group
GIB = 1 << 30


# ---------------------------------------------------------------- data

def mixture(seed: int, dim: int, components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 0.6, (components, dim)).astype(np.float32)
    weights = rng.dirichlet(np.full(components, 5.0))
    scales = rng.uniform(0.7, 1.3, components).astype(np.float32)
    return centers, weights, scales


def rows_at(seed: int, dim: int, components: int, start: int, count: int) -> np.ndarray:
    """Rows [start, start + count) of the endless seeded mixture: each 65,536-row block
    has its own generator, so any slice is the same whatever reads it."""
    centers, weights, scales = mixture(seed, dim, components)
    out = np.empty((count, dim), np.float32)
    block, filled = start // BLOCK, 0
    while filled < count:
        rng = np.random.default_rng([seed, block])
        labels = rng.choice(components, BLOCK, p=weights)
        data = rng.standard_normal((BLOCK, dim), dtype=np.float32)
        data *= scales[labels, None]
        data += centers[labels]
        lo = max(start, block * BLOCK) - block * BLOCK
        take = min(BLOCK - lo, count - filled)
        out[filled:filled + take] = data[lo:lo + take]
        filled, block = filled + take, block + 1
    return out


def write_parquet(folder: Path, args: argparse.Namespace) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index, start in enumerate(range(0, args.streamed_rows, args.rows)):
        path = folder / f"part-{index:05d}.parquet"
        count = min(args.rows, args.streamed_rows - start)
        schema = pa.schema([("x", pa.list_(pa.float32(), args.dim))])
        with pq.ParquetWriter(path, schema) as writer:
            for offset in range(0, count, BLOCK):
                chunk = rows_at(args.seed, args.dim, args.k, start + offset,
                                min(BLOCK, count - offset))
                vectors = pa.FixedSizeListArray.from_arrays(pa.array(chunk.ravel()), args.dim)
                writer.write_table(pa.table({"x": vectors}, schema=schema),
                                   row_group_size=BLOCK)
        files.append(path)
    return files


def parquet_batches(folder: str, batch_rows: int = BLOCK):
    from partitioner.parquet_rows import Features, open_parquet

    source = open_parquet(folder)
    features = Features("x")
    for unit in source.units:
        for batch in source.read(unit, ["x"], batch_rows):
            yield features(batch, source.urls[unit.file])


# ---------------------------------------------------------------- methods (in a worker)

def inertia_of(centroids: np.ndarray, chunks) -> float:
    from partitioner.kmeans import nearest_sq

    total = 0.0
    for chunk in chunks:
        for start in range(0, len(chunk), BLOCK):
            total += float(nearest_sq(chunk[start:start + BLOCK], centroids)[1]
                           .sum(dtype=np.float64))
    return total


def faiss_fit_assign(x: np.ndarray, job: dict[str, Any], subsample: bool) -> np.ndarray:
    import faiss

    rows = len(x)
    km = faiss.Kmeans(x.shape[1], job["k"], niter=job["iters"], seed=job["seed"],
                      verbose=False, **({} if subsample else
                                        {"max_points_per_centroid": rows // job["k"] + 1}))
    km.train(x)
    km.index.search(x, 1)  # labels for every row
    return km.centroids


def islands_spec(job: dict[str, Any], **overrides: Any):
    from partitioner.centroids import KMeansSpec

    fields = dict(clusters=job["k"], iters=job["iters"], seed=job["seed"],
                  sample_rows=job["sample_rows"], backend=job["backend"], n_init=job["n_init"])
    return KMeansSpec(**{**fields, **overrides})


def islands_in_memory(x: np.ndarray, job: dict[str, Any], **overrides: Any) -> np.ndarray:
    from partitioner.centroids import fit_model
    from partitioner.parquet_rows import sample_indices

    spec = islands_spec(job, **overrides)
    sample = x[sample_indices(len(x), spec.sample_rows, spec.seed)]
    model = fit_model(sample, spec, population=len(x))
    model.assign(x)
    return model.centroids


def mbk_in_memory(x: np.ndarray, job: dict[str, Any]) -> np.ndarray:
    from sklearn.cluster import MiniBatchKMeans

    mbk = MiniBatchKMeans(job["k"], max_iter=job["iters"], batch_size=4096, n_init=1,
                          random_state=job["seed"]).fit(x)
    mbk.predict(x)
    return mbk.cluster_centers_.astype(np.float32)


def mbk_streamed(folder: str, job: dict[str, Any]) -> np.ndarray:
    from sklearn.cluster import MiniBatchKMeans

    mbk = MiniBatchKMeans(job["k"], n_init=1, random_state=job["seed"], batch_size=BLOCK)
    for _ in range(job["mbk_epochs"]):
        for chunk in parquet_batches(folder):
            mbk.partial_fit(chunk)
    for chunk in parquet_batches(folder):
        mbk.predict(chunk)
    return mbk.cluster_centers_.astype(np.float32)


def load_all(folder: str, rows: int, dim: int) -> np.ndarray:
    x = np.empty((rows, dim), np.float32)
    filled = 0
    for chunk in parquet_batches(folder):
        x[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
    return x


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One method on one data set, in this (fresh) process."""
    import faiss
    import sklearn.cluster  # noqa: F401  (imports stay outside the timing)

    import partitioner.streaming  # noqa: F401

    faiss.omp_set_num_threads(job["threads"])
    method, streamed = job["method"], job["folder"] is not None
    extra: dict[str, Any] = {}
    if not streamed:
        x = rows_at(job["seed"], job["dim"], job["k"], 0, job["rows"])
    start, cpu = time.perf_counter(), cpu_seconds()
    if streamed and method == "islands":
        from partitioner.streaming import kmeans_parquet

        result = kmeans_parquet(job["folder"], "x", islands_spec(job), out=job["out"],
                                return_clusters=False)
        centroids = result.model.centroids
        extra["own_inertia"] = result.assignment.inertia
    elif streamed and method == "faiss":
        x = load_all(job["folder"], job["rows"], job["dim"])
        extra["load_s"] = time.perf_counter() - start
        centroids = faiss_fit_assign(x, job, subsample=False)
    elif streamed and method == "sklearn-mbk":
        centroids = mbk_streamed(job["folder"], job)
    elif method in ("faiss", "faiss-default"):
        centroids = faiss_fit_assign(x, job, subsample=method == "faiss-default")
    elif method == "sklearn-mbk":
        centroids = mbk_in_memory(x, job)
    elif method == "islands":
        centroids = islands_in_memory(x, job)
    elif method == "islands-all":
        centroids = islands_in_memory(x, job, sample_rows=job["rows"])
    elif method == "islands-hier":
        centroids = islands_in_memory(x, job, fine_clusters=8 * job["k"])
    else:
        raise SystemExit(f"unknown method {method}")
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    chunks = parquet_batches(job["folder"]) if streamed else [x]
    return {"time_s": seconds, "cpu_s": cpu, "peak_rss": peak,
            "inertia": inertia_of(centroids, chunks), **extra}


# ---------------------------------------------------------------- driver

def measure(job: dict[str, Any], threads: int, timeout: float) -> dict[str, Any] | None:
    """The worker's result, or None when it ran past `timeout` seconds (it is killed)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                              env=env, capture_output=True, text=True, check=False,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{job['method']} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--streamed-rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sample-rows", type=int, default=131_072)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--n-init", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mbk-epochs", type=int, default=1,
                        help="passes of streamed sklearn-mbk partial_fit (--iters passes over "
                        "10M rows take ~15 min on 2 cores)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--methods", default="faiss,faiss-default,sklearn-mbk,islands,"
                        "islands-all,islands-hier",
                        help="in-memory methods to run (comma-separated)")
    parser.add_argument("--streamed-methods", default="islands,faiss,sklearn-mbk",
                        help="methods on the --streamed-rows files (islands also runs on "
                        "the --rows file for the RSS comparison); empty to skip")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the Parquet files go (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds one method may run before it is killed and reported "
                        "as timed out")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_job(json.loads(args.worker))), flush=True)
        return

    from rich.console import Console

    # A killed benchmark still removes its Parquet files (TemporaryDirectory's exit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    console = Console(width=150)  # the table stays whole when piped
    base = dict(dim=args.dim, k=args.k, iters=args.iters, seed=args.seed, threads=args.threads,
                sample_rows=args.sample_rows, backend=args.backend, n_init=args.n_init,
                mbk_epochs=args.mbk_epochs)
    results: list[dict[str, Any]] = []
    timed_out: list[str] = []

    def run(case: str, method: str, rows: int, folder: str | None = None,
            out: str | None = None) -> None:
        console.print(f"[dim]{case} {method} on {rows:,} rows ...[/dim]")
        job = {**base, "method": method, "rows": rows, "folder": folder, "out": out}
        measured = measure(job, args.threads, args.timeout)
        if measured is None:
            console.print(f"[red]{case} {method} ran past {args.timeout:.0f}s: left out[/red]")
            timed_out.append(f"{case} {method} {rows}")
        else:
            results.append({"case": case, "method": method, "rows": rows, **measured})

    for method in filter(None, args.methods.split(",")):
        run("in-memory", method, args.rows)
    streamed = list(filter(None, args.streamed_methods.split(",")))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if streamed:
            started = time.perf_counter()
            files = write_parquet(Path(tmp) / "big", args)
            small = Path(tmp) / "small"
            small.mkdir()
            os.link(files[0], small / files[0].name)  # the first --rows rows, no copy
            console.print(f"[dim]wrote {args.streamed_rows:,} rows in {len(files)} files in "
                          f"{time.perf_counter() - started:.0f}s[/dim]")
            if "islands" in streamed:
                run("streamed", "islands", args.rows, f"file://{small}", f"file://{tmp}/ids-s")
            for method in streamed:
                run("streamed", method, args.streamed_rows, f"file://{tmp}/big",
                    f"file://{tmp}/ids-b" if method == "islands" else None)
    report = summarize(results, args) | {"timed_out": timed_out}
    print_table(console, report, args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


def summarize(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    def find(case: str, method: str, rows: int) -> dict[str, Any] | None:
        return next((r for r in results if (r["case"], r["method"], r["rows"]) ==
                     (case, method, rows)), None)

    for result in results:
        reference = find(result["case"], "faiss", result["rows"])
        if reference:
            result["time_vs_faiss"] = result["time_s"] / reference["time_s"]
            result["cpu_vs_faiss"] = result["cpu_s"] / reference["cpu_s"]
            result["inertia_vs_faiss"] = result["inertia"] / reference["inertia"]
    targets: dict[str, Any] = {}
    ours, faiss_1m = find("in-memory", "islands", args.rows), find("in-memory", "faiss", args.rows)
    if ours and faiss_1m:
        targets["time_vs_faiss<=1.25"] = ours["time_vs_faiss"] <= 1.25
        targets["cpu_vs_faiss<=1.25"] = ours["cpu_vs_faiss"] <= 1.25
        targets["inertia_vs_faiss<=1.01"] = ours["inertia_vs_faiss"] <= 1.01
    small = find("streamed", "islands", args.rows)
    big = find("streamed", "islands", args.streamed_rows)
    rss_ratio = None
    if small and big:
        rss_ratio = big["peak_rss"] / small["peak_rss"]
        targets["rss_big<=2GiB"] = big["peak_rss"] <= 2 * GIB
        targets["rss_big/rss_small<=1.2"] = rss_ratio <= 1.2
    if big and "time_vs_faiss" in big:
        targets["streamed_time_vs_faiss<=1.25"] = big["time_vs_faiss"] <= 1.25
        targets["streamed_cpu_vs_faiss<=1.25"] = big["cpu_vs_faiss"] <= 1.25
        targets["streamed_inertia_vs_faiss<=1.01"] = big["inertia_vs_faiss"] <= 1.01
    return {"config": {k: v for k, v in vars(args).items() if k not in ("json", "worker")} |
            {"workdir": str(args.workdir), "cpus": os.cpu_count()},
            "results": results, "rss_streamed_big_vs_small": rss_ratio, "targets": targets}


def print_table(console: Any, report: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.table import Table

    table = Table(title=f"k-means, k={args.k}, dim={args.dim}, iters={args.iters}, "
                  f"islands sample={args.sample_rows:,}, threads={args.threads}")
    for column in ("case", "method", "rows", "wall s", "x faiss", "cpu s", "x faiss",
                   "inertia", "x faiss", "peak RSS MiB"):
        table.add_column(column, justify="left" if column in ("case", "method") else "right")
    for r in report["results"]:
        def ratio(key: str, digits: int, r: dict[str, Any] = r) -> str:
            return f"{r[key]:.{digits}f}" if key in r else ""

        table.add_row(r["case"], r["method"], f"{r['rows']:,}", f"{r['time_s']:.2f}",
                      ratio("time_vs_faiss", 2), f"{r['cpu_s']:.2f}", ratio("cpu_vs_faiss", 2),
                      f"{r['inertia']:.6g}", ratio("inertia_vs_faiss", 4),
                      f"{r['peak_rss'] / (1 << 20):.0f}")
    console.print(table)
    if report["rss_streamed_big_vs_small"] is not None:
        console.print(f"islands streamed peak RSS, {args.streamed_rows:,} vs {args.rows:,} rows: "
                      f"{report['rss_streamed_big_vs_small']:.3f}x")
    for name, met in report["targets"].items():
        console.print(f"target {name}: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
