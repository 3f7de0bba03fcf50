"""The whole pipeline through the CLI, on the session's real Ray with two virtual islands."""

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.state.lease import RunLease
from runstore import storage
from runstore.layout import RunLayout
from tests.conftest import TEST_ISLANDS, tiny_config

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result


@pytest.fixture(scope="module")
def finished_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    config_path = root / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(f"file://{root}/store")))
    result = invoke("run", str(config_path))
    assert result.exit_code == 0, result.output
    return config_path, root / "store" / "tiny-digits", result.output


def test_run_writes_every_stage_and_verifies(finished_run):
    _, run_dir, output = finished_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {name: s["state"] for name, s in manifest["stages"].items()} == {
        "partition": "done", "seed": "done", "experts": "done", "router": "done",
        "eval": "done"}
    assert manifest["stages"]["seed"]["artifacts"] == {}  # no seed model asked for
    for expert in ("0", "1"):
        entry = manifest["experts"][expert]
        assert entry["state"] == "done" and entry["step"] == 30
        assert entry["attempts"][0]["island"] in TEST_ISLANDS
        for relative, record in entry["artifacts"].items():
            assert storage.sha256_file(f"file://{run_dir}/{relative}") == record["sha256"]
            assert (run_dir / relative).stat().st_size == record["size"]
        metrics = pq.read_table(run_dir / "experts" / f"expert-{expert}" / "metrics.parquet")
        assert metrics.column("step").to_pylist()[-1] == 30
        assert {"loss", "samples_per_s", "step_time"} <= set(metrics.column_names)
    assert "complete" in output


def test_eval_report_and_pictures(finished_run):
    _, run_dir, output = finished_run
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert set(report["strategies"]) == {"top1", "topk", "full"}
    calls = {name: row["expert_calls_per_sample"] for name, row in report["strategies"].items()}
    assert calls["top1"] == 4 and calls["full"] == 8  # sample_steps x experts used
    assert len(report["router_accuracy_by_noise"]) == 4
    assert all("own_cluster_loss" in row for row in report["experts"])
    assert 0 < report["train_flops"]["router_share"] < 1
    assert "of training FLOPs" in finished_run[2]
    for name in ("samples-top1.png", "report.png"):
        picture = Image.open(run_dir / "eval" / name)
        assert picture.format == "PNG" and picture.width > 100
    assert "ensemble top1" in output and "router accuracy" in output


def test_rerun_of_finished_run_does_nothing(finished_run):
    config_path, run_dir, _ = finished_run
    before = (run_dir / "manifest.json").read_bytes()
    result = invoke("run", str(config_path))
    assert result.exit_code == 0
    assert "nothing to do" in result.output
    assert (run_dir / "manifest.json").read_bytes() == before


def test_sample_and_status_commands(finished_run, tmp_path):
    _, run_dir, _ = finished_run
    out = tmp_path / "grid.png"
    result = invoke("sample", str(run_dir), "--n", "9", "--strategy", "top1", "--steps", "3",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    assert Image.open(out).format == "PNG"
    assert "1.0 expert calls per sample" in result.output.replace("\n", " ") or \
        "3.0 expert calls per sample" in result.output.replace("\n", " ")
    result = invoke("sample", str(run_dir), "--strategy", "best")
    assert result.exit_code == 2 and "--strategy" in result.output
    jpeg = tmp_path / "grid.jpg"
    result = invoke("sample", str(run_dir), "--n", "2", "--steps", "2", "--out", str(jpeg))
    assert result.exit_code == 0, result.output
    assert Image.open(jpeg).format == "JPEG"
    result = invoke("sample", str(run_dir), "--out", str(tmp_path / "grid.gif"))
    assert result.exit_code == 2 and "--out" in result.output and ".jpg" in result.output
    result = invoke("sample", str(run_dir), "--strategy", "topk", "--top-k", "3")
    assert result.exit_code == 2 and "--top-k" in result.output
    assert "has 2 experts" in " ".join(result.output.split())
    result = invoke("status", str(run_dir))
    assert result.exit_code == 0 and "local-" in result.output


def test_damaged_expert_weights_are_refused_then_rebuilt(finished_run, tmp_path):
    config_path, run_dir, _ = finished_run
    weights = run_dir / "experts" / "expert-1" / "final" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-10] + b"0123456789")
    result = invoke("sample", str(run_dir), "--n", "2", "--out", str(tmp_path / "x.png"))
    assert result.exit_code == 2 and "sha256 does not match" in result.output
    assert "Traceback" not in result.output
    # Re-running the run repairs it from the last checkpoint without retraining.
    result = invoke("run", str(config_path))
    assert result.exit_code == 0, result.output
    assert weights.read_bytes() == good
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["experts"]["1"]["resumed_from"] == 30


