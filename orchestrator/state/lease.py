"""The run lease: one driver per run, and the epoch that fences every write of the run.

`lease.json` names its holder (owner, host, pid and that pid's start time), an expiry and
an epoch, one more for every new holder. It is written only by compare-and-swap
(runstore/cas.py): created where there is none, else replaced only at the version last
read. Of two drivers starting, or taking over, together exactly one wins, and a holder
whose renewal meets a newer lease learns that it was taken over.

The holder renews every third of the lease from a background thread. The lease is lost
when another driver took it over, or when no renewal has succeeded by a tenth of the lease
before it runs out (by this machine's clock, so clocks that differ by less than that cannot
overlap two drivers; a hung store counts as failing). Then `check` raises LeaseLost, the
fenced manifest refuses to write, and `on_lost` (the CLI's main-thread interrupt) stops the
driver at once. Workers check the epoch themselves before they publish (runstore/fence.py).

A lease expires when its holder stops renewing it; `force` takes over an expired lease,
never a live one; `wait` waits out a live one (saying how long is left), then takes it. A
lease held on this machine by a process that no longer exists (its pid gone, a zombie, or
reused by another process) is stale and is taken over at once, without `force`. A released
lease stays on storage, marked released, so epochs never go back.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from runstore import cas, storage
from runstore.errors import InputError, LeaseLost
from runstore.fence import EPOCH
from runstore.layout import RunLayout

log = logging.getLogger(__name__)


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@functools.cache
def machine_space() -> str:
    """Where a pid names one process: this host, its boot and its pid namespace (two
    containers may share a host name, never a pid namespace)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    return " ".join(parts)


def process_gone(held: dict[str, Any]) -> bool:
    """True when the lease was held on this machine by a process that no longer exists."""
    if held.get("space") != machine_space() or "started" not in held:
        return False  # another machine, or a lease that did not say: only expiry tells
    try:
        process = psutil.Process(int(held["pid"]))
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        return abs(process.create_time() - float(held["started"])) > 0.01  # pid reused
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def _live(held: dict[str, Any]) -> bool:
    """Whether `held` still keeps other drivers out: not released, not expired, and not
    left by a process of this machine that no longer exists."""
    return (not held.get("released") and held["expires"] > time.time()
            and not process_gone(held))


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, indent=2, sort_keys=True).encode()


