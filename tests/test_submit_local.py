"""Without --address, `islands submit` starts the driver in the background on this machine
(embedded local Ray) and the same verbs watch it."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.conftest import tiny_config


def islands(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli.main", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "COLUMNS": "200"})


def test_submit_in_the_background_then_watch_and_read_logs(tmp_path):
    config = tmp_path / "local.yaml"
    config.write_text(yaml.safe_dump(tiny_config(f"file://{tmp_path}/store", run="bg")))
    submitted = islands("submit", str(config), timeout=60)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run = submitted.stdout.strip().splitlines()[-1]
    assert run == f"file://{tmp_path}/store/bg"
    record = json.loads((tmp_path / "store" / "bg" / "submission.json").read_text())
    assert record["kind"] == "local" and record["pid"] > 0
    assert record["log"] == "driver.log"  # relative: readers refuse paths out of the run

    again = islands("submit", str(config), timeout=60)  # one driver per run
    assert again.returncode == 2 and "already being driven" in again.stderr, again.stderr

    watched = islands("status", run, "--watch", "--interval", "1")
    assert watched.returncode == 0, watched.stdout + watched.stderr
    manifest = json.loads((tmp_path / "store" / "bg" / "manifest.json").read_text())
    assert all(entry["state"] == "done" for entry in manifest["stages"].values()), manifest
    assert "submitted: exited" in watched.stdout

    driver = islands("logs", run)
    assert "run 'bg' complete" in driver.stdout, driver.stdout
    expert = islands("logs", run, "--expert", "1", "--follow")
    assert expert.returncode == 0
    assert "attempt 1 on island" in expert.stdout and "finished at step 30" in expert.stdout
    missing = islands("logs", run, "--expert", "7")
    assert missing.returncode == 2 and "--expert" in missing.stderr
