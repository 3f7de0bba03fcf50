import copy
import json
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from orchestrator.control.expert_specs import expert_spec
from orchestrator.ensemble.snapshots import load_expert_at, snapshot_steps
from orchestrator.pipeline import partition_request
from orchestrator.state.config import IslandSpec, parse_config
from orchestrator.state.manifest import Manifest
from partitioner.stage import run_partition
from runstore import storage
from runstore.errors import InputError, LeaseLost
from runstore.layout import RunLayout
from runstore.log_parts import read_log
from tests.conftest import recipe, tiny_config
from worker.checkpoint import (
    TrainState,
    checkpoint_steps,
    load_checkpoint,
    save_checkpoint,
    verified_files,
)
from worker.flow import draw_noise, flow_loss
from worker.models import build_model
from worker.train import ExpertSpec, learning_rate, next_batch, train_expert


@pytest.fixture
def partitioned(tmp_path):
    config = parse_config(tiny_config(f"file://{tmp_path}"))
    layout = RunLayout(f"file://{tmp_path}/run")
    run_partition(partition_request(config), layout)
    return config, layout


def spec_for(config, layout, **changes) -> ExpertSpec:
    spec = expert_spec(config, layout, expert=0, island=IslandSpec(name="local-0", speed=1.0),
                       recipe=recipe(config))
    return ExpertSpec(**{**spec.__dict__, **changes})


def final_weights(layout: RunLayout) -> dict[str, torch.Tensor]:
    return load_tensors(storage.read_bytes(storage.join(layout.final(0), "model.safetensors")))


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model("unet", image_channels=1, channels=16, channel_mult=[1, 2], patch=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    t, noise = draw_noise(x0, torch.Generator().manual_seed(0))
    first = flow_loss(model, x0, t, noise).mean().item()
    for _ in range(30):
        loss = flow_loss(model, x0, t, noise).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.7 * first


def test_checkpoint_round_trip_restores_weights_optimizer_rng_and_position(tmp_path):
    model = build_model("unet", image_channels=1, channels=8, channel_mult=[1], patch=1)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 8, 8), torch.rand(2)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(3)
    state = TrainState(step=7, epoch=2, cursor=5, samples_seen=99)
    folder = f"file://{tmp_path}/ckpt"
    save_checkpoint(folder, model, ema, optimizer, generator, state)
    expected_draw = torch.rand(4, generator=generator)
    expected_global = torch.rand(3)

    other = build_model("unet", image_channels=1, channels=8, channel_mult=[1], patch=1)
    other_ema = copy.deepcopy(other)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    other_gen = torch.Generator().manual_seed(999)
    restored = load_checkpoint(folder, other, other_ema, other_opt, other_gen)
    assert restored == state
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, other.state_dict()[name])
    for key, slots in optimizer.state_dict()["state"].items():
        for name, value in slots.items():
            assert torch.equal(value, other_opt.state_dict()["state"][key][name])
    assert torch.equal(torch.rand(4, generator=other_gen), expected_draw)
    assert torch.equal(torch.rand(3), expected_global)


def test_damaged_checkpoint_is_refused(tmp_path):
    model = build_model("unet", image_channels=1, channels=8, channel_mult=[1], patch=1)
    optimizer = torch.optim.AdamW(model.parameters())
    folder = f"file://{tmp_path}/ckpt"
    save_checkpoint(folder, model, copy.deepcopy(model), optimizer, torch.Generator(),
                    TrainState())
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="sha256 mismatch"):
        load_checkpoint(folder, model, copy.deepcopy(model), optimizer, torch.Generator())


def test_batches_walk_epochs_without_repeats():
    spec = ExpertSpec(expert=0, model="unet", model_kwargs={}, steps=1, batch_size=4, lr=1,
                      warmup_steps=0, weight_decay=0, grad_clip=1, ema_decay=0.9,
                      checkpoint_every=1, keep_checkpoints=1, threads=1, log_every=1, seed=0)
    state = TrainState()
    first_epoch = torch.cat([next_batch(spec, state, 10) for _ in range(2)]).tolist()
    tail = next_batch(spec, state, 10).tolist()  # 2 from epoch 0, 2 from epoch 1
    assert len(set(first_epoch + tail[:2])) == 10
    assert state.epoch == 1 and state.cursor == 2


