"""Builtin sets from Debian packages (Fashion-MNIST, the fortunes in every installed
language) and the partition's between-cluster share of the feature variance."""

import gzip
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.pipeline import partition_request
from orchestrator.state.config import parse_config
from partitioner import fashion_mnist, fortunes_multilingual
from partitioner.builtins import builtin_split
from partitioner.fashion_mnist import FASHION_MNIST_ROOT, read_idx
from partitioner.fortunes_multilingual import (
    FORTUNE_ROOT,
    MIN_LANGUAGES,
    installed_languages,
    read_corpus,
)
from partitioner.image_datasets import BUILTIN_SPLITS, resolve_source
from partitioner.pieces import PartMeans
from partitioner.stage import run_partition
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from runstore.shards import read_text_shard
from tests.conftest import tiny_config

runner = CliRunner()
FASHION_ABSENT = not (FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").is_file()
LANGUAGES_ABSENT = len(installed_languages(FORTUNE_ROOT)) < MIN_LANGUAGES


def _partition(raw: dict) -> tuple[dict, RunLayout]:
    config = parse_config(raw)
    layout = RunLayout(storage.join(config.storage, config.run))
    run_partition(partition_request(config), layout)
    return storage.read_json(layout.partition_stats), layout


def test_between_cluster_variance_on_a_known_split():
    means = PartMeans(2)
    # Parts {0, 2} and {10, 12} on one axis, nothing on the other: total sum of squares
    # about 6 is 36 + 16 + 16 + 36 = 104, within the parts 4 x 1 = 4.
    features = np.array([[0.0, 5.0], [2.0, 5.0], [10.0, 5.0], [12.0, 5.0]], np.float32)
    means.add(features[:2], np.array([0, 0]))  # in two batches, as pieces add them
    means.add(features[2:], np.array([1, 1]))
    assert means.total_squares() == pytest.approx(104.0)
    assert means.between_fraction() == pytest.approx(1.0 - 4.0 / 104.0)
    mixed = PartMeans(2)
    mixed.add(features, np.array([0, 1, 0, 1]))  # {0, 10} and {2, 12}: 100 of 104 within
    assert mixed.between_fraction() == pytest.approx(4.0 / 104.0)


def test_builtin_splits_and_bad_idx_files(tmp_path):
    assert builtin_split("builtin:fashion-mnist", None, BUILTIN_SPLITS) == "train"
    assert builtin_split("builtin:fashion-mnist", "test", BUILTIN_SPLITS) == "test"
    with pytest.raises(InputError, match=r"^data\.split: 'validation' is not a split of "
                       r"builtin:fashion-mnist; expected one of train, test"):
        resolve_source("builtin:fashion-mnist", f"file://{tmp_path}", "validation")
    with pytest.raises(InputError, match=r"^data\.split: builtin:mnist5k has no splits"):
        resolve_source("builtin:mnist5k", f"file://{tmp_path}", "test")
    bad = tmp_path / "labels.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 12))  # rank 3, not 1
    with pytest.raises(InputError, match="unsigned bytes in 1 dimension"):
        read_idx(bad, 1)
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05" + b"\x01\x02"))
    with pytest.raises(InputError, match=r"header says \(5,\) = 5 bytes but 2 follow"):
        read_idx(bad, 1)


def test_fashion_mnist_missing_package_is_one_clear_error(tmp_path, write_config,
                                                          monkeypatch):
    empty = tmp_path / "fashion-mnist"
    empty.mkdir()
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_ROOT", empty)
    config = write_config(tiny_config(f"file://{tmp_path}/store", base="fashion-image"))
    for verb in ("validate", "partition"):  # validate lists files, partition reads them
        result = runner.invoke(app, [verb, str(config)])
        assert result.exit_code == 2, result.output
        squeezed = "".join(result.output.split())  # rich folds long lines
        assert "data.source" in squeezed and "dataset-fashion-mnist" in squeezed
        assert str(empty) in squeezed and "Traceback" not in squeezed


@pytest.mark.skipif(FASHION_ABSENT, reason=f"no Fashion-MNIST in {FASHION_MNIST_ROOT} "
                    "(Debian package dataset-fashion-mnist)")
def test_fashion_mnist_test_split_partitions():
    raw = tiny_config("memory://fashion", base="fashion-image",
                      data={"split": "test", "sample_rows": None, "max_rows": 240},
                      partition={"pca_components": 8, "kmeans_init": 1})
    stats, _ = _partition(raw)
    assert stats["source"].endswith("/.datasets/fashion-mnist-test.parquet")
    assert stats["rows"] == 240 and stats["image_shape"] == [28, 28, 1]
    assert sum(stats["sizes"]) + sum(stats["heldout_sizes"]) == 240
    histogram = np.array(stats["label_histogram"])
    assert histogram.shape == (4, 10) and histogram.sum() == sum(stats["sizes"])
    assert 0.0 < stats["between_cluster_variance"] < 1.0


def test_multilingual_fortunes_need_eight_languages(tmp_path, monkeypatch, write_config):
    root = tmp_path / "fortunes"
    (root / "de").mkdir(parents=True)
    (root / "science").write_text("An English fortune long enough to count.\n")
    (root / "de" / "huhn").write_text("Ein deutsches Glückskeks, lang genug.\n")
    (root / "brasil").write_bytes(b"\xff\xfe not UTF-8, but Latin-1 decodes it\n")
    (root / "chinese").write_bytes(b"\xff\xff in neither UTF-8 nor GB18030\n")
    corpus = read_corpus(root)
    assert corpus.languages == {"en": 1, "de": 1, "pt": 1}  # brasil is not English
    assert corpus.skipped == [root / "chinese"]
    monkeypatch.setattr(fortunes_multilingual, "FORTUNE_ROOT", root)
    with pytest.raises(InputError, match=r"^data\.source: .*found 3 \(en, de, pt\); install "
                       r"the missing Debian packages: sudo apt-get install fortunes-es "
                       r"fortunes-it fortunes-pl fortunes-ru fortunes-cs fortunes-bg "
                       r"fortunes-eo fortunes-ga fortunes-zh$"):
        fortunes_multilingual.read_multilingual_fortunes()
    config = write_config(tiny_config(f"file://{tmp_path}/store",
                                      base="fortunes-multilingual-text"))
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 2, result.output
    assert "sudoapt-getinstallfortunes-es" in "".join(result.output.split())


@pytest.mark.skipif(LANGUAGES_ABSENT, reason=f"fewer than {MIN_LANGUAGES} fortunes languages "
                    f"in {FORTUNE_ROOT} (Debian packages fortunes-de, -es, -it, -pl, -ru, "
                    "-cs, -br, -bg, -eo, -ga, -zh)")
def test_multilingual_fortunes_partition():
    raw = tiny_config("memory://fortunes-ml", base="fortunes-multilingual-text",
                      data={"sample_rows": 300},
                      partition={"clusters": 2, "pca_components": 8, "kmeans_init": 1})
    stats, layout = _partition(raw)
    assert stats["corpus"] == "builtin:fortunes-multilingual"
    corpus = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(
        "memory://fortunes-ml", ".datasets", "fortunes-multilingual.parquet"))))
    assert corpus.column_names == ["text", "language", "topic"]
    assert len(set(corpus.column("language").to_pylist())) > MIN_LANGUAGES
    languages = set()
    for k in range(2):
        for split in ("train", "heldout"):
            languages |= set(read_text_shard(layout.shard(k, split)).column("language")
                             .to_pylist())
    assert len(languages) > MIN_LANGUAGES
    assert 0.0 < stats["between_cluster_variance"] < 1.0
