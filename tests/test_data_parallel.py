"""Equal effective batch on every island: micro-batches with gradient accumulation, and
data parallelism inside an island, train the same model as one worker with the full batch."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console
from safetensors.torch import load as load_tensors

from orchestrator.control.expert_specs import expert_spec
from orchestrator.pipeline import partition_request, run_pipeline
from orchestrator.state.config import IslandSpec, parse_config
from orchestrator.state.manifest import Manifest
from partitioner.stage import run_partition
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from runstore.log_parts import read_log
from tests.conftest import recipe, tiny_config
from worker.batching import HEADROOM, estimate_memory, plan_batch
from worker.models import build_model
from worker.objectives import make_objective
from worker.train import shard_urls, train_expert


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


def losses(layout: RunLayout, expert: int) -> list[float]:
    return pq.read_table(layout.metrics(expert).removeprefix("file://")).column("loss").to_pylist()


def weights(layout: RunLayout, expert: int) -> dict[str, torch.Tensor]:
    return load_tensors(storage.read_bytes(storage.join(layout.final(expert),
                                                        "model.safetensors")))


def assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_plan_picks_the_largest_micro_batch_that_fits():
    memory = type("M", (), {"fixed_bytes": 1000, "bytes_per_sample": 2**20})()
    # Room for 5 samples after the fixed part: the largest divisor of 16 under 5 is 4.
    gb = (1000 + 5.5 * 2**20) / HEADROOM / 2**30
    plan = plan_batch(16, 1, gb, memory)
    assert (plan.micro, plan.accumulation) == (4, 4)
    plan = plan_batch(16, 2, gb, memory)
    assert (plan.micro, plan.accumulation, plan.share) == (4, 2, 8)
    assert plan_batch(16, 2, None, memory).micro == 8
    with pytest.raises(InputError, match="does not split evenly"):
        plan_batch(16, 3, None, None, "x")
    with pytest.raises(InputError, match="memory_gb"):
        plan_batch(16, 1, 1e-9, memory, "x")


@pytest.fixture
def partitioned(tmp_path):
    config = parse_config(tiny_config(f"file://{tmp_path}", experts={"log_every": 1}))
    layout = RunLayout(f"file://{tmp_path}/run")
    run_partition(partition_request(config), layout)
    return config, layout


def test_memory_estimate_grows_with_the_model(partitioned):
    config, layout = partitioned
    spec = expert_spec(config, layout, 0, IslandSpec(name="a", speed=1.0), recipe(config))
    objective = make_objective("flow", shard_urls(spec, layout))
    small = estimate_memory(build_model("unet", image_channels=1, channels=8,
                                        channel_mult=[1], patch=1), objective)
    large = estimate_memory(build_model("unet", image_channels=1, channels=32,
                                        channel_mult=[1, 2], patch=1), objective)
    assert 0 < small.bytes_per_sample < large.bytes_per_sample
    assert 0 < small.fixed_bytes < large.fixed_bytes


def memory_for(config, layout: RunLayout, samples: int) -> float:
    """GB in which training this config's expert fits `samples` at once, and no more."""
    spec = expert_spec(config, layout, 0, IslandSpec(name="a", speed=1.0), recipe(config))
    objective = make_objective("flow", shard_urls(spec, layout))
    memory = estimate_memory(build_model(spec.model, **spec.model_kwargs), objective)
    return (memory.fixed_bytes + (samples + 0.5) * memory.bytes_per_sample) / HEADROOM / 2**30


def test_accumulated_micro_batches_train_the_same_model_as_the_full_batch(partitioned, tmp_path):
    config, layout = partitioned
    full = expert_spec(config, layout, 0, IslandSpec(name="a", speed=1.0), recipe(config))
    # Memory for 4 samples at once: micro-batch 4, accumulated 4 times to the batch of 16.
    gb = memory_for(config, layout, 4)
    other = RunLayout(f"file://{tmp_path}/other")
    shutil.copytree(layout.partition.removeprefix("file://"),
                    other.partition.removeprefix("file://"))
    train_expert(full, layout, log=lambda _: None)
    micro = train_expert(replace(full, memory_gb=gb), other, log=lambda _: None)
    meta = storage.read_json(storage.join(other.final(0), "meta.json"))
    assert (meta["micro_batch"], meta["accumulation"]) == (4, 4)
    assert micro.samples_seen == full.steps * full.batch_size
    assert "micro-batch 4 x accumulation 4" in read_log(other.expert_log(0))
    torch.testing.assert_close(losses(other, 0), losses(layout, 0), rtol=1e-4, atol=1e-5)
    assert_same_model(weights(other, 0), weights(layout, 0))