def test_monolith_baseline_side_by_side(ray_session, finished_run, tmp_path):
    _, run_dir, _ = finished_run
    raw = tiny_config(f"file://{tmp_path}/store", run="tiny-monolith",
                      experts={"monolith": True, "steps": 60})
    config_path = tmp_path / "mono.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    result = invoke("run", str(config_path))
    assert result.exit_code == 0, result.output
    mono_dir = tmp_path / "store" / "tiny-monolith"
    manifest = json.loads((mono_dir / "manifest.json").read_text())
    assert list(manifest["experts"]) == ["0"]
    assert manifest["stages"]["router"]["artifacts"] == {}
    result = invoke("eval", str(run_dir), "--baseline", str(mono_dir))
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["baseline"]["run"] == "tiny-monolith"
    # 2 experts x 30 steps vs 1 x 60 steps at one batch size: equal expert compute.
    assert report["baseline"]["compute_ratio"] == pytest.approx(1.0, rel=0.1)


def test_island_missing_from_cluster_is_a_clear_error(ray_session, tmp_path):
    raw = tiny_config(f"file://{tmp_path}/store", run="nowhere",
                      islands={"pool": [{"name": "mars"}]})
    config_path = tmp_path / "mars.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    result = invoke("run", str(config_path))
    assert result.exit_code == 2, result.output
    assert "island(s) mars not in the Ray cluster" in result.output.replace("\n", " ")


def test_not_a_run_directory(tmp_path):
    result = invoke("eval", str(tmp_path))
    assert result.exit_code == 2 and "not an islands run directory" in result.output
    assert not any(Path(tmp_path).iterdir())




def test_lease_blocks_a_second_driver_then_resume_finishes(ray_session, tmp_path):
    raw = tiny_config(f"file://{tmp_path}/store", run="leased")
    config_path = tmp_path / "leased.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    assert invoke("run", str(config_path), "--until", "partition").exit_code == 0
    run_dir = tmp_path / "store" / "leased"
    layout = RunLayout(f"file://{run_dir}")
    with RunLease(layout, seconds=30):
        result = invoke("run", str(config_path))
        assert result.exit_code == 2
        assert "being driven by pid" in result.output
        result = invoke("resume", str(run_dir))
        assert result.exit_code == 2
    result = invoke("resume", str(run_dir))
    assert result.exit_code == 0, result.output
    assert "partition: done (verified), skipping" in result.output
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["eval"]["state"] == "done"
    assert json.loads((run_dir / "lease.json").read_text())["released"]


def test_run_completes_on_storage_that_fails_every_fifth_call(ray_session, tmp_path):
    from tests.flaky_fs import FlakyFileSystem

    raw = tiny_config(f"flaky://{tmp_path}/store", run="flaky")
    config_path = tmp_path / "flaky.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    before = FlakyFileSystem.failures
    result = invoke("run", str(config_path))
    assert result.exit_code == 0, result.output
    assert FlakyFileSystem.failures > before + 10  # the driver alone met many failures
    manifest = json.loads((tmp_path / "store" / "flaky" / "manifest.json").read_text())
    assert all(e["state"] == "done" for e in manifest["experts"].values())
    assert all(len(e["attempts"]) == 1 for e in manifest["experts"].values())


