"""A start checks a finished run's artifacts by size and stamp (runstore/artifacts.py)
without reading them; a changed artifact is caught at the start or at its read; a copied
run, and a manifest of plain sha256s, are hashed once and still verify."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from orchestrator.state.manifest import Manifest
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from tests.counting_fs import CountingFileSystem, register

ARTIFACTS = {"partition/stats.json": b'{"sizes": [1, 1]}',
             "experts/expert-0/final/model.safetensors": b"weights-0" * 100,
             "experts/expert-1/final/model.safetensors": b"weights-1" * 100}


def finished_run(root: Path) -> RunLayout:
    """A run whose partition stage and experts 0 and 1 are done, as the driver records
    them: the writer's sha256, size and stamp read back from the store."""
    register()
    layout = RunLayout(f"counted://{root}")
    manifest = Manifest.open(layout, "meta", clusters=2)
    shas = {path: storage.write_bytes(storage.join(layout.root, path), data)
            for path, data in ARTIFACTS.items()}
    manifest.finish_stage("partition", {"partition/stats.json": shas["partition/stats.json"]})
    for k in (0, 1):
        manifest.start_attempt(k, "a")
        path = f"experts/expert-{k}/final/model.safetensors"
        manifest.end_attempt(k, "done", "finished", 10, artifacts={path: shas[path]})
    manifest.save()
    return layout


def artifact_reads() -> list[str]:
    return [path for path in CountingFileSystem.opened if not path.endswith("manifest.json")]


def test_a_finished_runs_start_reads_no_artifact(tmp_path: Path) -> None:
    layout = finished_run(tmp_path / "meta")
    record = Manifest.load(layout).expert(0)["artifacts"][
        "experts/expert-0/final/model.safetensors"]
    assert record["size"] == 900 and record["stamp"] and len(record["sha256"]) == 64
    CountingFileSystem.reset()
    manifest = Manifest.load(layout)
    assert manifest.stage_done("partition")
    assert manifest.expert_done(0) and manifest.expert_done(1)
    assert artifact_reads() == []


def test_a_changed_artifact_is_caught_at_start_or_at_read(tmp_path: Path) -> None:
    layout = finished_run(tmp_path / "meta")
    weights = storage.join(layout.root, "experts/expert-0/final/model.safetensors")
    storage.write_bytes(weights, b"WEIGHTS-0" * 100)  # rewritten whole: same size
    assert Manifest.load(layout).experts_done([0, 1]) == {1}

    # Changed in place, its mtime put back: what size and stamp may miss, the read catches.
    other = tmp_path / "meta/experts/expert-1/final/model.safetensors"
    before = other.stat()
    with other.open("r+b") as handle:
        handle.write(b"W")
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(InputError, match="sha256 does not match"):
        Manifest.load(layout).read_verified("experts/expert-1/final/model.safetensors")


def test_a_copied_run_is_hashed_once_and_then_checked_by_stamp(tmp_path: Path) -> None:
    finished_run(tmp_path / "meta")
    shutil.copytree(tmp_path / "meta", tmp_path / "copy/meta")  # new inodes and ctimes
    layout = RunLayout(f"counted://{tmp_path}/copy/meta")
    CountingFileSystem.reset()
    manifest = Manifest.load(layout)
    assert manifest.stage_done("partition") and manifest.expert_done(0)
    assert len(artifact_reads()) == 2  # stamps differ: hashed in full, then recorded anew
    manifest.save()
    CountingFileSystem.reset()
    manifest = Manifest.load(layout)
    assert manifest.stage_done("partition") and manifest.expert_done(0)
    assert artifact_reads() == []


def test_a_manifest_of_plain_sha256s_is_verified_by_hashing(tmp_path: Path) -> None:
    layout = finished_run(tmp_path / "meta")
    path = tmp_path / "meta/manifest.json"
    data = json.loads(path.read_text())
    for entry in [*data["stages"].values(), *data["experts"].values()]:
        entry["artifacts"] = {p: r["sha256"] for p, r in entry["artifacts"].items()}
    path.write_text(json.dumps(data))
    assert Manifest.load(layout).expert_done(0)
    storage.write_bytes(storage.join(layout.root, "experts/expert-0/final/model.safetensors"),
                        b"x" * 900)
    assert not Manifest.load(layout).expert_done(0)

    data["experts"]["1"]["artifacts"]["experts/expert-1/final/model.safetensors"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"experts\.1\.artifacts\.experts/expert-1/final"):
        Manifest.load(layout)
