"""The run lease: taken by compare-and-swap, fenced by an epoch, lost loudly."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import fsspec
import psutil
import pytest
import yaml
from fsspec.implementations.memory import MemoryFileSystem
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.state.lease import RunLease, machine_space
from orchestrator.state.manifest import Manifest
from runstore import cas, storage
from runstore.errors import InputError, LeaseLost
from runstore.layout import RunLayout
from tests.conftest import REPO, has_complete_checkpoint, tiny_config


def test_second_driver_is_refused_while_the_lease_lives():
    layout = RunLayout("memory://lease/live")
    with RunLease(layout, seconds=30) as first:
        held = storage.read_json(first.url)
        assert held["owner"] == first.owner and held["expires"] > time.time()
        assert held["epoch"] == 1
        with pytest.raises(InputError, match=r"being driven by pid \d+ on .* until .*cancel"):
            RunLease(layout, seconds=30).acquire()
        with pytest.raises(InputError, match="being driven by"):
            RunLease(layout, seconds=30, force=True).acquire()  # force never evicts a live one
    released = storage.read_json(first.url)  # kept, so that the epoch never goes back
    assert released["released"] and released["expires"] <= time.time()
    assert RunLease(layout, seconds=30).live_holder() is None
    with RunLease(layout, seconds=30) as second:
        assert second.epoch == 2 and second.took_over is None


def test_lease_is_renewed_while_held():
    layout = RunLayout("memory://lease/renew")
    with RunLease(layout, seconds=0.6) as lease:
        first = storage.read_json(lease.url)["expires"]
        time.sleep(0.5)
        assert storage.read_json(lease.url)["expires"] > first
        lease.check()  # still holds
        with pytest.raises(InputError, match="being driven by"):
            RunLease(layout, seconds=0.6).acquire()


def expired_lease(layout: RunLayout, epoch: int) -> None:
    """The lease of a driver on another machine that stopped renewing it."""
    storage.remove(layout.lease)
    cas.create(layout.lease, json.dumps({
        "owner": "elsewhere:1:dead", "host": "elsewhere", "pid": 1, "started": 1.0,
        "space": "elsewhere", "epoch": epoch, "renewed": time.time() - 100,
        "expires": time.time() - 40}).encode())


def test_expired_lease_needs_force_to_take_over():
    layout = RunLayout("memory://lease/dead")
    expired_lease(layout, epoch=4)
    with pytest.raises(InputError, match=r"expired at .*pass --force"):
        RunLease(layout, seconds=10).acquire()
    with RunLease(layout, seconds=10, force=True) as taker:
        assert storage.read_json(taker.url)["owner"] == taker.owner
        assert taker.epoch == 5 and "took over the expired lease of pid 1" in taker.took_over


def test_a_driver_whose_renewals_fail_past_its_lease_stops(monkeypatch):
    layout = RunLayout("memory://lease/failing")
    stopped: list[float] = []
    with RunLease(layout, seconds=0.6, on_lost=lambda: stopped.append(time.time())) as lease:
        real_replace = cas.replace

        def down(url: str, data: bytes, version: str) -> str:
            if url == lease.url:
                raise ConnectionError("storage is down (injected)")
            return real_replace(url, data, version)

        monkeypatch.setattr(cas, "replace", down)
        monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 1)
        held_until = storage.read_json(lease.url)["expires"]
        time.sleep(held_until - time.time() + 0.1)
        assert stopped and stopped[0] < held_until  # before another driver could take it
        with pytest.raises(LeaseLost, match=r"lost the run's lease .*renew"):
            lease.check()


def race(layout: RunLayout, force: bool = False) -> tuple[list[RunLease], list[InputError]]:
    """Two drivers take the lease at once. Each reads it, then waits for the other to have
    read it too before writing: the compare-and-swap alone decides."""
    both_read = threading.Barrier(2, timeout=60)
    first = threading.local()
    real_read = cas.read

    def read(url: str) -> cas.Versioned | None:
        found = real_read(url)
        if not getattr(first, "done", False):
            first.done = True
            both_read.wait()
        return found

    winners: list[RunLease] = []
    losers: list[InputError] = []

    def drive() -> None:
        lease = RunLease(layout, seconds=30, force=force)
        try:
            lease.acquire()
            winners.append(lease)
        except InputError as err:
            losers.append(err)

    with mock.patch.object(cas, "read", read):
        drivers = [threading.Thread(target=drive) for _ in range(2)]
        for driver in drivers:
            driver.start()
        for driver in drivers:
            driver.join(timeout=60)
    return winners, losers


def check_one_winner(layout: RunLayout, force: bool, epoch: int) -> None:
    winners, losers = race(layout, force)
    assert len(winners) == 1 and len(losers) == 1, (winners, losers)
    assert "another driver took the run at the same moment" in str(losers[0])
    held = storage.read_json(layout.lease)
    assert held["owner"] == winners[0].owner and held["epoch"] == winners[0].epoch == epoch
    winners[0].release()


def test_fifty_races_of_two_drivers_on_a_local_run_dir_have_one_winner_each(tmp_path):
    for index in range(50):
        check_one_winner(RunLayout(f"file://{tmp_path}/fresh-{index}"), False, epoch=1)
    for index in range(50):  # taking over the expired lease of a driver elsewhere
        layout = RunLayout(f"file://{tmp_path}/takeover-{index}")
        expired_lease(layout, epoch=7)
        check_one_winner(layout, True, epoch=8)


def test_a_storage_stall_longer_than_the_lease_stops_the_old_driver_before_the_new_one_writes(
        tmp_path, monkeypatch):
    layout = RunLayout(f"file://{tmp_path}/run")
    lost_at: list[float] = []
    old = RunLease(layout, seconds=1.0, on_lost=lambda: lost_at.append(time.time()))
    old.acquire()
    old_manifest = Manifest.open(layout, "stall", clusters=1, lease=old)
    stalled, resume = threading.Event(), threading.Event()
    real_replace = cas.replace

    def replace(url: str, data: bytes, version: str) -> str:
        if stalled.is_set() and b'"epoch": 1' in data:  # the old driver's writes hang
            resume.wait(60)
        return real_replace(url, data, version)

    monkeypatch.setattr(cas, "replace", replace)
    saved: list[float] = []
    outcome: list[BaseException] = []

    def controller() -> None:  # the old driver saves its manifest every 20 ms
        try:
            while True:
                old_manifest.data["writer"] = "old"
                old_manifest.save()
                saved.append(time.time())
                time.sleep(0.02)
        except LeaseLost as err:
            outcome.append(err)

    driving = threading.Thread(target=controller)
    driving.start()
    time.sleep(0.2)
    stalled.set()  # storage stalls for the old driver: its renewal and a manifest write
    expires = storage.read_json(layout.lease)["expires"]
    time.sleep(max(0.0, expires - time.time()) + 0.05)
    new = RunLease(layout, seconds=30, force=True)
    new.acquire()
    taken = time.time()
    new_manifest = Manifest.open(layout, "stall", clusters=1, lease=new)
    new_manifest.data["writer"] = "new"
    new_manifest.save()
    resume.set()  # the stalled writes arrive now, late
    driving.join(timeout=30)

    assert lost_at and lost_at[0] < taken  # the old driver stopped before the takeover
    assert outcome and isinstance(outcome[0], LeaseLost)
    assert "lost the run's lease" in str(outcome[0])
    assert saved and max(saved) < taken  # nothing of the old driver landed afterwards
    on_disk = storage.read_json(layout.manifest)
    assert on_disk["writer"] == "new" and on_disk["epoch"] == 2
    with pytest.raises(LeaseLost, match="lost the run's lease"):
        old.check()
    new_manifest.save()  # the new driver never conflicts with the old one's late writes
    assert storage.read_json(layout.lease)["owner"] == new.owner
    new.release()
    old.release()


def lock_free(run_dir: Path) -> bool:
    """Whether no process holds the run's compare-and-swap locks right now."""
    for name in (".lease.json.lock", ".manifest.json.lock"):
        with open(run_dir / name, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
    return True


def test_a_frozen_driver_process_stops_when_it_thaws_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    layout = RunLayout(f"file://{run_dir}")
    old = subprocess.Popen([sys.executable, "-m", "tests.lease_driver", layout.root, "1.0"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert old.stdout is not None and old.stdout.readline().strip() == "holding epoch 1"
        while "writes" not in storage.read_json(layout.manifest):
            time.sleep(0.01)
        while True:  # frozen outside the microseconds it holds a lock
            old.send_signal(signal.SIGSTOP)
            if lock_free(run_dir):
                break
            old.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        writes = storage.read_json(layout.manifest)["writes"]
        time.sleep(max(0.0, storage.read_json(layout.lease)["expires"] - time.time()) + 0.05)
        with pytest.raises(InputError, match="expired at"):  # alive but frozen: not stale
            RunLease(layout, seconds=30).acquire()
        with RunLease(layout, seconds=30, force=True) as new:
            manifest = Manifest.open(layout, "frozen", clusters=1, lease=new)
            manifest.data["writer"] = "new"
            manifest.save()
            old.send_signal(signal.SIGCONT)
            output, _ = old.communicate(timeout=60)
            assert old.returncode == 2, output
            assert output.strip().startswith("error: ") and "lost the run's lease" in output
            on_disk = storage.read_json(layout.manifest)
            assert on_disk["writer"] == "new" and on_disk["writes"] == writes
            assert on_disk["epoch"] == 2
            manifest.save()
            assert storage.read_json(layout.lease)["owner"] == new.owner
    finally:
        if old.poll() is None:
            old.send_signal(signal.SIGCONT)
            old.kill()
            old.wait()


def lease_record(pid: int, started: float, space: str, epoch: int) -> bytes:
    now = time.time()
    return json.dumps({"owner": f"x:{pid}:y", "host": "here", "pid": pid, "started": started,
                       "space": space, "epoch": epoch, "renewed": now,
                       "expires": now + 600}).encode()


def test_a_lease_left_by_a_process_that_no_longer_exists_is_taken_at_once(tmp_path):
    layout = RunLayout(f"file://{tmp_path}/run")
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = psutil.Process(gone.pid).create_time()
    gone.kill()
    gone.wait()
    cas.create(layout.lease, lease_record(gone.pid, started, machine_space(), epoch=3))
    with RunLease(layout, seconds=30) as lease:  # live for 10 more minutes, yet no --force
        assert lease.epoch == 4
        assert lease.took_over and "no longer exists" in lease.took_over
        assert "stop" not in lease.took_over

    here = psutil.Process().create_time()
    reused = lease_record(os.getpid(), here - 100.0, machine_space(), epoch=5)
    cas.replace(layout.lease, reused, cas.read(layout.lease).version)  # pid now another's
    with RunLease(layout, seconds=30) as lease:
        assert lease.epoch == 6 and "no longer exists" in (lease.took_over or "")

    alive = lease_record(os.getpid(), here, machine_space(), epoch=7)
    cas.replace(layout.lease, alive, cas.read(layout.lease).version)
    with pytest.raises(InputError, match=r"being driven by .* stop it: islands cancel"):
        RunLease(layout, seconds=30).acquire()
    elsewhere = lease_record(os.getpid(), here, "another machine", epoch=7)
    cas.replace(layout.lease, elsewhere, cas.read(layout.lease).version)
    with pytest.raises(InputError, match="if that driver is gone") as refused:
        RunLease(layout, seconds=30).acquire()
    assert "stop" not in str(refused.value)  # it may be gone: never told to stop it
    unknown = json.loads(lease_record(gone.pid, 0.0, machine_space(), epoch=7))
    del unknown["started"]  # a lease that does not say when its process started
    cas.replace(layout.lease, json.dumps(unknown).encode(), cas.read(layout.lease).version)
    with pytest.raises(InputError, match="being driven by") as refused:
        RunLease(layout, seconds=30).acquire()
    assert "stop" not in str(refused.value)  # its pid is gone: nothing to stop


def test_wait_outlasts_a_lease_held_elsewhere_then_takes_it_over(tmp_path):
    layout = RunLayout(f"file://{tmp_path}/run")
    elsewhere = json.loads(lease_record(1, 1.0, "another machine", epoch=3))
    elsewhere["expires"] = time.time() + 1.0  # its driver is gone: it is never renewed
    cas.create(layout.lease, json.dumps(elsewhere).encode())
    with pytest.raises(InputError, match="--wait` waits until then") as refused:
        RunLease(layout, seconds=30).acquire()
    assert "stop" not in str(refused.value)
    said: list[str] = []
    with RunLease(layout, seconds=30, wait=said.append) as lease:  # no --force needed
        assert lease.epoch == 4 and "took over the expired lease of pid 1" in lease.took_over
    assert said and all(re.fullmatch(r"run is being driven by pid 1 on here: waiting for its "
                                     r"lease to expire, \d+ s left \(renewed while it runs\)",
                                     line) for line in said)
    assert not any("stop" in line for line in said)

    with RunLease(layout, seconds=30, wait=said.append) as lease:  # released: taken at once
        assert lease.epoch == 5 and lease.took_over is None


def test_an_older_epochs_manifest_write_is_refused_and_a_late_one_replaced():
    layout = RunLayout("memory://lease/manifest")
    old = RunLease(layout, seconds=30)
    old.acquire()
    old_manifest = Manifest.open(layout, "m", clusters=1, lease=old)
    old._stop.set()  # it stalls: no renewals
    old.deadline = time.time() + 60  # and does not yet know
    expired_lease_of(old, layout)
    with RunLease(layout, seconds=30, force=True) as new:
        new_manifest = Manifest.open(layout, "m", clusters=1, lease=new)
        with pytest.raises(LeaseLost, match="under lease epoch 2, newer than this driver's 1"):
            old_manifest.save()
        assert storage.read_json(layout.manifest)["epoch"] == 2
        new_manifest.save()


def expired_lease_of(lease: RunLease, layout: RunLayout) -> None:
    current = cas.read(layout.lease)
    assert current is not None
    record = {**json.loads(current.data), "expires": time.time() - 1}
    cas.replace(layout.lease, json.dumps(record).encode(), current.version)


def test_a_store_without_compare_and_swap_is_refused_not_raced():
    class NoSwap(MemoryFileSystem):
        protocol = ("noswap",)

    fsspec.register_implementation("noswap", NoSwap, clobber=True)
    with pytest.raises(InputError, match="no compare-and-swap on noswap://"):
        RunLease(RunLayout("noswap://bucket/run"), seconds=30).acquire()


def test_a_driver_that_loses_its_lease_stops_at_once_with_exit_code_2(ray_session, tmp_path):
    raw = tiny_config(f"file://{tmp_path}/store", run="stolen",
                      experts={"steps": 2000, "checkpoint_every": 10},
                      fault_tolerance={"lease_seconds": 3})
    config_path = tmp_path / "stolen.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "store" / "stolen"
    layout = RunLayout(f"file://{run_dir}")
    stolen: list[float] = []

    def take_over() -> None:  # what a second driver does once it holds the lease
        deadline = time.time() + 240
        while time.time() < deadline and not has_complete_checkpoint(
                run_dir / "experts" / "expert-0" / "checkpoints"):
            time.sleep(0.1)
        thief = RunLease(layout, seconds=600)
        current = cas.read(layout.lease)
        assert current is not None
        record = {**json.loads(current.data), "owner": thief.owner, "space": "elsewhere",
                  "epoch": json.loads(current.data)["epoch"] + 1,
                  "expires": time.time() + 600}
        cas.replace(layout.lease, json.dumps(record).encode(), current.version)
        thief.epoch = record["epoch"]
        thief.deadline = time.time() + 600
        Manifest.open(layout, "stolen", clusters=2, lease=thief)  # its first write
        stolen.append(time.time())

    thread = threading.Thread(target=take_over)
    thread.start()
    result = CliRunner().invoke(app, ["run", str(config_path)])
    stopped = time.time()
    thread.join()
    assert stolen, "the run ended before its lease could be taken"
    assert result.exit_code == 2, result.output
    assert "lost the run's lease" in result.output and "epoch 2" in result.output
    assert stopped - stolen[0] < 10  # a renewal interval (1 s), then the experts are cancelled
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["epoch"] == 2  # the old driver wrote nothing after the takeover
    assert manifest["stages"]["experts"]["state"] == "running"
