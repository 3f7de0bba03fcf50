"""A run directory may come from someone else: the paths its files name must stay inside
it, and `status`, `logs` and `cancel` contact no address it names unless told to.

Cheap: a run directory is written by hand (config.yaml, manifest.json, ...), no training.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.mesh.coordination import check_path as mesh_check_path
from orchestrator.state.config import parse_config
from orchestrator.state.manifest import Manifest
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from runstore.paths import check_path
from tests.conftest import tiny_config
from worker.checkpoint import verified_files, write_checkpoint

runner = CliRunner()
ESCAPES = ["../secret.txt", "/etc/passwd", "s3://bucket/secret.txt", "experts/../../secret.txt",
           "file:///etc/passwd", "..\\secret.txt", "a/./b"]
SECRET = "not for this run's readers"


def one_line(result: Any) -> str:
    return " ".join(result.output.split())


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory `store/r` (config.yaml, manifest.json, a checkpoint of expert 0),
    with a file beside it and one above the store that nothing may read."""
    root = tmp_path / "store" / "r"
    root.mkdir(parents=True)
    raw = tiny_config(f"file://{tmp_path}/store", run="r")
    (root / "config.yaml").write_text(yaml.safe_dump(raw))
    Manifest.open(RunLayout(f"file://{root}"), "r", clusters=2)
    for outside in (tmp_path / "store" / "secret.txt", tmp_path / "secret.txt"):
        outside.write_text(SECRET)
    return root


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every URL the storage layer is asked to read, hash, list or test."""
    seen: list[str] = []
    for name in ("read_bytes", "read_json", "sha256_file", "exists", "listdir"):
        real = getattr(storage, name)

        def spy(url: str, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            seen.append(url)
            return _real(url, *args, **kwargs)

        monkeypatch.setattr(storage, name, spy)
    return seen


def assert_all_inside(reads: list[str], root: Path) -> None:
    inside = f"file://{root}/"
    assert reads, "the verb read nothing at all"
    assert all(url.startswith(inside) and ".." not in url for url in reads), reads


def edit_manifest(root: Path, change: Any) -> None:
    data = json.loads((root / "manifest.json").read_text())
    change(data)
    (root / "manifest.json").write_text(json.dumps(data))


# ------------------------------------------------------------------- the shared helper


@pytest.mark.parametrize("path", [*ESCAPES, "", ".", "experts/", 7, None])
def test_check_path_refuses_what_leaves_the_run(path: Any) -> None:
    with pytest.raises(InputError) as err:
        check_path(path, "manifest.json: stages.eval.artifacts")
    assert str(err.value).startswith("manifest.json: stages.eval.artifacts: path ")


def test_check_path_keeps_run_paths_and_mesh_uses_it() -> None:
    for path in ("partition/shards/cluster=0/part-0.parquet", "experts/expert-1/final/meta.json",
                 "eval/samples-top1.png"):
        assert check_path(path, "x") == path
    assert check_path("experts/expert-1/log.txt", "x", "experts/expert-1") \
        == "experts/expert-1/log.txt"
    with pytest.raises(InputError, match="inside experts/expert-1"):
        check_path("experts/expert-2/log.txt", "artifact", "experts/expert-1")
    assert mesh_check_path is check_path  # mesh messages and run files: one rule


# ---------------------------------------------------------------------------- run names


@pytest.mark.parametrize("name", ["..", "a..b", "../escape", ".", ".datasets", "a/b"])
def test_a_run_name_that_could_leave_storage_is_refused(name: str) -> None:
    with pytest.raises(InputError, match=r"config: run: expected a folder name"):
        parse_config({"run": name})
    assert parse_config({"run": "v1.2_final-3"}).run == "v1.2_final-3"


def test_run_with_a_dotdot_name_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(tiny_config(f"file://{tmp_path}/store/inner",
                                                 run="..")))
    for verb in ("validate", "run", "submit"):
        result = runner.invoke(app, [verb, str(config)])
        assert result.exit_code == 2, (verb, result.output)
        assert "run: expected a folder name" in one_line(result), result.output
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


# -------------------------------------------------------------------------- manifest.json


@pytest.mark.parametrize("path", ESCAPES)
def test_manifest_artifact_leading_out_is_refused_before_any_read(run_dir: Path, reads,
                                                                   path: str) -> None:
    edit_manifest(run_dir, lambda d: d["stages"]["partition"].update(
        state="done", artifacts={path: storage.sha256_bytes(SECRET.encode())}))
    before = (run_dir / "manifest.json").read_bytes()
    for verb in (["status"], ["eval"], ["resume"]):
        result = runner.invoke(app, [*verb, str(run_dir)])
        assert result.exit_code == 2, (verb, result.output)
        text = one_line(result).replace(" ", "")
        assert "manifest.json:stages.partition.artifacts:path" in text, result.output
        assert "Traceback" not in result.output and SECRET not in result.output
    assert_all_inside(reads, run_dir)
    assert (run_dir / "manifest.json").read_bytes() == before
    assert not (run_dir / "lease.json").exists()


def test_an_experts_artifact_is_checked_too(run_dir: Path) -> None:
    edit_manifest(run_dir, lambda d: d["experts"]["1"].update(
        artifacts={"experts/expert-1/../../../secret.txt": "0" * 64}))
    result = runner.invoke(app, ["status", str(run_dir)])
    assert result.exit_code == 2
    assert "manifest.json: experts.1.artifacts: path" in one_line(result)


# ---------------------------------------------------------------- a checkpoint's meta.json


@pytest.mark.parametrize("name", ["../../secret.txt", "/etc/passwd", "s3://bucket/model"])
def test_checkpoint_meta_naming_a_file_outside_is_refused(tmp_path: Path, reads,
                                                          name: str) -> None:
    folder = f"file://{tmp_path}/store/r/experts/expert-0/checkpoints/step-00000010"
    write_checkpoint(folder, {"state.json": b"{}"}, 10)
    meta_url = storage.join(folder, "meta.json")
    meta = json.loads(Path(meta_url.removeprefix("file://")).read_text())
    meta["files"][name] = storage.sha256_bytes(SECRET.encode())
    Path(meta_url.removeprefix("file://")).write_text(json.dumps(meta))
    reads.clear()
    with pytest.raises(InputError) as err:
        verified_files(folder)
    assert str(err.value).startswith(f"{meta_url}: files: path {name!r}")
    assert all(url.startswith(folder + "/") and ".." not in url for url in reads), reads


# ------------------------------------------------------------------------ submission.json


def write_submission(root: Path, record: dict[str, Any]) -> None:
    (root / "submission.json").write_text(json.dumps(record))


@pytest.mark.parametrize("log", ["../secret.txt", "/etc/passwd", "s3://bucket/driver.log"])
def test_submission_log_leading_out_is_refused(run_dir: Path, reads, log: str) -> None:
    write_submission(run_dir, {"kind": "local", "pid": os.getpid(), "log": log})
    result = runner.invoke(app, ["logs", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert "submission.json: log: path" in one_line(result), result.output
    assert SECRET not in result.output and "Traceback" not in result.output
    assert_all_inside(reads, run_dir)


@pytest.mark.parametrize("record, field", [
    ({"kind": "local", "pid": -1}, "pid"),
    ({"kind": "local", "pid": "1"}, "pid"),
    ({"kind": "ray-job", "address": "file:///etc", "job_id": "j"}, "address"),
    ({"kind": "ray-job", "address": "http://h:8265", "job_id": 3}, "job_id"),
    ({"kind": "local", "pid": 1, "log_offset": -1}, "log_offset"),
    ({"kind": "ssh", "pid": 1}, "kind")])
def test_a_malformed_submission_is_named_by_field(run_dir: Path, record: dict,
                                                  field: str) -> None:
    write_submission(run_dir, record)
    for verb in ("status", "logs", "cancel", "resume"):
        result = runner.invoke(app, [verb, str(run_dir)])
        assert result.exit_code == 2, (verb, result.output)
        assert f"submission.json: {field}:" in one_line(result), result.output
    assert not (run_dir / "cancel.json").exists()
    assert not (run_dir / "lease.json").exists()  # resume started nothing


def test_resume_of_a_renamed_run_directory_is_one_line(run_dir: Path) -> None:
    renamed = run_dir.parent / "r-copy"
    run_dir.rename(renamed)
    before = {path: path.read_bytes() for path in renamed.rglob("*") if path.is_file()}
    result = runner.invoke(app, ["resume", str(renamed)])
    assert result.exit_code == 2, result.output
    assert f"{renamed}: this run directory is named 'r-copy' but its config.yaml says run: " \
        "'r'; a run resumes only in a folder named after it: rename the folder back to " \
        "'r'" in one_line(result)
    assert "Traceback" not in result.output
    assert before == {path: path.read_bytes() for path in renamed.rglob("*") if path.is_file()}


def test_a_background_drivers_log_inside_the_run_is_read(run_dir: Path) -> None:
    (run_dir / "driver.log").write_text("run 'r' complete\n")
    # As written now (relative), and as written before (the same file, absolute).
    for log in ("driver.log", str(run_dir / "driver.log")):
        write_submission(run_dir, {"kind": "local", "pid": os.getpid(), "log": log})
        result = runner.invoke(app, ["logs", str(run_dir)])
        assert result.exit_code == 0, result.output
        assert "run 'r' complete" in result.output


# --------------------------------------------------- no address a run names, unless asked


class Listener:
    """A TCP port that counts who connects (and hangs up on them): a stand-in for the Ray
    dashboard a run directory names."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.address = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.server.close()