def snapshot_files(layout: RunLayout, step: int) -> dict[str, bytes]:
    return verified_files(layout.snapshot(0, step))


def test_resumed_training_is_bit_identical_and_keeps_its_snapshots(partitioned):
    config, layout = partitioned
    spec = spec_for(config, layout, steps=20, checkpoint_every=5, keep_checkpoints=10,
                    snapshot_at=(0.25, 0.6, 1.0))
    result = train_expert(spec, layout, log=lambda _: None)
    straight = final_weights(layout)
    assert result.steps == 20 and result.resumed_from == 0
    assert checkpoint_steps(layout.checkpoints(0)) == [5, 10, 15, 20]
    assert checkpoint_steps(layout.snapshots(0)) == [5, 12, 20]
    kept = {step: snapshot_files(layout, step) for step in (5, 12)}
    meta_12 = storage.join(layout.snapshot(0, 12), "meta.json")
    stamp_12 = storage.filesystem(meta_12)[0].modified(meta_12.removeprefix("file://"))

    # Pretend the worker died at step 17, after the snapshot at 12: drop the later
    # checkpoints, the last snapshot and the final weights. It resumes from step 10.
    for step in (15, 20):
        storage.remove(layout.checkpoint(0, step))
    storage.remove(layout.snapshot(0, 20))
    storage.remove(layout.final(0))
    resumed = train_expert(spec, layout, log=lambda _: None)
    assert resumed.resumed_from == 10
    again = final_weights(layout)
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    # The snapshots before the crash are untouched (12 was not written again), 20 is back,
    # and the result lists all three for the manifest.
    assert checkpoint_steps(layout.snapshots(0)) == [5, 12, 20]
    assert {step: snapshot_files(layout, step) for step in (5, 12)} == kept
    assert storage.filesystem(meta_12)[0].modified(meta_12.removeprefix("file://")) == stamp_12
    listed = {path for path in resumed.artifacts if "/snapshots/" in path}
    assert listed == {f"experts/expert-0/snapshots/step-{step:08d}/{name}"
                      for step in (5, 12, 20)
                      for name in ("ema.safetensors", "model.safetensors", "meta.json")}
    # The last snapshot is the final step: its EMA is the final weights.
    assert load_tensors(snapshot_files(layout, 20)["ema.safetensors"]).keys() == again.keys()
    assert all(torch.equal(v, again[k]) for k, v in
               load_tensors(snapshot_files(layout, 20)["ema.safetensors"]).items())


def test_half_written_newest_checkpoint_falls_back_to_previous(partitioned):
    config, layout = partitioned
    spec = spec_for(config, layout, steps=10, checkpoint_every=5, keep_checkpoints=5)
    train_expert(spec, layout, log=lambda _: None)
    storage.remove(storage.join(layout.checkpoint(0, 10), "meta.json"))  # crash mid-write
    storage.remove(layout.final(0))
    messages = []
    result = train_expert(spec, layout, log=messages.append)
    assert result.resumed_from == 5
    assert any("skipping checkpoint step 10" in m for m in messages)


def test_old_checkpoints_are_pruned(partitioned):
    config, layout = partitioned
    spec = spec_for(config, layout, steps=20, checkpoint_every=5, keep_checkpoints=2)
    train_expert(spec, layout, log=lambda _: None)
    assert checkpoint_steps(layout.checkpoints(0)) == [15, 20]


def test_expert_branches_from_seed_weights(partitioned):
    config, layout = partitioned
    donor = build_model("unet", **spec_for(config, layout).model_kwargs)
    with torch.no_grad():
        for parameter in donor.parameters():
            parameter.fill_(0.5)
    seed_url = f"{layout.root}/seed.safetensors"
    storage.write_bytes(seed_url, save_tensors(donor.state_dict()))
    spec = spec_for(config, layout, steps=1, lr=1e-12, init_from=seed_url)
    train_expert(spec, layout, log=lambda _: None)
    weights = final_weights(layout)
    conv = weights["stem.weight"]
    assert torch.allclose(conv, torch.full_like(conv, 0.5), atol=1e-6)


def test_seed_model_trains_on_every_shard(partitioned):
    config, layout = partitioned
    spec = spec_for(config, layout, expert=-1, steps=2, shard_clusters=(0, 1))
    result = train_expert(spec, layout, log=lambda _: None)
    stats = storage.read_json(layout.partition_stats)
    meta = storage.read_json(f"{layout.final(-1)}/meta.json")
    assert meta["rows"] == sum(stats["sizes"])
    assert any(path.startswith("experts/seed/final/") for path in result.artifacts)


