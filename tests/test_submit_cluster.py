"""Submitting to a real multi-node Ray cluster on 127.0.0.1 through Ray's job API.

The head (island alpha, with the dashboard), node beta (island:beta resource, two slots,
two CPUs) and node gamma (found by its node label) are started by the test with token
authentication on. Through the CLI only: islands, submit, status, logs, cancel, resume;
the resumed run ends bit-identical to one that was never interrupted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from runstore import storage
from tests.conftest import tiny_config
from tests.ray_nodes import RAY, LoopbackCluster, auth_env

POOL = [{"name": "alpha", "speed": 1.0},
        {"name": "beta", "speed": 2.0, "slots": 2},
        {"name": "gamma", "speed": 1.0, "node_labels": {"islands/island": "gamma"}}]


@pytest.fixture(scope="module")
def cluster():
    nodes = LoopbackCluster()
    try:
        nodes.start_head(cpus=1, resources={"island:alpha": 1}, dashboard=True)
        nodes.add_node("beta", cpus=2, resources={"island:beta": 2})
        nodes.add_node("gamma", cpus=1, resources={}, labels={"islands/island": "gamma"})
        nodes.wait_for_resources({"island:alpha", "island:beta"}, nodes=3, timeout=120)
        yield nodes
    finally:
        nodes.stop()


def islands(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli.main", *args],
                          env={**auth_env(), "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=timeout)


def write(tmp_path: Path, name: str, raw: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_config(tmp_path: Path, store: str, **islands_section) -> dict:
    return tiny_config(f"file://{tmp_path}/{store}", run="submitted",
                       partition={"clusters": 4},
                       experts={"steps": 300, "checkpoint_every": 25, "log_every": 10},
                       islands={"pool": POOL, **islands_section})


def manifest_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_islands_report_shows_resource_and_label_islands(cluster, tmp_path):
    config = write(tmp_path, "report", run_config(tmp_path, "store"))
    result = islands("islands", str(config), "--address", cluster.address)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("alpha", "beta", "gamma"):
        assert name in result.stdout
    assert "missing" not in result.stdout


def test_submit_refuses_an_island_the_cluster_lacks_at_once(cluster, tmp_path):
    raw = run_config(tmp_path, "store")
    raw["islands"]["pool"] = [*POOL, {"name": "delta", "speed": 1.0}]
    started = time.monotonic()
    result = islands("submit", str(write(tmp_path, "missing", raw)), "--address",
                     cluster.dashboard, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "delta" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "store" / "submitted" / "submission.json").exists()
    assert time.monotonic() - started < 60


def test_submit_status_logs_cancel_resume_on_the_cluster(cluster, tmp_path):
    config = write(tmp_path, "submitted", run_config(tmp_path, "store"))
    run_dir = tmp_path / "store" / "submitted"
    result = islands("submit", str(config), "--address", cluster.dashboard)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"file://{run_dir}"
    job = json.loads((run_dir / "submission.json").read_text())
    assert job["kind"] == "ray-job"

    def training() -> bool:
        if not (run_dir / "manifest.json").exists():
            return False
        experts = manifest_of(run_dir)["experts"].values()
        return sum(entry.get("step", 0) >= 50 for entry in experts) >= 2

    wait_until(training, 240, "two experts past step 50")
    status = islands("status", str(run_dir))
    assert status.returncode == 0 and "running" in status.stdout, status.stdout
    expert_log = islands("logs", str(run_dir), "--expert", "0")
    assert "attempt 1 on island" in expert_log.stdout, expert_log.stdout
    unasked = islands("logs", str(run_dir))  # the dashboard is asked only when named
    assert unasked.returncode == 2 and "--address" in unasked.stderr, unasked.stderr
    driver_log = islands("logs", str(run_dir), "--address", cluster.dashboard)
    assert "partition: 4 clusters" in driver_log.stdout, driver_log.stdout

    cancelled = islands("cancel", str(run_dir))
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    manifest = manifest_of(run_dir)
    assert manifest["stages"]["experts"]["state"] == "cancelled"
    assert any(entry["attempts"] and entry["attempts"][-1]["reason"] == "cancelled by the user"
               for entry in manifest["experts"].values())
    assert any((run_dir / "experts" / f"expert-{k}" / "checkpoints").exists() for k in range(4))

    resumed = islands("resume", f"file://{run_dir}", "--address", cluster.dashboard)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    watched = islands("status", str(run_dir), "--watch", "--interval", "1", "--address",
                      cluster.dashboard, timeout=420)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    manifest = manifest_of(run_dir)
    assert all(entry["state"] == "done" for entry in manifest["stages"].values()), manifest
    placement = manifest["placement"]
    for key, entry in manifest["experts"].items():
        # Every attempt ran on the island the placement chose for it.
        assert {attempt["island"] for attempt in entry["attempts"]} == {entry["island"]}, key
    used = {entry["island"] for entry in manifest["experts"].values()}
    assert {"beta", "gamma"} <= used, (used, placement)
    islands_of = [entry["island"] for entry in manifest["experts"].values()]
    assert islands_of.count("beta") == 2  # two slots, twice the speed: two experts

    # The same config, never interrupted, on the embedded local Ray: the same experts.
    reference = run_config(tmp_path, "reference")
    reference["islands"] = {"local": 2}
    done = islands("run", str(write(tmp_path, "reference", reference)), "--until", "experts",
                   timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for k in range(4):
        ours = run_dir / "experts" / f"expert-{k}" / "final" / "model.safetensors"
        theirs = (tmp_path / "reference" / "submitted" / "experts" / f"expert-{k}" / "final"
                  / "model.safetensors")
        assert storage.sha256_file(str(ours)) == storage.sha256_file(str(theirs)), k


def test_serve_on_the_cluster_pins_each_expert_to_its_island(cluster, serving_runs, tmp_path):
    """`islands serve --address`: a Ray job on the head whose experts are deployments on the
    nodes of the islands they trained on (here: a copy of the tiny image run whose experts
    are recorded on beta, an island by resource, and gamma, an island by node label)."""
    import shutil

    from tests.serve_servers import Server, free_port, lowered

    run_dir = tmp_path / "served"
    shutil.copytree(serving_runs["image"], run_dir)
    manifest = manifest_of(run_dir)
    for expert, island in zip(("0", "1"), ("beta", "gamma"), strict=True):
        manifest["experts"][expert]["island"] = island
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["islands"]["pool"] = POOL  # gamma's node labels come from the run's config
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    result = islands("serve", str(run_dir), "--address", cluster.dashboard, "--port",
                     str(port), "--expert-cpus", "0.5")
    assert result.returncode == 0, result.stdout + result.stderr
    job = result.stdout.split("submitted ", 1)[1].split(":", 1)[0]
    server = Server(f"http://127.0.0.1:{port}", None, tmp_path / "none", run_dir)
    try:
        wait_until(lambda: server.ready() is not None, 240, "the server on the cluster")
        replicas = {name: " ".join(" ".join(proc.cmdline()) for proc in
                                   cluster.processes(name)) for name in ("beta", "gamma")}
        assert "ServeReplica:islands-expert-0:" in replicas["beta"]
        assert "ServeReplica:islands-expert-1:" not in replicas["beta"]
        assert "ServeReplica:islands-expert-1:" in replicas["gamma"]
        assert "ServeReplica:islands-expert-0:" not in replicas["gamma"]
        status, headers, answer = server.post("/v1/images/generations", {
            "n": 2, "steps": 3, "routing": {"strategy": "full"}})
        assert status == 200 and len(answer["data"]) == 2, answer
        assert "x-islands-degraded" not in lowered(headers)
        listing = json.loads(server.get("/v1/models")[2])
        assert [e["island"] for e in listing["data"][1:]] == ["beta", "gamma"]
    finally:
        subprocess.run([RAY, "job", "stop", "--address", cluster.dashboard, job],
                       env=auth_env(), capture_output=True, timeout=120)
    wait_until(lambda: server.ready() is None, 120, "the server to stop with its job")