@pytest.fixture
def dashboard() -> Any:
    listener = Listener()
    yield listener
    listener.close()


def test_status_logs_cancel_do_not_contact_the_recorded_dashboard(run_dir: Path,
                                                                  dashboard: Listener) -> None:
    write_submission(run_dir, {"kind": "ray-job", "address": dashboard.address,
                               "job_id": "islands-r-1", "command": ["run", "config.yaml"]})
    status = runner.invoke(app, ["status", str(run_dir)])
    assert status.exit_code == 0, status.output
    assert "Ray job islands-r-1 not asked" in one_line(status)
    assert f"add --address {dashboard.address}" in one_line(status)

    logs = runner.invoke(app, ["logs", str(run_dir)])
    assert logs.exit_code == 2 and "--address: Ray job islands-r-1 not asked" \
        in one_line(logs), logs.output

    # It resumes as a Ray job too, at the address the user names: one line, nothing run.
    resume = runner.invoke(app, ["resume", str(run_dir)])
    assert resume.exit_code == 2, resume.output
    assert "--address: " in one_line(resume) and "was submitted as Ray job islands-r-1 and " \
        f"resumes as one: add --address {dashboard.address}" in one_line(resume)
    assert not (run_dir / "lease.json").exists()

    # A driver that holds the run and does not stop: cancel would stop its Ray job.
    lease = {"owner": "elsewhere", "host": "elsewhere", "pid": 1, "started": 0.0,
             "space": "elsewhere", "epoch": 1, "renewed": time.time(),
             "expires": time.time() + 600}
    (run_dir / "lease.json").write_text(json.dumps(lease))
    cancel = runner.invoke(app, ["cancel", str(run_dir), "--wait", "0"])
    assert cancel.exit_code == 1, cancel.output
    assert "not asked" in one_line(cancel) and "to stop the job" in one_line(cancel)
    time.sleep(0.5)
    assert dashboard.connections == 0

    # Named by the user, the dashboard is asked (here it hangs up: the job's state unknown).
    asked = runner.invoke(app, ["status", str(run_dir), "--address", dashboard.address])
    assert asked.exit_code == 0, asked.output
    assert "submitted: unknown" in one_line(asked) and "not asked" not in asked.output
    assert dashboard.connections > 0


def test_address_is_refused_for_a_run_that_is_not_a_ray_job(run_dir: Path) -> None:
    result = runner.invoke(app, ["status", str(run_dir), "--address", "http://h:8265"])
    assert result.exit_code == 2
    assert "--address:" in one_line(result) and "not submitted as a Ray job" \
        in one_line(result)
