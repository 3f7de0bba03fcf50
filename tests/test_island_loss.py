"""Losing an island mid-run: a multi-node Ray cluster on 127.0.0.1 (head = island alpha,
a second node = island beta); beta's node is killed while it trains; its expert moves to
alpha and the run completes."""

import json
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import has_complete_checkpoint, tiny_config
from tests.ray_nodes import LoopbackCluster, auth_env


@pytest.fixture
def cluster():
    nodes = LoopbackCluster()
    try:
        nodes.start_head(cpus=1, resources={"island:alpha": 1})
        nodes.add_node("beta", cpus=1, resources={"island:beta": 1})
        nodes.wait_for_resources({"island:alpha", "island:beta"})
        yield nodes
    finally:
        nodes.stop()


def test_lost_island_moves_its_expert_and_the_run_completes(cluster, tmp_path):
    raw = tiny_config(f"file://{tmp_path}/store", run="islandloss",
                      experts={"steps": 200, "checkpoint_every": 20},
                      islands={"address": cluster.address,
                               "pool": [{"name": "alpha"}, {"name": "beta"}]})
    config = tmp_path / "loss.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "store" / "islandloss"
    log = (tmp_path / "driver.log").open("wb")
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli.main", "run", str(config)],
                              env=auth_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        victim = None
        deadline = time.time() + 180
        while time.time() < deadline and victim is None and driver.poll() is None:
            time.sleep(0.2)
            manifest_file = run_dir / "manifest.json"
            if not manifest_file.exists():
                continue
            manifest = json.loads(manifest_file.read_text())
            for key, entry in manifest["experts"].items():
                checkpoints = run_dir / "experts" / f"expert-{key}" / "checkpoints"
                if entry.get("island") == "beta" and has_complete_checkpoint(checkpoints):
                    victim = key
        assert victim is not None, "no expert trained on beta before the deadline"
        assert cluster.kill_node("beta") > 0
        assert driver.wait(timeout=240) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    attempts = manifest["experts"][victim]["attempts"]
    assert attempts[0]["island"] == "beta"
    assert attempts[-1]["island"] == "alpha" and attempts[-1]["reason"] == "finished"
    assert attempts[-1]["resumed_from"] >= 20  # continued from beta's checkpoint
    assert all(stage["state"] == "done" for stage in manifest["stages"].values())