def _parse(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except ValueError:  # torn by a writer from before compare-and-swap: treat as expired
        return {"owner": "unknown", "host": "?", "pid": 0, "expires": 0.0}
    return record if isinstance(record, dict) else {"pid": 0, "host": "?", "expires": 0.0}


WAIT_TICK = 5.0  # seconds between two looks at a lease being waited out


class RunLease:
    def __init__(self, layout: RunLayout, seconds: float, force: bool = False,
                 on_lost: Callable[[], None] | None = None,
                 wait: Callable[[str], None] | None = None) -> None:
        """`wait`: instead of refusing a live lease, wait until it is released, expires or
        its process here is gone, calling `wait` with the time left at every look; an
        expired lease is then taken over as with `force`."""
        self.url = layout.lease
        self.root = layout.root
        self.seconds = seconds
        self.force = force
        self.on_lost = on_lost  # called once, from the renewal thread, when the lease is lost
        self.wait = wait
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.epoch = 0
        self.version: str | None = None
        self.deadline = 0.0  # wall time after which this holder writes nothing more
        self.lost: str | None = None
        self.took_over: str | None = None  # what `acquire` took over, for the user
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, now: float) -> dict[str, Any]:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "started": psutil.Process().create_time(), "space": machine_space(),
                EPOCH: self.epoch, "renewed": now, "expires": now + self.seconds}

    def holder(self) -> dict[str, Any] | None:
        """The lease on storage, as its holder wrote it; None when there is none. A plain
        read, so that `status` and `cancel` work on any store."""
        try:
            return _parse(storage.read_bytes(self.url))
        except FileNotFoundError:
            return None

    def live_holder(self) -> dict[str, Any] | None:
        """The lease on storage while a driver holds it: neither released nor expired."""
        held = self.holder()
        if held and not held.get("released") and held["expires"] > time.time():
            return held
        return None

    def acquire(self) -> None:
        current = cas.read(self.url)
        previous = 0
        while self.wait is not None and current is not None and _live(_parse(current.data)):
            self._wait_out(_parse(current.data))
            current = cas.read(self.url)
        if current is not None:
            held = _parse(current.data)
            self.took_over = self._refuse_or_take(held)
            previous = int(held.get(EPOCH, 0))
        self.epoch = previous + 1
        sent = time.time()
        data = _encode(self._record(sent))
        try:
            self.version = (cas.create(self.url, data) if current is None
                            else cas.replace(self.url, data, current.version))
        except cas.CasConflict:
            winner = self.holder() or {}
            raise InputError("run lease", f"another driver took the run at the same moment: "
                             f"pid {winner.get('pid')} on {winner.get('host')} (epoch "
                             f"{winner.get(EPOCH)})") from None
        self.deadline = sent + self.seconds * 0.9
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._thread.start()

    def _wait_out(self, held: dict[str, Any]) -> None:
        """Sleep until the live lease `held` may have expired, or the next look."""
        assert self.wait is not None
        left = held["expires"] - time.time()
        self.wait(f"run is being driven by pid {held['pid']} on {held['host']}: waiting for "
                  f"its lease to expire, {left:.0f} s left (renewed while it runs)")
        time.sleep(min(WAIT_TICK, max(0.0, left) + 0.05))

    def _refuse_or_take(self, held: dict[str, Any]) -> str | None:
        """Raise InputError when `held` may not be taken over; else what is taken, to say."""
        if held.get("released"):
            return None
        who = f"pid {held['pid']} on {held['host']}"
        until = _when(held["expires"])
        if process_gone(held):
            return (f"the lease of {who} was held by a process that no longer exists: taking "
                    f"the run over at once (epoch {int(held.get(EPOCH, 0)) + 1})")
        if held["expires"] > time.time():
            # Alive here (process_gone said so; a lease without the pid's start time is
            # told only by whether its pid exists): it can be stopped.
            if held.get("space") == machine_space() and psutil.pid_exists(int(held["pid"])):
                raise InputError("run lease", f"run is being driven by {who} until {until} "
                                 "(renewed while it runs); wait for it, or stop it: "
                                 f"islands cancel {self.root}")
            # Never "stop it": on another machine it may be gone already.
            raise InputError("run lease", f"run is being driven by {who} until {until} "
                             "(renewed while it runs); if that driver is gone, --force takes "
                             f"the run over once its lease has expired at {until}, and "
                             f"`islands resume {self.root} --wait` waits until then")
        if not self.force and self.wait is None:
            raise InputError("run lease", f"the lease of {who} expired at {until}: its driver "
                             "stopped renewing it; pass --force to take over the run")
        return f"took over the expired lease of {who} (epoch {int(held.get(EPOCH, 0)) + 1})"

    def _renew(self) -> None:
        due = time.time() + self.seconds / 3
        # Wakes at the deadline too: a driver whose renewals keep failing stops right then.
        while not self._stop.wait(max(0.0, min(due, self.deadline) - time.time())):
            if time.time() >= self.deadline:
                self.lose(f"no renewal succeeded before {_when(self.deadline)}",
                          interrupt=True)
                return
            call = threading.Thread(target=self._renew_once, name="run-lease-write",
                                    daemon=True)
            call.start()
            # A store that hangs must not let this driver write past its lease.
            call.join(timeout=max(0.0, self.deadline - time.time()))
            if call.is_alive():
                self.lose(f"storage did not answer a renewal before {_when(self.deadline)}",
                          interrupt=True)
            if self.lost is not None:
                return
            due = time.time() + self.seconds / 3

    def _renew_once(self) -> None:
        sent = time.time()
        assert self.version is not None
        try:
            version = cas.replace(self.url, _encode(self._record(sent)), self.version)
        except cas.CasConflict:
            self._conflict()
            return
        except storage.TRANSIENT as err:  # already retried; the next renewal tries again
            if time.time() >= self.deadline:
                self.lose(f"could not renew it before {_when(self.deadline)} ({err})",
                           interrupt=True)
            return
        with self._lock:
            if self.lost is None:
                self.version, self.deadline = version, sent + self.seconds * 0.9

    def _conflict(self) -> None:
        try:
            current = cas.read(self.url)
        except storage.TRANSIENT:
            current = None
        held = _parse(current.data) if current else {}
        if current and held.get("owner") == self.owner and not held.get("released"):
            with self._lock:  # our own earlier renewal, whose answer was lost
                self.version = current.version
            return
        self.lose(f"taken over by pid {held.get('pid')} on {held.get('host')} (epoch "
                   f"{held.get(EPOCH)})", interrupt=True)

    def lose(self, reason: str, interrupt: bool = False) -> None:
        """Mark the lease lost for `reason` (the first reason stays); from the renewal
        thread, `interrupt` calls `on_lost` to stop the driver at once."""
        with self._lock:
            if self.lost is not None:
                return
            self.lost = reason  # told once, by LeaseLost where the driver stops
            if interrupt and self.on_lost is not None and not self._stop.is_set():
                self.on_lost()

    def check(self) -> None:
        """Raise LeaseLost unless this driver still holds the run: not taken over, and a
        renewal succeeded recently enough."""
        if self.lost is None and time.time() >= self.deadline:
            self.lose(f"no renewal succeeded before {_when(self.deadline)}")
        if self.lost is not None:
            raise self.lost_error()

    def lost_error(self) -> LeaseLost:
        return LeaseLost(self.root, f"this driver lost the run's lease ({self.lost}); it "
                         "stopped and writes nothing more")

    def release(self) -> None:
        with self._lock:
            self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is not None or self.version is None:
            return
        now = time.time()
        record = {**self._record(now), "expires": now, "released": now}
        try:
            cas.replace(self.url, _encode(record), self.version)
        except (cas.CasConflict, *storage.TRANSIENT) as err:  # it expires on its own
            log.warning("run lease not released (%s); it expires at %s", err,
                        _when(self.deadline))
        self.version = None

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
