"""s3:// for real: a whole run against moto's S3 server (partition, experts on Ray
workers, router, eval), its driver killed mid-experts and resumed; the lease raced on S3;
writes that go straight to their final key."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.state.manifest import STAGES, Manifest
from runstore import storage
from runstore.layout import RunLayout
from tests.conftest import REPO, tiny_config
from tests.test_lease import check_one_winner, expired_lease
from worker.checkpoint import checkpoint_steps


def committed_checkpoint(layout: RunLayout, expert: int) -> bool:
    return any(storage.exists(storage.join(layout.checkpoint(expert, step), "meta.json"))
               for step in checkpoint_steps(layout.checkpoints(expert)))


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a driver and everything it started (its own Ray included)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(process.pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
    process.wait()


def test_a_run_on_s3_survives_a_killed_driver(ray_session, s3_bucket, tmp_path):
    config_path = tmp_path / "s3.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(f"{s3_bucket}/runs", run="on-s3")))
    layout = RunLayout(f"{s3_bucket}/runs/on-s3")
    log = tmp_path / "driver.log"
    with open(log, "wb") as output:
        driver = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli.main", "run", str(config_path)],
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 150
        while time.time() < deadline and driver.poll() is None \
                and not committed_checkpoint(layout, 0):
            time.sleep(0.2)
        assert driver.poll() is None, log.read_text()
        assert committed_checkpoint(layout, 0), "no checkpoint on S3 in time: " + log.read_text()
    finally:
        kill_tree(driver)
    assert not Manifest.load(layout).stage_done("experts")

    result = CliRunner().invoke(app, ["resume", layout.root])  # no --force
    assert result.exit_code == 0, result.output
    assert "held by a process that no longer exists: taking the run over at once" in result.output

    manifest = Manifest.load(layout)
    assert all(manifest.stage_done(name) for name in STAGES)  # every artifact's sha256
    first, *_, last = manifest.expert(0)["attempts"]
    assert "driver" in first["reason"] and last["resumed_from"] >= 10
    report = storage.read_json(storage.join(layout.eval, "report.json"))
    assert set(report["strategies"]) == {"top1", "topk", "full"}
    lease = storage.read_json(layout.lease)
    assert lease["released"] and lease["epoch"] == 2 and manifest.data["epoch"] == 2
    fs, root = storage.filesystem(layout.root)
    keys = fs.find(root)
    assert any(key.endswith("final/model.safetensors") for key in keys)
    assert not [key for key in keys if "/.tmp-" in key]  # nothing half-written left behind


@pytest.mark.parametrize("index", range(5))
def test_two_drivers_racing_for_a_lease_on_s3_have_one_winner(s3_bucket, index):
    check_one_winner(RunLayout(f"{s3_bucket}/races/fresh-{index}"), False, epoch=1)
    layout = RunLayout(f"{s3_bucket}/races/takeover-{index}")
    expired_lease(layout, epoch=7)
    check_one_winner(layout, True, epoch=8)


def test_object_store_writes_put_the_final_key_with_no_temporary_object(s3_bucket,
                                                                         monkeypatch):
    fs, _ = storage.filesystem(s3_bucket)

    def moved(*_: object, **__: object) -> None:
        raise AssertionError("an object store write went through a temporary name")

    monkeypatch.setattr(fs, "mv", moved)
    url = f"{s3_bucket}/direct/a/b.json"
    sha = storage.write_json(url, {"a": 1})
    assert storage.sha256_file(url) == sha and storage.read_json(url) == {"a": 1}
    assert fs.find(f"{s3_bucket.removeprefix('s3://')}/direct") == [
        f"{s3_bucket.removeprefix('s3://')}/direct/a/b.json"]

    def dropped(*_: object, **__: object) -> None:  # the connection dies mid-upload
        raise ConnectionError("dropped")

    monkeypatch.setattr(fs, "pipe_file", dropped)
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 2)
    monkeypatch.setattr(storage, "RETRY_DELAY", 0.01)
    with pytest.raises(ConnectionError):
        storage.write_bytes(f"{s3_bucket}/direct/c.bin", b"x")
    assert not storage.exists(f"{s3_bucket}/direct/c.bin")
    assert json.loads(storage.read_bytes(url)) == {"a": 1}


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_file_is_put_in_blocks_to_its_final_key(s3_bucket, tmp_path, where):
    """`put_file` (the coordinator's artifact writes): the bytes and the sha256 of a file
    larger than one block, and no temporary name left beside it."""
    local = tmp_path / "big.bin"
    data = os.urandom((1 << 22) + 12345)
    local.write_bytes(data)
    base = f"{s3_bucket}/put" if where == "s3" else f"file://{tmp_path}/store"
    sha = storage.put_file(local, f"{base}/a/big.bin")
    assert sha == storage.sha256_bytes(data)
    assert storage.read_bytes(f"{base}/a/big.bin") == data
    assert storage.listdir(f"{base}/a") == ["big.bin"]


def test_missing_credentials_are_one_line_naming_what_is_expected(s3_bucket, tmp_path):
    endpoint = next(line.split("=", 1)[1].strip()
                    for line in Path(os.environ["AWS_CONFIG_FILE"]).read_text().splitlines()
                    if line.startswith("endpoint_url"))
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\nregion = us-east-1\nendpoint_url = {endpoint}\n")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("AWS_")} | {
        "AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true"}
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli.main", "status",
                             f"{s3_bucket}/some-run"], env=env, cwd=REPO, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "no credentials for s3://" in message and "AWS_ACCESS_KEY_ID" in message
    assert "instance role" in message and "Traceback" not in result.stderr
