"""Router, eval and experts read their data in bounded memory: a split is a seeded sample
of at most N rows (chosen by a hash of (seed, row)), read one row group at a time; experts
keep pixels as uint8 and tokens as int16; unlabelled rows (label < 0) are ignored."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.evaluate.frechet import labelled_images
from orchestrator.modalities.image.data import load_split, read_split
from partitioner.image_datasets import ImageSummary
from partitioner.labels import LabelMap
from partitioner.row_source import RowBatch
from runstore import storage
from runstore.layout import RunLayout
from runstore.row_hash import row_hash
from runstore.shards import (
    image_shard_table,
    read_image_split,
    read_text_split,
    text_shard_table,
)
from runstore.split_sample import SAMPLE_SALT, ReadCount
from worker.flow import to_model_space
from worker.models.byte_lm import EOS, PAD, encode
from worker.objectives import FlowObjective, LanguageObjective

ROWS, GROUP = 1_200, 40  # rows of the split, rows per row group of a shard


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A run with 2 clusters of 8x8 images in shards of 40-row row groups; rows are dealt
    to clusters at random, a tenth unlabelled (-1)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (ROWS, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, ROWS)
    labels[rng.random(ROWS) < 0.1] = -1
    cluster = rng.integers(0, 2, ROWS)
    layout = RunLayout(f"file://{tmp_path_factory.mktemp('bounded')}/run")
    for split in ("train", "heldout"):
        for k in range(2):
            ids = np.flatnonzero(cluster == k)
            url = layout.shard(k, split)
            fs, path = storage.filesystem(url)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            pq.write_table(image_shard_table(images[ids], labels[ids], ids), path,
                           row_group_size=GROUP)
    return layout, images, labels, cluster


def test_sample_is_seeded_capped_and_read_a_row_group_at_a_time(image_run):
    layout, images, labels, cluster = image_run
    count = ReadCount()
    table, of = read_image_split(layout, 2, "train", 300, seed=7, count=count)
    # The 300 rows with the smallest hash of (seed, row), in dataset order, with their data.
    every = np.arange(ROWS)
    expected = np.sort(every[np.argsort(row_hash(every, 7, SAMPLE_SALT))[:300]])
    assert (table.row_ids == expected).all()
    assert (table.images == images[expected]).all() and (table.labels == labels[expected]).all()
    assert (of == cluster[expected]).all()
    # Never more than one row group held: the largest read is one group.
    assert count.largest == GROUP and count.groups > 2 * ROWS // GROUP
    again, _ = read_image_split(layout, 2, "train", 300, seed=7)
    other, _ = read_image_split(layout, 2, "train", 300, seed=8)
    assert (again.row_ids == table.row_ids).all()
    assert len(other.row_ids) == 300 and (other.row_ids != table.row_ids).any()
    # A cap at or above the split reads it whole, in dataset order: as with no cap.
    whole, whole_of = read_image_split(layout, 2, "train", ROWS, seed=7)
    assert (whole.row_ids == every).all() and (whole.images == images).all()
    assert (whole_of == cluster).all()


def test_uint8_split_gives_the_model_space_of_the_whole_split(image_run):
    layout = image_run[0]
    split = read_split(layout, 2, "heldout", 10_000, seed=1)
    whole = load_split(layout, 2, "heldout")
    index = torch.tensor([5, 0, 1_199, 17])
    assert split.pixels.dtype == torch.uint8
    assert torch.equal(split.x0(index), whole.x0[index])
    assert torch.equal(split.cluster, whole.cluster)


def test_unlabelled_rows_are_left_out(image_run):
    layout, images, labels, _ = image_run
    x, y = labelled_images(layout, 2, "train", rows=None)
    known = np.flatnonzero(labels >= 0)
    assert len(y) == len(known) < ROWS and (y.numpy() == labels[known]).all()
    assert torch.equal(x, to_model_space(torch.from_numpy(images[known])))
    capped_x, capped_y = labelled_images(layout, 2, "train", rows=100, seed=3)
    assert len(capped_x) == len(capped_y) <= 100 and (capped_y >= 0).all()
    # The partition's histogram, summed over pieces as the Ray pass does, skips them too.
    summary, later = (ImageSummary(2, LabelMap("label", "int", None), "test") for _ in "ab")
    for part, where in ((summary, slice(0, 2)), (later, slice(2, 4))):
        part.add(RowBatch(np.arange(4)[where], np.zeros((2, 8, 8, 1), np.uint8),
                          {"label": np.array([-1, 2, 3, -1])[where],
                           "fixes": np.zeros(2, np.uint8)}), np.array([0, 1, -1, 1])[where])
    summary.merge(later)
    assert summary.result()["label_histogram"] == [[0, 0, 0, 0], [0, 0, 1, 0]]
    assert summary.result()["unlabelled_rows"] == 2


def test_experts_keep_uint8_pixels_and_int16_tokens(image_run, tmp_path):
    layout, images, _, cluster = image_run
    urls = [layout.shard(0, "train"), layout.shard(1, "train")]
    flow = FlowObjective(urls)
    order = np.concatenate([np.flatnonzero(cluster == 0), np.flatnonzero(cluster == 1)])
    assert flow.pixels.dtype == torch.uint8 and flow.rows == ROWS
    batch = flow.batch(torch.tensor([3, 700]), torch.Generator().manual_seed(0))
    assert torch.equal(batch["x0"], to_model_space(torch.from_numpy(images[order[[3, 700]]])))

    texts = [f"text {i} " + "é" * (i % 5) for i in range(90)]
    url = f"file://{tmp_path}/text.parquet"
    pq.write_table(text_shard_table(texts, np.arange(90)), url[7:], row_group_size=8)
    lm = LanguageObjective([url], context=16)
    stream = [token for text in texts for token in [*encode(text), EOS]]
    stream += [PAD] * (-len(stream) % 17)
    assert lm.windows.dtype == torch.int16
    windows = lm.batch(torch.arange(lm.rows), torch.Generator())["window"]
    assert torch.equal(windows, torch.tensor(stream).view(-1, 17))


def test_text_sample_is_seeded_and_capped(tmp_path):
    layout = RunLayout(f"file://{tmp_path}/run")
    texts = [f"row {i}" for i in range(300)]
    for k in range(3):
        ids = np.arange(k, 300, 3)
        url = layout.shard(k, "heldout")
        fs, path = storage.filesystem(url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        pq.write_table(text_shard_table([texts[i] for i in ids], ids), path, row_group_size=16)
    sample, of = read_text_split(layout, 3, "heldout", 50, seed=2)
    expected = np.sort(np.argsort(row_hash(np.arange(300), 2, SAMPLE_SALT))[:50])
    assert sample == [texts[i] for i in expected] and (of == expected % 3).all()
    whole, _ = read_text_split(layout, 3, "heldout")
    assert whole == texts


def test_reader_rides_out_transient_storage_failures(image_run, monkeypatch):
    from tests.flaky_fs import FlakyFileSystem, register

    register()
    monkeypatch.setattr(storage, "RETRY_DELAY", 0.0)
    layout = image_run[0]
    flaky = RunLayout("flaky://" + layout.root.removeprefix("file://"))
    before = FlakyFileSystem.failures
    table, of = read_image_split(flaky, 2, "train", 300, seed=7)
    plain, plain_of = read_image_split(layout, 2, "train", 300, seed=7)
    assert FlakyFileSystem.failures > before  # it met failures, and read the same rows
    assert (table.row_ids == plain.row_ids).all() and (table.images == plain.images).all()
    assert (of == plain_of).all()


def test_text_summary_of_pieces_equals_one_pass():
    from partitioner.text_datasets import TextSummary

    texts = [f"t{i}" * (1 + i % 4) for i in range(40)]
    language = [["en", "de", "fr"][i % 7 % 3] for i in range(40)]
    clusters = np.array([i % 3 - (i % 5 == 0) for i in range(40)])  # some -1: held out

    def summary(part: slice, dropped: set[int]) -> TextSummary:
        out = TextSummary("c", ["language"], 3, dropped, "test")
        out.add(RowBatch(np.arange(40)[part], texts[part], {"language": language[part]}),
                clusters[part])
        return out

    # Empty texts dropped in each piece (a Ray task's own set) are counted once in all.
    whole, first = summary(slice(0, 40), {0, 13}), summary(slice(0, 13), {0})
    first.merge(summary(slice(13, 40), {13}))
    assert first.result() == whole.result() and whole.result()["dropped_rows"] == 2