def test_memory_storage_is_refused_before_training(tmp_path):
    config_path = tmp_path / "mem.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config("memory://runs", run="mem")))
    result = invoke("run", str(config_path))
    assert result.exit_code == 2
    assert "Ray workers cannot see it" in result.output


def test_islands_command_shows_offered_and_missing(ray_session, tmp_path):
    config_path = tmp_path / "isl.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(f"file://{tmp_path}", run="isl")))
    result = invoke("islands", str(config_path))
    assert result.exit_code == 0, result.output
    assert "local-0" in result.output and "local-1" in result.output
    assert "missing" not in result.output
    raw = tiny_config(f"file://{tmp_path}", run="isl",
                      islands={"pool": [{"name": "local-0"}, {"name": "mars"}]})
    config_path.write_text(yaml.safe_dump(raw))
    result = invoke("islands", str(config_path))
    assert result.exit_code == 1
    assert "missing from the cluster: mars" in result.output.replace("\n", " ")


def test_resume_of_a_run_submitted_here_goes_to_the_background(finished_run, tmp_path):
    """`islands resume` continues a run the way `islands submit` started it, in the
    background here; `islands logs` then shows the new driver's output, not the old one's,
    while driver.log keeps both."""
    _, run_dir, _ = finished_run
    copy = tmp_path / "store" / run_dir.name
    shutil.copytree(run_dir, copy)
    old = "==== islands run config.yaml: driver started ====\nthe first driver's output\n"
    (copy / "driver.log").write_text(old)
    (copy / "submission.json").write_text(json.dumps(
        {"kind": "local", "pid": os.getpid(), "log": "driver.log",
         "command": ["run", "config.yaml"]}))
    result = invoke("resume", str(copy))
    assert result.exit_code == 0, result.output
    record = json.loads((copy / "submission.json").read_text())
    assert f"as background driver pid {record['pid']}" in result.output
    assert record["pid"] != os.getpid() and record["log_offset"] == len(old.encode())
    assert record["command"] == ["resume", f"file://{copy}", "--foreground"]
    logs = invoke("logs", str(copy), "--follow", "--interval", "0.2")
    assert logs.exit_code == 0, logs.output
    assert f"==== islands resume file://{copy} --foreground: driver started" in logs.output
    assert "already complete" in logs.output and "nothing to do" in logs.output
    assert "the first driver's output" not in logs.output
    assert (copy / "driver.log").read_text().startswith(old)



def test_storage_that_stays_down_is_one_line_unless_debug(tmp_path, monkeypatch):
    """An operational failure (storage still failing after its retries) ends the verb with
    one line and exit code 1; --debug shows the traceback instead."""
    from tests.flaky_fs import FlakyFileSystem, register

    register()
    monkeypatch.setattr(storage, "RETRY_DELAY", 0.0)

    def down(self: FlakyFileSystem, operation: str) -> None:
        raise ConnectionError(f"storage down ({operation})\nsecond line of detail")

    monkeypatch.setattr(FlakyFileSystem, "_maybe_fail", down)
    result = invoke("status", f"flaky://{tmp_path}/run")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == ["error: ConnectionError: storage down (exists)"]
    assert "Traceback" not in result.output and "second line" not in result.output
    debug = invoke("--debug", "status", f"flaky://{tmp_path}/run")
    assert isinstance(debug.exception, ConnectionError)


def test_a_router_out_of_scale_with_its_experts_is_warned_about():
    from types import SimpleNamespace

    from rich.console import Console

    from orchestrator.pipeline import _report_router_share

    experts = {"0": {"train_flops": 1e12}, "1": {"train_flops": 1e12}}
    manifest = SimpleNamespace(data={"experts": experts}, expert=experts.__getitem__)
    console = Console(record=True, width=200)
    _report_router_share(8e10, manifest, console)  # 4%, as in DDM
    _report_router_share(2e12, manifest, console)  # a config scaled down without its router
    lines = console.export_text().splitlines()
    assert lines[0] == "router: 3.8% of training FLOPs"
    assert lines[1].startswith("router: 50.0% of training FLOPs (more than 25%: router.steps")