def test_background_checkpoints_match_synchronous_ones(partitioned, tmp_path):
    """Checkpoints stored while training goes on hold exactly their step's state."""
    config, layout = partitioned
    spec = spec_for(config, layout, steps=12, checkpoint_every=4, keep_checkpoints=5)
    train_expert(spec, layout, log=lambda _: None)
    other = RunLayout(f"file://{tmp_path}/sync")  # same shard, checkpoints written in-step
    storage.write_bytes(other.shard(0), storage.read_bytes(layout.shard(0)))
    train_expert(replace(spec, async_checkpoints=False), other, log=lambda _: None)
    for step in (4, 8, 12):
        ours = verified_files(layout.checkpoint(0, step))
        assert ours == verified_files(other.checkpoint(0, step))
    text = read_log(layout.expert_log(0))
    assert "checkpoint at step 12 stored in" in text  # collected before train_expert returned


def test_a_failed_background_write_fails_the_expert(partitioned, monkeypatch):
    config, layout = partitioned

    def full_disk(*_: object, **__: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("worker.train.write_checkpoint", full_disk)
    with pytest.raises(OSError, match="disk full"):
        train_expert(spec_for(config, layout, steps=10, checkpoint_every=5), layout,
                     log=lambda _: None)


def test_a_worker_of_an_older_lease_epoch_publishes_nothing(partitioned, monkeypatch):
    config, layout = partitioned
    # The takeover lands after each of the worker's own checks of its driver, just before
    # it commits: the commit's fence alone must refuse.
    monkeypatch.setattr("worker.train.check_driver", lambda *_: None)
    storage.write_json(layout.lease, {"epoch": 2})  # a newer driver took the run over
    with pytest.raises(LeaseLost, match="epoch 1, and another driver took the run over"):
        train_expert(spec_for(config, layout, steps=10, checkpoint_every=5, epoch=1), layout,
                     log=lambda _: None)
    folders = storage.listdir(layout.checkpoints(0))
    assert folders  # its files were written, but never committed:
    assert not any(storage.exists(storage.join(layout.checkpoint(0, int(name[5:])), "meta.json"))
                   for name in folders)
    assert not storage.exists(storage.join(layout.final(0), "meta.json"))

    result = train_expert(spec_for(config, layout, steps=10, checkpoint_every=5, epoch=2),
                          layout, log=lambda _: None)
    assert result.resumed_from == 0  # the uncommitted checkpoints were not trusted
    assert storage.exists(storage.join(layout.final(0), "meta.json"))


def test_a_diverged_loss_or_weights_fail_the_attempt_and_commit_nothing_diverged(partitioned,
                                                                                  tmp_path):
    config, layout = partitioned
    # lr 1e30: step 1 moves the weights to ~1e30 (finite), step 2's loss overflows.
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2"):
        train_expert(spec_for(config, layout, steps=6, lr=1e30, warmup_steps=0, log_every=1,
                              checkpoint_every=1, keep_checkpoints=10), layout,
                     log=lambda _: None)
    assert checkpoint_steps(layout.checkpoints(0)) == [1]
    state = load_tensors(storage.read_bytes(storage.join(layout.checkpoint(0, 1),
                                                         "model.safetensors")))
    assert all(tensor.isfinite().all() for tensor in state.values())
    assert not storage.exists(layout.final(0))
    assert "non-finite loss at step 2" in read_log(layout.expert_log(0))

    # lr inf: the loss of step 1 is finite, the weights after it are not; nothing is stored.
    other = RunLayout(f"file://{tmp_path}/inf")
    storage.write_bytes(other.shard(0), storage.read_bytes(layout.shard(0)))
    with pytest.raises(FloatingPointError, match="non-finite weights at step 1"):
        train_expert(spec_for(config, other, steps=6, lr=float("inf"), warmup_steps=0,
                              log_every=3, checkpoint_every=1), other, log=lambda _: None)
    assert checkpoint_steps(other.checkpoints(0)) == []
    assert not storage.exists(other.final(0))


def test_a_worker_stops_once_its_driver_is_gone(partitioned):
    config, layout = partitioned
    now = time.time()
    # Its driver stopped renewing a 10 s lease 100 s ago: gone, clocks' room included.
    storage.write_json(layout.lease, {"epoch": 1, "renewed": now - 100, "expires": now - 90})
    with pytest.raises(LeaseLost, match="stopped renewing the run's lease"):
        train_expert(spec_for(config, layout, steps=200, checkpoint_every=2, epoch=1), layout,
                     log=lambda _: None)
    assert checkpoint_steps(layout.checkpoints(0)) == []

    # A live lease: training goes on until another driver takes the run over, then the
    # worker stops at its next checkpoint, before storing it.
    storage.write_json(layout.lease, {"epoch": 1, "renewed": now, "expires": now + 600})

    def taken_over_at_step_3(row: dict) -> None:
        if row["step"] == 3:
            storage.write_json(layout.lease, {"epoch": 2, "renewed": time.time(),
                                              "expires": time.time() + 600})

    with pytest.raises(LeaseLost, match=r"took the run over \(epoch 2\): it stops"):
        train_expert(spec_for(config, layout, steps=200, checkpoint_every=4, log_every=1,
                              keep_checkpoints=10, epoch=1), layout,
                     progress=taken_over_at_step_3, log=lambda _: None)
    assert checkpoint_steps(layout.checkpoints(0)) == [] and not storage.listdir(
        layout.checkpoints(0))  # not even the files of step 4 were written

    storage.write_json(layout.lease, {"epoch": 2, "released": now, "renewed": now,
                                      "expires": now})
    with pytest.raises(LeaseLost, match="released the run's lease"):
        train_expert(spec_for(config, layout, steps=200, checkpoint_every=2, epoch=2), layout,
                     log=lambda _: None)


def test_snapshots_are_in_the_manifest_and_load_as_ema_or_raw(partitioned):
    config, layout = partitioned
    spec = spec_for(config, layout, steps=4, checkpoint_every=2, keep_checkpoints=1,
                    snapshot_at=(0.5, 1.0))
    result = train_expert(spec, layout, log=lambda _: None)
    assert checkpoint_steps(layout.checkpoints(0)) == [4]  # pruned; the snapshots are not
    manifest = Manifest.open(layout, "run", clusters=1)
    manifest.start_attempt(0, "local-0")
    manifest.end_attempt(0, "done", "finished", step=4, artifacts=result.artifacts)
    assert snapshot_steps(manifest, 0) == [2, 4]
    assert manifest.expert_done(0)
    meta = json.loads(manifest.read_verified("experts/expert-0/snapshots/step-00000002/meta.json"))
    assert meta["step"] == 2 and meta["samples_seen"] == 2 * spec.batch_size
    assert meta["train_flops"] == pytest.approx(result.train_flops / 2)

    def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    raw_2, ema_2 = (weights_of(load_expert_at(manifest, 0, 2, kind)) for kind in ("raw", "ema"))
    raw_final = weights_of(load_expert_at(manifest, 0, None, "raw"))
    ema_final = weights_of(load_expert_at(manifest, 0, None, "ema"))
    raw_4 = weights_of(load_expert_at(manifest, 0, 4, "raw"))
    assert all(torch.equal(raw_final[k], raw_4[k]) for k in raw_final)
    assert all(torch.equal(ema_final[k], final_weights(layout)[k]) for k in ema_final)
    assert not all(torch.equal(raw_2[k], ema_2[k]) for k in raw_2)  # the EMA lags the raw
    assert not all(torch.equal(raw_2[k], raw_final[k]) for k in raw_2)
    with pytest.raises(InputError, match="no snapshot at step 3"):
        load_expert_at(manifest, 0, 3, "raw")


def test_constant_schedule_is_flat_after_the_warm_up():
    spec = ExpertSpec(expert=0, model="unet", model_kwargs={}, steps=100, batch_size=4,
                      lr=1e-3, warmup_steps=10, weight_decay=0, grad_clip=1, ema_decay=0.9,
                      checkpoint_every=1, keep_checkpoints=1, threads=1, log_every=1, seed=0)
    constant = replace(spec, lr_schedule="constant")
    assert [learning_rate(constant, s) for s in range(10)] == pytest.approx(
        [1e-3 * (s + 1) / 10 for s in range(10)])
    assert {learning_rate(constant, s) for s in range(9, 100)} == {1e-3}
    assert learning_rate(spec, 99) < 0.2e-3  # the default still decays
