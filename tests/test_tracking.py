"""wandb: each expert its own run, grouped under the run, with its island and hardware."""

from __future__ import annotations

import json
import re
from pathlib import Path

from orchestrator.config import IslandSpec, parse_config
from orchestrator.experts import expert_spec
from orchestrator.pipeline import partition_request
from partitioner.stage import run_partition
from runstore.layout import RunLayout
from tests.conftest import tiny_config
from worker.tracking import wandb_mode
from worker.train import train_expert


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
    spec = expert_spec(config, layout, 1, island, 1)
    assert spec.tracking["group"] == config.run and spec.tracking["mode"] == "auto"
    train_expert(spec, layout, log=lambda _: None)
    found = list(Path(tmp_path, "run", "wandb").rglob("*.wandb"))
    assert len(found) == 1, "wandb wrote no offline run"
    recorded = config_items(found[0].read_bytes())
    assert recorded["island"] == "beta"
    assert recorded["hardware"]["speed"] == 2.0 and recorded["hardware"]["cpus"] == 1
    assert recorded["micro_batch"] == 16 and recorded["world"] == 1
    assert recorded["device"] == "cpu"


def varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7


def config_items(data: bytes) -> dict:
    """Config items of an offline run file: protobuf ConfigItem(key=1, value_json=16)."""
    items = {}
    for match in re.finditer(rb"\n([\x01-\x7f])", data):
        start = match.end()
        key = data[start : start + match.group(1)[0]]
        tag = start + len(key)
        if not re.fullmatch(rb"[a-z_]+", key) or data[tag : tag + 2] != b"\x82\x01":
            continue
        length, at = varint(data, tag + 2)
        try:
            items[key.decode()] = json.loads(data[at : at + length])
        except ValueError:
            continue
    return items
