"""manifest.json: the run's stages and experts as explicit state machines, with a record
of every artifact (sha256, size, the store's stamp: runstore.artifacts). Only the driver
holding the run's lease writes it.

Expert events and live progress are coalesced: `save_soon` writes at most every
SAVE_SECONDS, so 256 experts starting, reporting or ending within that time cost one
write, not one each; stage changes (`save`) and the controller's end write at once.

A manifest opened with the lease is fenced: each write first checks that the lease still
holds, stamps the lease's epoch into the manifest, and is a compare-and-swap against the
version this driver last wrote or read. A write of an older epoch's driver that was
already under way when the lease changed hands (a stall inside the storage call) then
fails on the version, sees the newer epoch and raises LeaseLost; the newer driver's
first write (at open) overwrites anything an older epoch left."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from orchestrator.state.lease import RunLease
from runstore import artifacts as records
from runstore import cas, storage
from runstore.errors import InputError
from runstore.fence import EPOCH
from runstore.layout import RunLayout
from runstore.paths import check_path

# cancelled: stopped by `islands cancel` (or an abort), as resumable as pending.
State = Literal["pending", "running", "done", "failed", "cancelled"]
STAGES = ("partition", "seed", "experts", "router", "eval")
# Stages a verb adds to a finished run, outside `islands run`: entered when first asked for,
# so manifests written before them need nothing.
OPTIONAL_STAGES = ("distill",)


def now() -> float:
    return round(time.time(), 3)


class RunCancelled(Exception):
    """`islands cancel` asked this run to stop; its checkpoints stay for `islands resume`."""


def check_cancel(layout: RunLayout) -> None:
    """RunCancelled when `islands cancel` wrote the run's cancel request."""
    if storage.exists(layout.cancel_request):
        raise RunCancelled(layout.root)


CANCEL_CHECK_SECONDS = 2.0  # how often long loops look for a cancel request (one read each)
SAVE_SECONDS = 2.0  # the most an expert event or progress report waits to be written


