import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.pipeline import partition_request
from orchestrator.state.config import parse_config
from partitioner.centroids import KMeansSpec, fit_model
from partitioner.row_split import HeldoutSplit
from partitioner.stage import run_partition
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from runstore.shards import read_image_shard
from tests.conftest import tiny_config

runner = CliRunner()


def partition(storage_url: str, run: str = "p", **sections):
    config = parse_config(tiny_config(storage_url, run=run, **sections))
    layout = RunLayout(storage.join(storage_url, run))
    return run_partition(partition_request(config), layout), layout, config


def test_same_seed_same_shards_on_memory_storage():
    first, layout_a, _ = partition("memory://part-a")
    second, layout_b, _ = partition("memory://part-b")
    stats_a, stats_b = (storage.read_json(lay.partition_stats) for lay in (layout_a, layout_b))
    assert stats_a.pop("source") != stats_b.pop("source")  # each storage has its own copy
    assert stats_a == stats_b
    del first["partition/stats.json"], second["partition/stats.json"]
    assert first == second  # every shard and centroid file hashes the same
    third, _, _ = partition("memory://part-c", seed=1)
    assert third != first


def test_shards_cover_every_row_once_and_match_stats(tmp_path):
    artifacts, layout, config = partition(f"file://{tmp_path}")
    stats = storage.read_json(layout.partition_stats)
    seen, heldout = [], []
    for split, sizes in (("train", stats["sizes"]), ("heldout", stats["heldout_sizes"])):
        for cluster, size in enumerate(sizes):
            shard_url = layout.shard(cluster, split)
            relative = shard_url.removeprefix(layout.root).lstrip("/")
            assert artifacts[relative] == storage.sha256_file(shard_url)
            table = pq.read_table(io.BytesIO(storage.read_bytes(shard_url)))
            assert table.num_rows == size
            seen.extend(table.column("row_id").to_pylist())
            if split == "heldout":
                heldout.extend(table.column("row_id").to_pylist())
    assert sorted(seen) == list(range(stats["rows"]))  # disjoint and complete
    assert stats["rows"] == 1797
    # Held out: exactly the rows whose (seed, row) hash says so, about the fraction asked.
    split = HeldoutSplit(config.seed, config.data.heldout_fraction, 1797)
    assert sorted(heldout) == np.flatnonzero(split.heldout(np.arange(1797))).tolist()
    assert abs(len(heldout) - 1797 * config.data.heldout_fraction) < 40  # ~3 sd
    shard = read_image_shard(layout.shard(0))
    assert shard.images.shape[1:] == (8, 8, 1) and shard.images.dtype == np.uint8


def test_balanced_kmeans_respects_capacity():
    rng = np.random.default_rng(0)
    # One dense blob and two small ones: plain k-means would be very unbalanced.
    points = np.concatenate([rng.normal(0, 1, (900, 4)), rng.normal(8, 1, (60, 4)),
                             rng.normal(-8, 1, (40, 4))]).astype(np.float32)
    eps = 0.1
    balanced = fit_model(points, KMeansSpec(4, n_init=2, iters=50, balance_eps=eps))
    sizes = np.bincount(balanced.assign(points)[0], minlength=4)
    assert sizes.max() <= int(np.ceil((1 + eps) * len(points) / 4)) and sizes.sum() == 1000
    unbalanced = fit_model(points, KMeansSpec(4, n_init=2, iters=50))
    assert np.bincount(unbalanced.assign(points)[0], minlength=4).max() > sizes.max()


def _write_parquet(path, table):
    pq.write_table(table, str(path))
    return f"file://{path}"


