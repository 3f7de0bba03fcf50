"""Streaming k-means over Parquet: sampling, fit, batched assignment, hierarchical mode,
capacity prices, the Ray Data pass, and bad input."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from partitioner.centroids import CentroidModel, KMeansSpec, balance_prices, fit_model
from partitioner.kmeans import faiss_available
from partitioner.parquet_rows import Features, open_parquet, sample_features, sample_indices
from partitioner.streaming import kmeans_parquet
from runstore.errors import InputError

BACKENDS = ["sklearn", pytest.param("faiss", marks=pytest.mark.skipif(
    not faiss_available(), reason="faiss-cpu not installed"))]


def mixture(rows: int, clusters: int, dim: int, spread: float, seed: int = 0,
            weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, spread, (clusters, dim))
    labels = rng.choice(clusters, rows, p=weights)
    return (centers[labels] + rng.normal(0.0, 1.0, (rows, dim))).astype(np.float32), labels


def write_parts(folder, points: np.ndarray, files: int = 3, row_group: int = 500,
                list_type: bool = False) -> str:
    """`points` as `files` Parquet files of several row groups, with an id column."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, chunk in enumerate(np.array_split(np.arange(len(points)), files)):
        values = pa.array(points[chunk].ravel())
        vectors = (pa.ListArray.from_arrays(pa.array(np.arange(len(chunk) + 1) *
                                                     points.shape[1], pa.int32()), values)
                   if list_type else pa.FixedSizeListArray.from_arrays(values, points.shape[1]))
        table = pa.table({"id": pa.array(chunk, pa.int64()), "emb": vectors})
        pq.write_table(table, folder / f"part-{index}.parquet", row_group_size=row_group)
    return f"file://{folder}"