class Manifest:
    def __init__(self, layout: RunLayout, data: dict[str, Any]) -> None:
        self.layout = layout
        self.data = data
        self.lease: RunLease | None = None
        self.version: str | None = None  # of the fenced manifest on storage, once known
        self.cancel_checked = float("-inf")
        self.dirty = False  # changed since the last write: `save_soon` will write it
        self.saved = float("-inf")  # monotonic time of the last write

    @classmethod
    def open(cls, layout: RunLayout, run: str, clusters: int, seed_model: bool = False,
             lease: RunLease | None = None) -> Manifest:
        """Load the run's manifest, or start one with K experts (and the BTM seed, -1).
        With the run's lease, it is fenced by it and written at once, stamped with its
        epoch: from then on no older driver's write can land."""
        if storage.exists(layout.manifest):
            manifest = cls.load(layout)
            if lease is not None:
                manifest.fence(lease)
                manifest.save()
            return manifest
        experts = ([-1] if seed_model else []) + list(range(clusters))
        data = {
            "run": run,
            "created": now(),
            "stages": {name: {"state": "pending", "artifacts": {}} for name in STAGES},
            "experts": {str(k): {"state": "pending", "step": 0, "attempts": [],
                                 "artifacts": {}} for k in experts},
        }
        manifest = cls(layout, data)
        if lease is not None:
            manifest.fence(lease)
        manifest.save()
        return manifest

    @classmethod
    def load(cls, layout: RunLayout) -> Manifest:
        try:
            data = storage.read_json(layout.manifest)
        except FileNotFoundError:
            raise InputError(layout.root, "no manifest.json: not an islands run") from None
        except ValueError as err:
            raise InputError(layout.manifest, f"not valid JSON ({err})") from None
        check_artifact_paths(data, layout.manifest)
        return cls(layout, data)

    def fence(self, lease: RunLease) -> None:
        """From now on every write checks `lease` and is a compare-and-swap."""
        self.lease = lease

    @property
    def epoch(self) -> int | None:
        """The lease epoch this manifest's writes are fenced by; None when unfenced."""
        return self.lease.epoch if self.lease is not None else None

    def check_lease(self) -> None:
        """LeaseLost when the driver lost the run: the controller asks between polls."""
        if self.lease is not None:
            self.lease.check()

    def check_cancel(self, at_once: bool = False) -> None:
        """RunCancelled once the user asked to cancel: stages call it in their loops, so
        storage is read at most every CANCEL_CHECK_SECONDS unless `at_once`. Only a driver
        holding the run's lease is cancelled (`islands eval` of a finished run is not)."""
        if self.lease is None:
            return
        if at_once or time.monotonic() - self.cancel_checked >= CANCEL_CHECK_SECONDS:
            self.cancel_checked = time.monotonic()
            check_cancel(self.layout)

    def save_soon(self) -> None:
        """Record that the manifest changed; write it when the last write is SAVE_SECONDS
        old; the controller calls `save_due` on every poll, so nothing waits longer."""
        self.dirty = True
        self.save_due()

    def save_due(self) -> None:
        """Write what changed once the last write is SAVE_SECONDS old."""
        if self.dirty and time.monotonic() - self.saved >= SAVE_SECONDS:
            self.save()

    def flush(self) -> None:
        """Write what `save_soon` has not written yet."""
        if self.dirty:
            self.save()

    def save(self) -> None:
        """Write the whole manifest now."""
        self.dirty = False
        self.saved = time.monotonic()
        if self.lease is None:
            storage.write_json(self.layout.manifest, self.data)
            return
        self.lease.check()
        self.data[EPOCH] = self.lease.epoch
        # One line: json's C encoder, 4x faster than indenting (done in Python) and a quarter
        # smaller, for the manifest the driver rewrites every 2 s (hundreds of KiB at hundreds
        # of experts).
        body = json.dumps(self.data, sort_keys=True).encode("utf-8")
        for _ in range(3):
            if self.version is not None:
                try:
                    self.version = cas.replace(self.layout.manifest, body, self.version)
                    return
                except cas.CasConflict:
                    pass
            current = cas.read(self.layout.manifest)
            if current is None:
                try:
                    self.version = cas.create(self.layout.manifest, body)
                    return
                except cas.CasConflict:
                    continue
            stored = _epoch_of(current.data)
            if stored > self.lease.epoch:
                self.lease.lose(f"manifest.json was written under lease epoch {stored}, "
                                f"newer than this driver's {self.lease.epoch}")
                raise self.lease.lost_error()
            self.version = current.version  # an older epoch's late write: ours replaces it
        self.lease.lose("manifest.json kept changing under this driver")
        raise self.lease.lost_error()

    # stages
    def stage(self, name: str) -> dict[str, Any]:
        if name in OPTIONAL_STAGES and name not in self.data["stages"]:
            return {"state": "pending", "artifacts": {}}  # recorded once a verb enters it
        return self.data["stages"][name]

    def enter_stage(self, name: str) -> dict[str, Any]:
        """An optional stage's entry, added to the manifest if it has none yet."""
        return self.data["stages"].setdefault(name, {"state": "pending", "artifacts": {}})

    def stage_done(self, name: str) -> bool:
        entry = self.stage(name)
        return entry["state"] == "done" and self.verify(entry["artifacts"])

    def start_stage(self, name: str) -> None:
        self.stage(name).update(state="running", started=now())
        self.save()

    def finish_stage(self, name: str, artifacts: dict[str, Any], **extra: Any) -> None:
        """`artifacts`: {path in the run: sha256 of what was written, or its record}."""
        self.stage(name).update(state="done", finished=now(),
                                artifacts=records.record(self.layout.root, artifacts), **extra)
        self.save()

    def fail_stage(self, name: str, reason: str) -> None:
        self.stage(name).update(state="failed", finished=now(), reason=reason)
        self.save()

    # experts
    def expert(self, expert: int) -> dict[str, Any]:
        return self.data["experts"][str(expert)]

    @property
    def experts(self) -> list[int]:
        """The ensemble's experts 0..K-1 (the seed model, -1, is not one of them)."""
        return sorted(int(k) for k in self.data["experts"] if int(k) >= 0)

    def expert_done(self, expert: int) -> bool:
        return expert in self.experts_done([expert])

    def experts_done(self, experts: list[int]) -> set[int]:
        """Those of `experts` that are done with their artifacts as recorded, all looked up
        together."""
        done = [k for k in experts if self.expert(k)["state"] == "done"]
        stale = records.changed(self.layout.root,
                                [self.expert(k)["artifacts"] for k in done])
        return {k for i, k in enumerate(done) if i not in stale}

    def start_attempt(self, expert: int, island: str, carried_over: bool = False) -> None:
        """`carried_over`: the attempt an earlier driver started goes on under this one
        (a decentralized run's island kept training while its coordinator was away)."""
        entry = self.expert(expert)
        entry["state"] = "running"
        entry["island"] = island
        entry["attempts"].append({"island": island, "started": now()}
                                 | ({"carried_over": True} if carried_over else {}))
        self.save_soon()

    def end_attempt(self, expert: int, state: State, reason: str, step: int,
                    artifacts: dict[str, Any] | None = None, cause: str | None = None,
                    **extra: Any) -> None:
        """`cause`: the failure policy's name for why it ended (`failure_policy.Cause`).
        Written within SAVE_SECONDS: a driver killed before loses the event, and its
        successor closes the attempt as driver stopped and resumes the expert from its
        last checkpoint (which a finished expert stored before it reported done)."""
        entry = self.expert(expert)
        entry["state"] = state
        entry["step"] = step
        entry["attempts"][-1].update(ended=now(), reason=reason, step=step)
        if cause is not None:
            entry["attempts"][-1]["cause"] = cause
        if artifacts is not None:
            entry["artifacts"] = records.record(self.layout.root, artifacts)
        entry.update(extra)
        self.save_soon()

    # artifacts
    def verify(self, artifacts: dict[str, Any]) -> bool:
        """True when every listed file is still the one recorded: size and stamp from one
        metadata call each, the sha256 in full only where the stamp differs."""
        return records.unchanged(self.layout.root, artifacts)

    def read_verified(self, relative: str) -> bytes:
        """Read an artifact the manifest lists, refusing it if its sha256 differs."""
        expected = None
        for entry in [*self.data["stages"].values(), *self.data["experts"].values()]:
            expected = entry["artifacts"].get(relative, expected)
        url = storage.join(self.layout.root, relative)
        if expected is None:
            raise InputError(url, "not listed in manifest.json (stage not finished?)")
        data = storage.read_bytes(url)
        if storage.sha256_bytes(data) != records.sha256_of(expected):
            raise InputError(url, "sha256 does not match manifest.json: file is damaged")
        return data


