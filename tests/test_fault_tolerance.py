"""A worker killed mid-training is relaunched from its last good checkpoint and ends with
the same weights, bit for bit, as a run that was never interrupted."""

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli.main import app
from tests.conftest import has_complete_checkpoint, tiny_config

runner = CliRunner()


def kill_expert_after_checkpoint(run_dir: Path, expert: int, deadline: float) -> list[int]:
    """SIGKILL the Ray worker training `expert` once its first checkpoint is complete
    (see has_complete_checkpoint). Only this test session's Ray (started by this
    process) is searched: other runs on the machine are left alone."""
    killed: list[int] = []
    checkpoints = run_dir / "experts" / f"expert-{expert}" / "checkpoints"
    ours = psutil.Process(os.getpid())
    while time.time() < deadline and not killed:
        if has_complete_checkpoint(checkpoints):
            for proc in ours.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    if proc.cmdline()[:1] == [f"ray::expert-{expert}"]:
                        proc.send_signal(signal.SIGKILL)
                        killed.append(proc.pid)
        time.sleep(0.05)
    return killed


def driven(raw: dict) -> tuple[threading.Thread, list[BaseException | None]]:
    """A driver of the config `raw` in a thread (not started), and where it leaves its
    outcome: None, or the exception it ended with."""
    from rich.console import Console

    from orchestrator.pipeline import run_pipeline
    from orchestrator.state.config import parse_config

    outcome: list[BaseException | None] = []

    def drive() -> None:
        try:
            run_pipeline(parse_config(raw), Console(file=open(os.devnull, "w")))  # noqa: SIM115
            outcome.append(None)
        except BaseException as err:  # collected for the test's assertions
            outcome.append(err)

    return threading.Thread(target=drive), outcome


def test_killed_worker_is_retried_and_bit_identical(ray_session, tmp_path):
    common = {"experts": {"steps": 120, "checkpoint_every": 20}}
    runs = {}
    for name in ("reference", "killed"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_config(f"file://{tmp_path}/store", run=name,
                                                   **common)))
        runs[name] = path
    assert runner.invoke(app, ["run", str(runs["reference"])]).exit_code == 0

    run_dir = tmp_path / "store" / "killed"
    killed: list[int] = []
    killer = threading.Thread(target=lambda: killed.extend(
        kill_expert_after_checkpoint(run_dir, 0, time.time() + 120)))
    killer.start()
    result = runner.invoke(app, ["run", str(runs["killed"])])
    killer.join()
    assert killed, "the worker finished before it could be killed"
    assert result.exit_code == 0, result.output

    manifest = json.loads((run_dir / "manifest.json").read_text())
    attempts = manifest["experts"]["0"]["attempts"]
    assert len(attempts) == 2
    assert "WorkerCrashedError" in attempts[0]["reason"]
    # Continued from its checkpoint (every 20 steps), not from scratch.
    assert attempts[1]["resumed_from"] >= 20 and attempts[1]["resumed_from"] % 20 == 0
    for expert in ("expert-0", "expert-1"):
        final = Path("experts") / expert / "final" / "model.safetensors"
        reference = tmp_path / "store" / "reference" / final
        assert (run_dir / final).read_bytes() == reference.read_bytes()


def test_cancel_stops_the_driver_and_resume_continues(ray_session, tmp_path):
    from orchestrator.control.controller import RunCancelled

    raw = tiny_config(f"file://{tmp_path}/store", run="cancelled",
                      experts={"steps": 300, "checkpoint_every": 25})
    run_dir = tmp_path / "store" / "cancelled"
    driver, outcome = driven(raw)
    driver.start()
    checkpoints = run_dir / "experts" / "expert-0" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not has_complete_checkpoint(checkpoints):
        time.sleep(0.1)
    result = runner.invoke(app, ["cancel", str(run_dir)])
    driver.join(timeout=120)
    assert result.exit_code == 0, result.output
    assert "cancelled" in result.output
    assert isinstance(outcome[0], RunCancelled)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["experts"]["state"] == "cancelled"
    reasons = [a["reason"] for e in manifest["experts"].values() for a in e["attempts"]]
    assert "cancelled by the user" in reasons
    stopped = [k for k, e in manifest["experts"].items()
               if e["attempts"] and e["attempts"][-1]["reason"] == "cancelled by the user"]
    assert all(manifest["experts"][k]["state"] == "cancelled" for k in stopped)  # as the stage
    status = runner.invoke(app, ["status", str(run_dir)])
    assert status.exit_code == 0 and status.output.count("cancelled") >= 1 + len(stopped)
    assert json.loads((run_dir / "lease.json").read_text())["released"]
    assert has_complete_checkpoint(checkpoints)  # kept for resume

    result = runner.invoke(app, ["resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["eval"]["state"] == "done"
    assert manifest["experts"]["0"]["attempts"][-1]["resumed_from"] >= 25


def test_a_diverged_expert_is_retried_as_a_crash_then_failed(ray_session, tmp_path):
    from rich.console import Console

    from orchestrator.pipeline import run_pipeline
    from orchestrator.state.config import parse_config

    raw = tiny_config(f"file://{tmp_path}/store", run="diverged", partition={"clusters": 1},
                      experts={"steps": 6, "lr": 1e30, "warmup_steps": 0, "log_every": 1,
                               "checkpoint_every": 1},
                      fault_tolerance={"max_retries": 1})
    with pytest.raises(RuntimeError, match=r"experts \[0\] failed after all retries"):
        run_pipeline(parse_config(raw), Console(file=open(os.devnull, "w")),  # noqa: SIM115
                     until="experts")
    manifest = json.loads((tmp_path / "store" / "diverged" / "manifest.json").read_text())
    assert list(manifest["experts"]) == ["0"]
    for entry in manifest["experts"].values():
        assert entry["state"] == "failed"
        assert [(a["cause"], a["reason"]) for a in entry["attempts"]] == [
            ("crash", "FloatingPointError: non-finite loss at step 2")] * 2
    assert not list((tmp_path / "store" / "diverged" / "experts").rglob("final"))


def test_cancel_during_the_router_stage_stops_it(ray_session, tmp_path):
    from orchestrator.state.manifest import RunCancelled

    raw = tiny_config(f"file://{tmp_path}/store", run="router-cancel",
                      experts={"steps": 2, "checkpoint_every": 2, "log_every": 1},
                      router={"steps": 1_000_000, "threads": 1})
    run_dir = tmp_path / "store" / "router-cancel"
    driver, outcome = driven(raw)

    def router_state() -> str | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return json.loads((run_dir / "manifest.json").read_text())["stages"]["router"][
                "state"]
        return None

    driver.start()
    deadline = time.time() + 120
    while time.time() < deadline and router_state() != "running" and driver.is_alive():
        time.sleep(0.1)
    assert router_state() == "running"
    result = runner.invoke(app, ["cancel", str(run_dir)])
    driver.join(timeout=60)
    assert result.exit_code == 0, result.output
    assert not driver.is_alive() and isinstance(outcome[0], RunCancelled)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["experts"]["state"] == "done"
    assert manifest["stages"]["router"]["state"] == "cancelled"
    assert manifest["stages"]["eval"]["state"] == "pending"
    assert not (run_dir / "router" / "model.safetensors").exists()
    assert json.loads((run_dir / "lease.json").read_text())["released"]
