"""The partition stage streamed over a multi-file Parquet source: every row lands in
exactly one shard with its own pixels, clusters hold the capacity, two runs write the
same bytes, and `data.max_rows` stops the read there."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.pipeline import partition_request
from orchestrator.state.config import parse_config
from partitioner import stage
from partitioner.image_datasets import BUILTINS, images_to_table
from partitioner.stage import run_partition
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from runstore.shards import read_image_shard
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """The 1,797 digits as PNGs in 3 Parquet files of 200-row row groups."""
    images, labels = BUILTINS["digits"]()
    folder = tmp_path_factory.mktemp("digits-parts")
    for index, part in enumerate(np.array_split(np.arange(len(images)), 3)):
        pq.write_table(images_to_table(images[part], labels[part]),
                       folder / f"part-{index}.parquet", row_group_size=200)
    return images, labels, folder


def _partition(tmp_path, folder, run: str, **data):
    raw = tiny_config(f"file://{tmp_path}", run=run, partition={"clusters": 3})
    raw["data"] = {"source": f"file://{folder}", **data}
    config = parse_config(raw)
    layout = RunLayout(storage.join(f"file://{tmp_path}", run))
    return run_partition(partition_request(config), layout), layout, config


def test_stage_streams_every_row_once_balanced_and_bit_identical(tmp_path, digits_folder,
                                                                 monkeypatch):
    images, labels, folder = digits_folder
    monkeypatch.setattr(stage, "BATCH_ROWS", 256)  # many batches, each cutting row groups
    first, layout, config = _partition(tmp_path, folder, "a")
    stats = storage.read_json(layout.partition_stats)
    seen = []
    for split in ("train", "heldout"):
        for cluster in range(3):
            shard = read_image_shard(layout.shard(cluster, split))
            # Each row keeps its own pixels and label, in dataset order within the shard.
            assert (shard.images == images[shard.row_ids][..., None]).all()
            assert (shard.labels == labels[shard.row_ids]).all()
            assert (np.diff(shard.row_ids) > 0).all()
            seen.extend(shard.row_ids.tolist())
    assert sorted(seen) == list(range(len(images)))  # none lost, none twice
    assert stats["rows"] == stats["rows_used"] == len(images)
    # Capacity prices fitted on every training row (fewer than the fit sample) cap them all.
    train = sum(stats["sizes"])
    assert max(stats["sizes"]) <= math.ceil((1 + config.partition.balance_eps) * train / 3)
    assert sum(map(sum, stats["label_histogram"])) == train
    second, _, _ = _partition(tmp_path, folder, "b")
    del first["partition/stats.json"], second["partition/stats.json"]
    assert first == second  # every shard, the centroids and the features: the same bytes


def test_max_rows_reads_no_row_past_it(tmp_path, digits_folder):
    images, labels, _ = digits_folder
    # 600 good rows, then a row group of bytes no decoder reads.
    folder = tmp_path / "tail"
    folder.mkdir()
    table = pa.concat_tables([
        images_to_table(images[:600], labels[:600]),
        pa.table({"image": pa.array([b"nope"] * 100, pa.binary()),
                  "label": pa.array(np.zeros(100, np.int64))})])
    pq.write_table(table, folder / "d.parquet", row_group_size=300)
    _, layout, _ = _partition(tmp_path, folder, "capped", max_rows=600)
    stats = storage.read_json(layout.partition_stats)
    assert stats["rows"] == 600 and sum(stats["sizes"]) + sum(stats["heldout_sizes"]) == 600
    with pytest.raises(InputError, match=r"row 600 is not a decodable image"):
        _partition(tmp_path, folder, "whole")


def test_shard_files_are_plain_parquet_with_the_shape(tmp_path, digits_folder):
    _, _, folder = digits_folder
    artifacts, layout, _ = _partition(tmp_path, folder, "plain", max_rows=400)
    url = layout.shard(0, "heldout")
    data = storage.read_bytes(url)
    assert artifacts[url.removeprefix(layout.root).lstrip("/")] == storage.sha256_bytes(data)
    assert pq.read_table(io.BytesIO(data)).schema.metadata[b"shape"] == b"8,8,1"


def test_shards_stream_to_s3_as_final_keys(s3_bucket):
    raw = tiny_config(s3_bucket, run="stream-s3", data={"max_rows": 300})
    layout = RunLayout(storage.join(s3_bucket, "stream-s3"))
    artifacts = run_partition(partition_request(parse_config(raw)), layout)
    fs, root = storage.filesystem(layout.root)
    names = sorted(path.removeprefix(root).lstrip("/") for path in fs.find(root))
    assert names == sorted(artifacts)  # no temporary key left behind
    for name, sha in artifacts.items():
        assert storage.sha256_bytes(storage.read_bytes(storage.join(layout.root, name))) == sha


def _both_passes(tmp_path, folder, run: str, monkeypatch, **sections):
    """The stage here and on Ray (the session's Ray counts as the cluster) on the same
    config: pieces of 400 rows, batches of 256 that cut row groups."""
    monkeypatch.setattr(stage, "BATCH_ROWS", 256)
    monkeypatch.setattr(stage, "PIECE_ROWS", 400)
    raw = tiny_config(f"file://{tmp_path}", run=run, partition={"clusters": 3,
                                                                 **sections.pop("partition", {})})
    raw["data"] = {"source": f"file://{folder}", **sections.pop("data", {})}
    out = []
    for where, address in (("here", None), ("ray", "auto")):
        raw["islands"] = {**raw.get("islands", {}), "address": address}
        request = partition_request(parse_config(raw))
        assert request.ray_address == address  # islands.address sends the pass to Ray
        layout = RunLayout(storage.join(f"file://{tmp_path}", f"{run}-{where}"))
        try:
            out.append(run_partition(request, layout))
        except InputError as err:
            out.append(err)
        assert not storage.exists(storage.join(layout.partition, ".pieces"))
    return out


@pytest.mark.parametrize("sections", [{"data": {"sample_rows": 1500}},
                                      {"partition": {"method": "random"}}],
                         ids=["kmeans-sampled", "random"])
def test_ray_pass_writes_the_local_pass_bytes(ray_session, tmp_path, digits_folder,
                                              monkeypatch, sections):
    here, on_ray = _both_passes(tmp_path, digits_folder[2], "same", monkeypatch, **sections)
    assert len(here) == 2 * 3 + 3  # shards, centroids, features, stats
    assert here == on_ray  # every shard, the centroids, the features and stats.json


def test_ray_pass_reports_a_bad_piece_by_file_and_row(ray_session, tmp_path, digits_folder,
                                                      monkeypatch):
    images, labels, _ = digits_folder
    folder = tmp_path / "bad"
    folder.mkdir()
    pq.write_table(images_to_table(images[:500], labels[:500]), folder / "a.parquet",
                   row_group_size=200)
    bad = pa.concat_tables([images_to_table(images[500:900], labels[500:900]),
                            pa.table({"image": pa.array([b"nope"] * 50, pa.binary()),
                                      "label": pa.array(np.zeros(50, np.int64))})])
    pq.write_table(bad, folder / "b.parquet", row_group_size=200)
    here, on_ray = _both_passes(tmp_path, folder, "bad", monkeypatch)
    assert isinstance(here, InputError) and isinstance(on_ray, InputError)
    assert str(on_ray) == str(here)
    assert "b.parquet column 'image'" in str(here) and "row 900 is not a decodable" in str(here)


def test_ray_pass_of_texts_writes_the_local_pass_bytes(ray_session, tmp_path, monkeypatch):
    """Texts in 2 files of 60-row row groups, some empty (dropped and counted once)."""
    folder = tmp_path / "texts"
    folder.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    for index in range(2):
        rows = [{"text": "" if i % 37 == 0 else " ".join(words[(i * j) % 6]
                                                         for j in range(1, 8 + i % 5)),
                 "language": ["en", "de", "fr"][i % 3]} for i in range(index * 500,
                                                                       index * 500 + 500)]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"part-{index}.parquet",
                       row_group_size=60)
    monkeypatch.setattr(stage, "BATCH_ROWS", 256)
    monkeypatch.setattr(stage, "PIECE_ROWS", 200)
    raw = tiny_config(f"file://{tmp_path}", "tiny-text", run="text",
                      data={"source": f"file://{folder}", "sample_rows": None})
    out = []
    for where, address in (("here", None), ("ray", "auto")):
        raw["islands"] = {**raw.get("islands", {}), "address": address}
        layout = RunLayout(storage.join(f"file://{tmp_path}", f"text-{where}"))
        out.append(run_partition(partition_request(parse_config(raw)), layout))
    assert out[0] == out[1]
    stats = storage.read_json(storage.join(f"file://{tmp_path}", "text-ray",
                                           "partition/stats.json"))
    assert stats["dropped_rows"] == 28 and sum(stats["sizes"]) + sum(
        stats["heldout_sizes"]) == 1000 - 28