def check_artifact_paths(data: Any, url: str) -> None:
    """Every artifact path the manifest lists names a file inside the run: they are read
    (and hashed) relative to the run directory, which may have come from someone else."""
    if not isinstance(data, dict) or not all(
            isinstance(data.get(part), dict) for part in ("stages", "experts")):
        raise InputError(url, "expected an object with 'stages' and 'experts'")
    for part in ("stages", "experts"):
        for name, entry in data[part].items():
            artifacts = entry.get("artifacts", {}) if isinstance(entry, dict) else None
            if not isinstance(artifacts, dict):
                raise InputError(f"{url}: {part}.{name}", "expected an object with "
                                 "'artifacts' mapping paths to their sha256 records")
            for path, entry in artifacts.items():
                check_path(path, f"{url}: {part}.{name}.artifacts")
                if not _is_record(entry):
                    raise InputError(f"{url}: {part}.{name}.artifacts.{path}", "expected a "
                                     "sha256, or an object with sha256, size and stamp")


def _is_record(entry: Any) -> bool:
    """A plain sha256 (older manifests) or {sha256, size, stamp}."""
    if isinstance(entry, str):
        return True
    return isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and \
        isinstance(entry.get("size", 0), int) and \
        isinstance(entry.get("stamp"), str | None)


def _epoch_of(data: bytes) -> int:
    try:
        return int(json.loads(data).get(EPOCH, 0))
    except (ValueError, AttributeError):
        return 0