@pytest.mark.parametrize("case, message", [
    ("missing_column", "data.image_column"),
    ("non_image_column", "expected encoded image bytes (PNG, JPEG, WebP, ...)"),
    ("corrupt", "not a readable Parquet file"),
    ("unknown_extractor", "partition.features: unknown extractor 'sift'"),
    ("too_many_clusters", "partition.clusters: 64 clusters asked for"),
    ("undecodable_bytes", "not a decodable image"),
])
def test_bad_input_gives_one_clear_error_and_exit_2(tmp_path, write_config, case, message):
    sections = {}
    if case == "missing_column":
        source = _write_parquet(tmp_path / "d.parquet", pa.table({"pixels": [b"x"]}))
    elif case == "non_image_column":
        source = _write_parquet(tmp_path / "d.parquet", pa.table({"image": ["a", "b"]}))
    elif case == "undecodable_bytes":
        source = _write_parquet(tmp_path / "d.parquet", pa.table({"image": [b"nope"] * 4}))
    elif case == "corrupt":
        (tmp_path / "d.parquet").write_bytes(b"PAR1 this is not parquet")
        source = f"file://{tmp_path / 'd.parquet'}"
    else:
        source = "builtin:digits"
    if case == "unknown_extractor":
        sections["partition"] = {"features": "sift"}
    if case == "too_many_clusters":
        sections["data"] = {"max_rows": 40}
        sections["partition"] = {"clusters": 64}
    raw = tiny_config(f"file://{tmp_path}/store", **sections)
    raw["data"]["source"] = source
    config_path = write_config(raw)
    result = runner.invoke(app, ["partition", str(config_path)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    with pytest.raises(InputError):
        run_partition(partition_request(parse_config(raw)),
                      RunLayout(f"file://{tmp_path}/direct"))


def test_bad_input_leaves_existing_run_untouched(tmp_path, write_config):
    raw = tiny_config(f"file://{tmp_path}/store")
    result = runner.invoke(app, ["partition", str(write_config(raw))])
    assert result.exit_code == 0
    assert "done up to the partition stage" in result.output
    assert "complete" not in result.output
    run_dir = tmp_path / "store" / "tiny-digits"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    changed = dict(raw, partition={**raw["partition"], "clusters": 3})
    result = runner.invoke(app, ["partition", str(write_config(changed, "changed.yaml"))])
    assert result.exit_code == 2 and "partition.clusters: 2 -> 3" in result.output
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert before == after


def test_array_column_dataset_is_accepted(tmp_path):
    rng = np.random.default_rng(0)
    flat = rng.integers(0, 255, size=(60, 64)).astype(np.uint8)
    table = pa.table({"image": pa.array(flat.tolist(), type=pa.list_(pa.uint8()))})
    source = _write_parquet(tmp_path / "arrays.parquet", table)
    raw = tiny_config(f"file://{tmp_path}/store")
    raw["data"] = {"source": source, "label_column": None}
    config = parse_config(raw)
    run_partition(partition_request(config), RunLayout(f"file://{tmp_path}/store/arr"))
    stats = storage.read_json(f"file://{tmp_path}/store/arr/partition/stats.json")
    assert stats["image_shape"] == [8, 8, 1] and stats["label_histogram"] is None


def _shard_rows(layout: RunLayout, clusters: int, split: str) -> list[set[int]]:
    return [set(read_image_shard(layout.shard(k, split)).row_ids.tolist())
            for k in range(clusters)]


def _label_skew(histogram: list[list[int]]) -> float:
    """Largest gap between a part's share of a digit and that digit's share overall."""
    counts = np.asarray(histogram, dtype=np.float64)
    overall = counts.sum(0) / counts.sum()
    return float(np.abs(counts / counts.sum(1, keepdims=True) - overall).max())


def test_random_partition_is_balanced_and_label_blind(tmp_path):
    parts = {"clusters": 4}
    _, random_layout, _ = partition(f"file://{tmp_path}", "r", partition={**parts,
                                                                          "method": "random"})
    _, kmeans_layout, _ = partition(f"file://{tmp_path}", "k", partition=parts)
    stats = storage.read_json(random_layout.partition_stats)
    kmeans_stats = storage.read_json(kmeans_layout.partition_stats)
    assert stats["method"] == "random" and kmeans_stats["method"] == "kmeans"
    for sizes in (stats["sizes"], stats["heldout_sizes"]):
        assert max(sizes) - min(sizes) <= 1
    # The same rows are held out (the split comes first), only the parts differ.
    random_rows, kmeans_rows = (_shard_rows(lay, 4, split) for lay, split in
                                ((random_layout, "train"), (kmeans_layout, "train")))
    assert set().union(*random_rows) == set().union(*kmeans_rows)
    assert random_rows != kmeans_rows
    assert (set().union(*_shard_rows(random_layout, 4, "heldout"))
            == set().union(*_shard_rows(kmeans_layout, 4, "heldout")))
    # Random parts hold every digit in about its overall share (sd ~0.015 with ~400 rows
    # per part); k-means on pixels groups digits, so its parts are far from that.
    assert _label_skew(stats["label_histogram"]) < 0.07
    assert _label_skew(kmeans_stats["label_histogram"]) > 0.2
    # Centroids are the parts' mean features: nearly identical for random parts.
    assert stats["inertia"] > kmeans_stats["inertia"]


def test_random_partition_refuses_kmeans_only_settings():
    with pytest.raises(InputError, match=r"partition: .*method random"):
        parse_config(tiny_config("file:///x", partition={"method": "random", "fit_rows": 100}))
    with pytest.raises(InputError, match=r"partition\.method"):
        parse_config(tiny_config("file:///x", partition={"method": "spectral"}))