def run_until_experts(tmp_path, name: str, pool: list[dict], **experts) -> RunLayout:
    raw = tiny_config(f"file://{tmp_path}/{name}", experts={"log_every": 1, **experts},
                      islands={"pool": pool})
    run_pipeline(parse_config(raw), quiet(), until="experts")
    return RunLayout(f"file://{tmp_path}/{name}/tiny-digits")


def test_ddp_inside_an_island_matches_one_worker_with_the_full_batch(ray_session, tmp_path):
    """Two gloo workers on one island, each half of every batch, against one worker."""
    single = run_until_experts(tmp_path, "single", [
        {"name": "local-0", "speed": 1.0}, {"name": "local-1", "speed": 1.0}])
    ddp = run_until_experts(tmp_path, "ddp", [
        {"name": "local-0", "speed": 1.0, "workers": 2, "cpus": 2}], steps=30)
    for expert in (0, 1):
        meta = storage.read_json(storage.join(ddp.final(expert), "meta.json"))
        assert meta["world"] == 2 and meta["micro_batch"] == 8
        torch.testing.assert_close(losses(ddp, expert), losses(single, expert),
                                   rtol=1e-4, atol=1e-5)
        assert_same_model(weights(ddp, expert), weights(single, expert))


def test_islands_with_different_memory_keep_the_same_effective_batch(ray_session, tmp_path,
                                                                     partitioned):
    small = memory_for(*partitioned, 2)
    layout = run_until_experts(tmp_path, "mixed", [
        {"name": "local-0", "speed": 1.0, "memory_gb": small},
        {"name": "local-1", "speed": 1.0}])
    manifest = Manifest.load(layout)
    plans = {}
    for expert in (0, 1):
        meta = storage.read_json(storage.join(layout.final(expert), "meta.json"))
        island = manifest.expert(expert)["island"]
        plans[island] = (meta["micro_batch"], meta["accumulation"], meta["world"])
        assert meta["micro_batch"] * meta["accumulation"] * meta["world"] == 16
        assert manifest.expert(expert)["samples_seen"] == 30 * 16
    assert plans["local-1"] == (16, 1, 1)
    assert plans["local-0"] == (2, 8, 1)


def test_islands_without_a_speed_are_calibrated_once(ray_session, tmp_path):
    layout = run_until_experts(tmp_path, "calibrated", [
        {"name": "local-0", "workers": 2, "cpus": 2}, {"name": "local-1"}])
    measured = storage.read_json(layout.calibration)
    assert set(measured) == {"local-0", "local-1"}
    assert all(entry["samples_per_s"] > 0 for entry in measured.values())
    speeds = Manifest.load(layout).data["placement"]["speeds"]
    # Two data-parallel workers count twice one worker's measured throughput.
    assert speeds["local-0"] == pytest.approx(2 * measured["local-0"]["samples_per_s"])
    assert speeds["local-1"] == pytest.approx(measured["local-1"]["samples_per_s"])
    stamp = {name: entry["measured"] for name, entry in measured.items()}
    manifest = Manifest.load(layout)
    for k in (0, 1):  # force the experts to run again: the calibration is reused
        manifest.expert(k).update(state="pending", artifacts={})
    manifest.stage("experts").update(state="pending")
    manifest.save()
    raw = tiny_config(f"file://{tmp_path}/calibrated", experts={"log_every": 1},
                      islands={"pool": [{"name": "local-0", "workers": 2, "cpus": 2},
                                        {"name": "local-1"}]})
    run_pipeline(parse_config(raw), quiet(), until="experts")
    assert {name: entry["measured"] for name, entry in
            storage.read_json(layout.calibration).items()} == stamp


def test_a_collected_worker_leaves_the_wait_list(ray_session):
    """The driver waits on `pending()`: a worker collected first (rank 0 often ends first)
    must leave it, or ray.wait returns it forever and its gang-mates are never collected."""
    import ray

    from orchestrator.control.ray_tasks import RayAttempt

    first, second = ray.put(0), ray.put(1)
    gang = RayAttempt(expert=0, island="a", refs=[first, second])
    assert gang.pending() == [first, second]
    gang.done[0] = {"rank": 0}
    assert gang.pending() == [second]
    ready, _ = ray.wait(gang.pending(), num_returns=1, timeout=5)
    assert ready == [second]
    gang.done[1] = {"rank": 1}
    assert gang.pending() == []
