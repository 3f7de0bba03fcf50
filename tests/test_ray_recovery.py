"""Training on Ray that goes wrong underneath the experts: a gang's placement group that
no island can hold, and the embedded Ray's node dying under a run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from orchestrator.control.expert_specs import expert_spec
from orchestrator.control.ray_launcher import RayLauncher
from orchestrator.state.config import IslandSpec, parse_config
from runstore.errors import InputError
from runstore.layout import RunLayout
from tests.conftest import REPO, has_complete_checkpoint, recipe, tiny_config


def test_a_placement_group_no_island_can_hold_fails_naming_what_it_lacks(ray_session,
                                                                         tmp_path):
    """Two workers of 4 CPUs each on an island whose node has 2: never schedulable. The
    attempt fails once the timeout passes, as an input error about that island (so the
    controller moves the expert, see test_controller's unfit-island test)."""
    config = parse_config(tiny_config(f"file://{tmp_path}/store", run="unplaced",
                                      fault_tolerance={"placement_timeout_seconds": 1}))
    island = IslandSpec(name="local-0", speed=1.0, workers=2, cpus=8)
    layout = RunLayout(f"file://{tmp_path}/store/unplaced")
    spec = expert_spec(config, layout, 0, island, recipe(config))
    launcher = RayLauncher(layout.root, config.fault_tolerance.placement_timeout_seconds)
    attempt = launcher.start(spec, island)
    try:
        deadline = time.monotonic() + 60
        ended = []
        while not ended and time.monotonic() < deadline:
            ended = launcher.poll(timeout=0.2)
    finally:
        launcher.close()
    assert [end.attempt for end in ended] == [attempt]
    error = ended[0].error
    assert isinstance(error, InputError) and error.where == "islands.pool[local-0]"
    assert "not scheduled within 1 s" in error.problem
    assert "island local-0 lacks CPU 8 (its nodes have 2)" in error.problem
    assert launcher.live == [] and attempt.group is None  # the group was removed


def test_placement_timeout_must_be_positive():
    with pytest.raises(InputError, match=r"fault_tolerance\.placement_timeout_seconds"):
        parse_config(tiny_config("file:///x", fault_tolerance={"placement_timeout_seconds": 0}))


def kill_node_after_checkpoint(driver: int, run_dir: Path, deadline: float) -> list[str]:
    """Once expert 0 has a complete checkpoint, SIGKILL the raylet of the driver's own
    embedded Ray and the expert workers under it, as when the node dies. Only this
    driver's descendants are searched: no other Ray on the machine is touched."""
    checkpoints = run_dir / "experts" / "expert-0" / "checkpoints"
    while time.time() < deadline:
        if has_complete_checkpoint(checkpoints):
            killed = []
            for proc in psutil.Process(driver).children(recursive=True):
                try:
                    title = " ".join(proc.cmdline()[:1])  # a Ray worker's: ray::<task name>
                    if proc.name() == "raylet" or title.startswith("ray::expert-"):
                        proc.kill()
                        killed.append(proc.name())
                except psutil.Error:  # ended meanwhile
                    continue
            return killed
        time.sleep(0.05)
    return []


def test_the_embedded_ray_is_restarted_when_its_node_dies(tmp_path):
    """A driver with its own embedded Ray (a subprocess, in its own Ray temp dir, beside
    the session's Ray) loses its node mid-training: it starts Ray again and the experts
    continue from their checkpoints. The attempts the node took down are recorded as a
    lost node, which uses no retry (max_retries 0: a crash would fail the expert). That a
    resumed expert ends bit for bit as an uninterrupted one is test_fault_tolerance's."""
    config = tmp_path / "nodekill.yaml"
    config.write_text(yaml.safe_dump(tiny_config(
        f"file://{tmp_path}/store", run="nodekill",
        experts={"steps": 40, "checkpoint_every": 10},
        fault_tolerance={"max_retries": 0})))
    run_dir = tmp_path / "store" / "nodekill"
    # Short: Ray's unix sockets live under its temp dir and have a length limit.
    ray_tmp = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONPATH=str(REPO))
    log = tmp_path / "driver.log"
    with log.open("wb") as out:
        driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli.main", "run",
                                   str(config), "--until", "experts"],
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        killed = kill_node_after_checkpoint(driver.pid, run_dir, time.time() + 180)
        assert "raylet" in killed, "expert 0 finished before its node could be killed"
        assert driver.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for key in ("0", "1"):
        attempts = manifest["experts"][key]["attempts"]
        assert manifest["experts"][key]["state"] == "done"
        assert attempts[-1]["reason"] == "finished"
        # Every attempt before the last ended with the node, none as a crash.
        assert {attempt["cause"] for attempt in attempts[:-1]} <= {"lost node"}
    first = manifest["experts"]["0"]["attempts"]
    assert first[0]["cause"] == "lost node" and first[-1]["resumed_from"] >= 10
