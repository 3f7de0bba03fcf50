"""An expert's log in parts (runstore/log_parts.py): each flush writes only the open part,
attempts never rewrite each other's lines, and a follower reads only the new bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from runstore import log_parts, storage
from runstore.layout import RunLayout
from runstore.log_parts import LogReader, read_log
from tests.counting_fs import CountingFileSystem, register
from worker.tracking import ExpertLog


def test_a_follower_reads_only_what_is_new(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    register()
    monkeypatch.setattr(log_parts, "PART_BYTES", 100)  # a few lines per part
    layout = RunLayout(f"counted://{tmp_path}/run")
    storage.write_bytes(layout.legacy_expert_log(0), b"from an older run\n")
    follower = LogReader(layout.expert_log(0), layout.legacy_expert_log(0))
    log = ExpertLog(layout.expert_log(0), 1, "attempt 1 on island a")
    log.flush()
    assert follower.new_text().splitlines()[0] == "from an older run"

    for step in range(1, 13):
        log.write(f"step {step}")
        log.flush()
        CountingFileSystem.reset()
        new = follower.new_text()
        assert new.endswith(f"step {step}\n") and f"step {step - 1}\n" not in new
        assert sum(size for _, size in CountingFileSystem.read) == len(new.encode())
    parts = storage.listdir(layout.expert_log(0))
    assert len(parts) > 2 and parts[0] == "part-00001-0001.txt"

    again = ExpertLog(layout.expert_log(0), 2, "attempt 2 on island b")  # a retry
    again.flush()
    again.flush()  # nothing new: no write
    assert storage.listdir(layout.expert_log(0))[-1] == "part-00002-0001.txt"
    assert follower.new_text().endswith("attempt 2 on island b\n")
    whole = read_log(layout.expert_log(0), layout.legacy_expert_log(0)).splitlines()
    assert whole[0] == "from an older run" and whole[-1].endswith("attempt 2 on island b")
    assert [line.split(" ", 2)[-1] for line in whole[2:14]] == [
        f"step {step}" for step in range(1, 13)]


def test_a_restarted_attempt_goes_on_after_its_own_parts(tmp_path: Path) -> None:
    layout = RunLayout(f"file://{tmp_path}/run")
    first = ExpertLog(layout.expert_log(0), 3, "attempt 3 on island a")
    first.flush()
    second = ExpertLog(layout.expert_log(0), 3, "attempt 3 on island a, restarted")
    second.flush()
    assert storage.listdir(layout.expert_log(0)) == ["part-00003-0001.txt",
                                                     "part-00003-0002.txt"]
    assert "restarted" in read_log(layout.expert_log(0)).splitlines()[-1]
