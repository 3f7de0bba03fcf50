"""wandb: each expert its own run, grouped under the run, with its island and hardware."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq

from orchestrator.control.expert_specs import expert_spec
from orchestrator.pipeline import partition_request
from orchestrator.state.config import IslandSpec, parse_config
from partitioner.stage import run_partition
from runstore.layout import RunLayout
from tests.conftest import recipe, tiny_config
from worker import train
from worker.tracking import WandbRun, wandb_mode


def test_auto_mode_is_online_only_with_a_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's explicit choice wins
    assert wandb_mode("auto") == "disabled"


def test_expert_run_records_its_island_and_hardware(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    raw = tiny_config(f"file://{tmp_path}", experts={"steps": 10}, tracking={"wandb": "auto"})
    config = parse_config(raw)
    layout = RunLayout(f"file://{tmp_path}/run")
    run_partition(partition_request(config), layout)
    island = IslandSpec(name="beta", speed=2.0, cpus=1, slots=1)
    spec = expert_spec(config, layout, 1, island, recipe(config))
    assert spec.tracking["group"] == config.run and spec.tracking["mode"] == "auto"
    runs: list[WandbRun] = []

    class Kept(WandbRun):  # the real wandb run, kept so its config can be read back
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            runs.append(self)

    monkeypatch.setattr(train, "WandbRun", Kept)
    train.train_expert(spec, layout, log=lambda _: None)
    assert len(runs) == 1 and runs[0].run is not None
    recorded = dict(runs[0].run.config)
    assert runs[0].run.group == config.run and runs[0].run.offline
    assert recorded["island"] == "beta"
    assert recorded["hardware"]["speed"] == 2.0 and recorded["hardware"]["cpus"] == 1
    assert recorded["micro_batch"] == 16 and recorded["world"] == 1
    assert recorded["device"] == "cpu"
    assert list(Path(tmp_path, "run", "wandb").rglob("*.wandb")), "no offline run on disk"


class Outage(RuntimeError):
    pass


class BrokenRun:
    """A wandb run whose service went away after init: every call raises."""

    def log(self, *_: object, **__: object) -> None:
        raise Outage("wandb.ai unreachable\nretrying")

    def finish(self) -> None:
        raise Outage("still unreachable")


def test_a_wandb_outage_never_fails_training_and_metrics_still_reach_parquet(tmp_path,
                                                                             monkeypatch):
    import wandb

    config = parse_config(tiny_config(f"file://{tmp_path}", tracking={"wandb": "online"}))
    layout = RunLayout(f"file://{tmp_path}/run")
    run_partition(partition_request(config), layout)
    spec = expert_spec(config, layout, 0, IslandSpec(name="local-0", speed=1.0),
                       recipe(config))
    spec = type(spec)(**{**spec.__dict__, "steps": 10})

    def down(**_: object) -> None:
        raise Outage("wandb.ai unreachable")

    for name, init in (("init", down), ("log", lambda **_: BrokenRun())):
        monkeypatch.setattr(wandb, "init", init)
        lines: list[str] = []
        result = train.train_expert(spec, layout, log=lines.append)
        assert result.steps == 10 and result.artifacts
        said = [line for line in lines if "wandb" in line]
        assert len(said) == 1 and f"wandb {name} failed (Outage: wandb.ai unreachable)" in said[0]
        metrics = pq.read_table(Path(tmp_path, "run", "experts", "expert-0", "metrics.parquet"))
        assert metrics.column("step").to_pylist()[-1] == 10
        for folder in ("final", "checkpoints"):  # trained again from scratch next round
            shutil.rmtree(Path(tmp_path, "run", "experts", "expert-0", folder))