@pytest.fixture(scope="module")
def separated(tmp_path_factory):
    points, labels = mixture(6000, 5, 8, spread=10.0)
    return points, labels, write_parts(tmp_path_factory.mktemp("separated"), points)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_recovers_separated_clusters(separated, backend):
    points, labels, url = separated
    spec = KMeansSpec(clusters=5, sample_rows=2000, backend=backend, batch_rows=700)
    result = kmeans_parquet(url, "emb", spec)
    assert result.sample_rows == 2000
    assert adjusted_rand_score(labels, result.assignment.clusters) == 1.0
    assert sum(result.assignment.sizes) == len(points) == result.assignment.rows
    _, sq = result.model.assign(points)
    assert result.assignment.inertia == pytest.approx(float(sq.sum(dtype=np.float64)), rel=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inertia_close_to_sklearn_on_all_rows(tmp_path, backend):
    # Overlapping clusters: the sample fit must find as good a minimum as a full fit.
    points, _ = mixture(20000, 8, 16, spread=0.8, seed=3)
    url = write_parts(tmp_path / "data", points, row_group=2000)
    spec = KMeansSpec(clusters=8, sample_rows=8000, backend=backend, n_init=3, iters=50)
    ours = kmeans_parquet(url, "emb", spec).assignment.inertia
    full = KMeans(8, n_init=3, max_iter=50, random_state=0).fit(points).inertia_
    assert ours <= 1.01 * full


def test_streamed_assignment_equals_in_memory_for_same_centroids(separated, tmp_path):
    points, _, url = separated
    model = fit_model(points[::3], KMeansSpec(clusters=5, seed=1))
    ids, sq = model.assign(points)
    streamed = kmeans_parquet(url, "emb", KMeansSpec(clusters=5, batch_rows=333), model=model,
                              out=f"file://{tmp_path}/ids", keep=("id",))
    assert np.array_equal(streamed.assignment.clusters, ids)
    assert streamed.assignment.inertia == pytest.approx(float(sq.sum(dtype=np.float64)),
                                                        rel=1e-9)
    written = pq.read_table(tmp_path / "ids").sort_by("row")
    assert written.column("row").to_pylist() == list(range(len(points)))
    assert written.column("id").to_pylist() == list(range(len(points)))
    assert np.array_equal(written.column("cluster").to_numpy(), ids)


def test_list_column_and_transform_match_fixed_size_list(separated, tmp_path):
    points, _, url = separated
    model = fit_model(points, KMeansSpec(clusters=5))
    reference = kmeans_parquet(url, "emb", KMeansSpec(5), model=model).assignment.clusters
    lists = write_parts(tmp_path / "lists", points, list_type=True)
    assert np.array_equal(kmeans_parquet(lists, "emb", KMeansSpec(5), model=model)
                          .assignment.clusters, reference)

    def doubled(batch: pa.RecordBatch) -> np.ndarray:  # scale-free: same nearest centroid
        vectors = batch.column("emb").flatten().to_numpy().reshape(batch.num_rows, -1)
        return vectors * 2.0

    scaled = CentroidModel.flat(model.centroids * 2.0)
    result = kmeans_parquet(url, Features(transform=doubled, reads=("emb",)), KMeansSpec(5),
                            model=scaled)
    assert np.array_equal(result.assignment.clusters, reference)


def test_hierarchical_mode_yields_k_clusters(separated):
    points, labels, url = separated
    spec = KMeansSpec(clusters=5, fine_clusters=40, sample_rows=3000)
    result = kmeans_parquet(url, "emb", spec)
    model = result.model
    assert model.clusters == 5 and len(model.fine) == 40
    assert set(model.groups.tolist()) == set(range(5))
    assert min(result.assignment.sizes) > 0
    assert adjusted_rand_score(labels, result.assignment.clusters) == 1.0
    # A row's cluster is its nearest fine centroid's group.
    fine_ids, _ = CentroidModel.flat(model.fine).assign(points)
    assert np.array_equal(model.groups[fine_ids], result.assignment.clusters)


def test_sample_is_uniform_without_replacement_and_reads_those_rows(separated):
    points, _, url = separated
    picked = sample_indices(len(points), 1500, seed=7, block=1000)
    assert len(np.unique(picked)) == 1500 and np.all(np.diff(picked) > 0)
    assert np.array_equal(picked, sample_indices(len(points), 1500, seed=7, block=1000))
    # Every block gets about its share: 1000-row blocks should hold ~250 each.
    per_block = np.bincount(picked // 1000, minlength=6)
    assert per_block.min() > 180 and per_block.max() < 320
    source = open_parquet(url)
    sample = sample_features(source, Features("emb"), 1500, seed=7, batch_rows=256)
    assert np.array_equal(sample, points[sample_indices(len(points), 1500, seed=7)])


def test_balance_prices_cap_clusters_on_sample_and_full_data(tmp_path):
    # One dense blob and three small far ones: plain k-means gives one cluster 70% of rows.
    rng = np.random.default_rng(2)
    centers = np.array([[0, 0, 0, 0], [12, 0, 0, 0], [0, 12, 0, 0], [0, 0, 12, 0]])
    labels = np.repeat(np.arange(4), [14000, 2000, 2000, 2000])
    points = (centers[labels] + rng.normal(0, 1, (20000, 4))).astype(np.float32)
    url = write_parts(tmp_path / "skewed", points, row_group=2000)
    eps = 0.1
    spec = KMeansSpec(clusters=4, sample_rows=8000, balance_eps=eps)
    balanced = kmeans_parquet(url, "emb", spec)
    free = kmeans_parquet(url, "emb", KMeansSpec(clusters=4, sample_rows=8000))
    cap = (1 + eps) * len(points) / 4
    assert max(free.assignment.sizes) > 2 * cap  # the skew is real
    assert max(balanced.assignment.sizes) <= cap  # prices fitted on the sample, with margin
    scores = balanced.model.scores(points[:4000])
    prices = balance_prices(scores, eps)
    sizes = np.bincount((scores + prices).argmin(1), minlength=4)
    assert sizes.max() <= np.ceil((1 + eps) * 4000 / 4)


def test_balance_cap_never_rounds_above_eps_times_the_mean():
    # 1.1 x 180 is 198.00000000000003 in floats: a cap rounded up would allow 199.
    rng = np.random.default_rng(0)
    scores = np.stack([rng.random(360) * 0.1, rng.random(360) + 1.0], axis=1)  # all prefer 0
    sizes = np.bincount((scores + balance_prices(scores, 0.1)).argmin(1), minlength=2)
    assert sizes.max() == 198
    # Where (1 + eps) x mean is below one row more than the mean, the cap is ceil(N / K).
    odd = scores[:181]
    sizes = np.bincount((odd + balance_prices(odd, 0.0)).argmin(1), minlength=2)
    assert sizes.max() == 91


def test_memory_fsspec_url(separated):
    points, labels, _ = separated
    import fsspec

    fs = fsspec.filesystem("memory")
    table = pa.table({"emb": pa.FixedSizeListArray.from_arrays(pa.array(points.ravel()), 8)})
    with fs.open("/streaming-test/data.parquet", "wb") as handle:
        pq.write_table(table, handle, row_group_size=1000)
    result = kmeans_parquet("memory://streaming-test", "emb", KMeansSpec(5, sample_rows=1000),
                            out="memory://streaming-test-out")
    assert adjusted_rand_score(labels, result.assignment.clusters) == 1.0
    assert fs.exists("/streaming-test-out/part-000000000000.parquet")


def test_ray_data_pass_equals_local_pass(ray_session, separated, tmp_path):
    _, _, url = separated
    spec = KMeansSpec(clusters=5, fine_clusters=20, sample_rows=2000, batch_rows=400)
    source = open_parquet(url, unit_rows=1000)
    assert len(source.units) >= 6  # several Ray tasks
    local = kmeans_parquet(source, "emb", spec, out=f"file://{tmp_path}/local", keep=("id",))
    remote = kmeans_parquet(source, "emb", spec, out=f"file://{tmp_path}/ray", keep=("id",),
                            ray_address="auto")
    assert np.array_equal(remote.model.fine, local.model.fine)
    assert np.array_equal(remote.assignment.clusters, local.assignment.clusters)
    assert remote.assignment.sizes == local.assignment.sizes
    assert remote.assignment.inertia == pytest.approx(local.assignment.inertia, rel=1e-9)
    # The pass really ran in Ray tasks: this transform refuses to run anywhere else (nested,
    # so it is pickled by value: workers cannot import this test module by its name).
    def vectors_in_ray_task_only(batch: pa.RecordBatch) -> np.ndarray:
        import ray

        assert ray.get_runtime_context().get_task_id() is not None, "not in a Ray task"
        return batch.column("emb").flatten().to_numpy().reshape(batch.num_rows, -1)

    only_in_tasks = Features(transform=vectors_in_ray_task_only, reads=("emb",))
    with pytest.raises(AssertionError, match="not in a Ray task"):
        kmeans_parquet(source, only_in_tasks, spec, model=local.model)
    in_tasks = kmeans_parquet(source, only_in_tasks, spec, model=local.model,
                              ray_address="auto")
    assert np.array_equal(in_tasks.assignment.clusters, local.assignment.clusters)

    def short_in_third_unit(batch: pa.RecordBatch) -> np.ndarray:
        vectors = batch.column("emb").flatten().to_numpy().reshape(batch.num_rows, -1)
        return vectors[:-1] if batch.column("id")[0].as_py() >= 2000 else vectors

    # Bad input met inside a task reaches the driver as the InputError it is.
    with pytest.raises(InputError, match=r"part-1.parquet features: transform returned shape"):
        kmeans_parquet(source, Features(transform=short_in_third_unit, reads=("emb", "id")),
                       spec, model=local.model, ray_address="auto")
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ray").iterdir())
    for name in names:
        assert pq.read_table(tmp_path / "local" / name).equals(
            pq.read_table(tmp_path / "ray" / name))


def test_bad_input_names_file_column_and_expectation(tmp_path, separated):
    _, _, url = separated
    with pytest.raises(InputError, match=r"column 'vectors'.*missing; the file has columns id"):
        kmeans_parquet(url, "vectors", KMeansSpec(5))
    with pytest.raises(InputError, match=r"column 'id'.*has type int64; expected a fixed-size"):
        kmeans_parquet(url, "id", KMeansSpec(5))
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"emb": ["a", "b"]}), text)
    with pytest.raises(InputError, match=r"text.parquet column 'emb'.*type string"):
        kmeans_parquet(f"file://{text}", "emb", KMeansSpec(1))
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"emb": [[1.0, 2.0], [1.0]]}), ragged)
    with pytest.raises(InputError, match=r"ragged.parquet column 'emb'.*different lengths"):
        kmeans_parquet(f"file://{ragged}", "emb", KMeansSpec(1))
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"emb": pa.array([], pa.list_(pa.float32(), 4))}), empty)
    with pytest.raises(InputError, match=r"empty.parquet: holds no rows"):
        kmeans_parquet(f"file://{empty}", "emb", KMeansSpec(1))
    with pytest.raises(InputError, match=r"6000 rows") as err:
        kmeans_parquet(url, "emb", KMeansSpec(7000, sample_rows=7000))
    assert err.value.where == url
    with pytest.raises(InputError, match=r"does not exist"):
        kmeans_parquet(f"file://{tmp_path}/nowhere", "emb", KMeansSpec(2))
    (tmp_path / "not.parquet").write_text("hello")
    with pytest.raises(InputError, match=r"not.parquet: not a readable Parquet file"):
        kmeans_parquet(f"file://{tmp_path}/not.parquet", "emb", KMeansSpec(2))
    with pytest.raises(InputError, match=r"kmeans.fine_clusters"):
        kmeans_parquet(url, "emb", KMeansSpec(5, fine_clusters=3))
    with pytest.raises(InputError, match=r"kmeans.backend"):
        kmeans_parquet(url, "emb", KMeansSpec(5, backend="cuml"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InputError, match=r"not empty"):
        kmeans_parquet(url, "emb", KMeansSpec(5), out=f"file://{tmp_path}/full")


def test_partition_stage_with_sampled_hierarchical_kmeans():
    from dataclasses import replace

    from orchestrator.pipeline import partition_request
    from orchestrator.state.config import parse_config
    from partitioner.stage import run_partition
    from runstore import storage
    from runstore.layout import RunLayout
    from tests.conftest import tiny_config

    config = parse_config(tiny_config("memory://stream-stage", partition={"clusters": 4}))
    request = replace(partition_request(config),
                      kmeans=KMeansSpec(clusters=1, fine_clusters=32, sample_rows=800))
    layout = RunLayout(storage.join("memory://stream-stage", config.run))
    artifacts = run_partition(request, layout)
    stats = storage.read_json(layout.partition_stats)
    assert len(stats["sizes"]) == 4 and min(stats["sizes"]) > 0
    assert sum(stats["sizes"]) + sum(stats["heldout_sizes"]) == stats["rows"] == 1797
    # Capacity prices fitted on 800 of ~1617 training rows hold the (1 + 0.1) cap on all.
    assert stats["balance_ratio"] <= 1.1 + 1e-9
    assert sum(1 for name in artifacts if name.startswith("partition/shards/")) == 4


def test_without_faiss_auto_falls_back_to_sklearn(monkeypatch, separated):
    from partitioner import kmeans

    monkeypatch.setattr(kmeans, "faiss_available", lambda: False)
    assert kmeans.resolve_backend("auto") == "sklearn"
    with pytest.raises(InputError, match=r"kmeans.backend: faiss is not installed"):
        kmeans.resolve_backend("faiss")
    points, labels, _ = separated
    model = fit_model(points, KMeansSpec(clusters=5, backend="auto"))
    assert adjusted_rand_score(labels, model.assign(points)[0]) == 1.0


def test_config_reaches_the_sampled_hierarchical_fit(tmp_path):
    """partition.fit_rows / fine_clusters in YAML run the streaming k-means in the stage."""
    import os

    from rich.console import Console

    from orchestrator.pipeline import kmeans_spec, run_pipeline
    from orchestrator.state.config import parse_config
    from partitioner.stage import FIT_ROWS
    from runstore import storage
    from runstore.layout import RunLayout
    from tests.conftest import tiny_config

    raw = tiny_config(f"file://{tmp_path}", partition={"fit_rows": 600, "fine_clusters": 8})
    config = parse_config(raw)
    spec = kmeans_spec(config)
    assert (spec.sample_rows, spec.fine_clusters) == (600, 8)
    default = kmeans_spec(parse_config(tiny_config(f"file://{tmp_path}")))
    assert (default.sample_rows, default.fine_clusters) == (FIT_ROWS, None)
    run_pipeline(config, Console(file=open(os.devnull, "w")), until="partition")  # noqa: SIM115
    stats = storage.read_json(RunLayout(f"file://{tmp_path}/tiny-digits").partition_stats)
    assert len(stats["sizes"]) == 2 and all(size > 0 for size in stats["sizes"])
