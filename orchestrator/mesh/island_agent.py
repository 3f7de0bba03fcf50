"""The island side of a decentralized run (`islands island join`): `IslandAgent` runs a mesh
daemon of its own, joins the coordinator over `/islands/coord/1` (`coordination.py`), trains
the experts it is offered in `island_train` subprocesses, and pushes their checkpoints,
final weights, metrics and log back as blobs the coordinator fetches from this island.

Everything under `--storage`:

    island.key            the island's Ed25519 key (default), so its peer ID
    mesh.yaml daemon.log  the daemon's generated config and its stderr
    blobs/                the blobs this island serves (its daemon's --store)
    runs/<run>/           the island's copy of the run directory (`RunLayout` paths)
    attempts/<token>/     offer.json (while the lease holds), spec.json and stderr.log

An agent restarted with the same storage reports the leases of its `offer.json` files in
its first heartbeat; those the coordinator still honours (its own, or a resumed
coordinator re-establishing an earlier one's) carry on from the island's newest local
checkpoint, the rest are dropped.

Threads: the link loop (join, heartbeats, offers, revocations) runs in the caller's thread;
one sender drains the attempts' outboxes in order while the coordinator is joined; each
attempt has a runner (inputs, subprocess, checkpoint watcher) and two pipe readers.
Children die with the thread that started them (PR_SET_PDEATHSIG), so a runner lives as
long as its subprocess and the daemon is started by the thread that calls `run`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from orchestrator.mesh.blob_fetch import BlobFetchError, UnknownBlobError
from orchestrator.mesh.blob_store import FsspecBlobStore
from orchestrator.mesh.client import MeshClient, MeshDaemonGone, MeshError
from orchestrator.mesh.coordination import (
    COORD_PROTOCOL,
    PENDING,
    SUPERSEDED,
    Offer,
    check_path,
    decode,
    encode,
)
from orchestrator.mesh.daemon_process import (
    DaemonProcess,
    DaemonStartError,
    die_with_parent,
    kill,
    start_daemon,
)
from orchestrator.state.config import check_peer_id, parse_config
from runstore.errors import InputError
from runstore.layout import RunLayout

BACKOFF = (1.0, 2.0, 5.0, 10.0)   # seconds between tries to reach the coordinator again
PENDING_RETRY = 1.0               # a lease a resumed coordinator is re-establishing
# The checkpoint watcher's period: a checkpoint written but not yet pushed is lost with the
# island, so it goes out within this of its meta.json (a stat of one folder per period).
POLL_SECONDS = 0.1
DIAL_TIMEOUT = 10.0
CALL_TIMEOUT = 15.0               # join, heartbeat, claim
PROGRESS_TIMEOUT = 5.0            # progress is best effort
# The coordinator fetches an artifact's blobs from this island before it answers.
ARTIFACT_TIMEOUT = 300.0
FETCH_TIMEOUT = 60.0
FETCH_TRIES = 5
STDERR_LINES = 40
PROGRESS_KEPT = 100               # queued progress rows per attempt while unreachable
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_COORDINATOR = re.compile(r"^/(ip4|ip6)/[^/]+/tcp/\d{1,5}/p2p/([^/]+)"
                          r"(/p2p-circuit/p2p/([^/]+))?$")
# Refusals the coordinator's daemon gives for it when its client is not there: the
# coordinator is away, not refusing (wire.py's RemoteError carries both kinds).
_AWAY = ("serves no", "no answer from the client serving", "the serving client disconnected")


def coordinator_peers(address: str, where: str = "coordinator") -> tuple[str, str | None]:
    """(the coordinator's peer ID, the relay's when the address goes through one) of a TCP
    multiaddr ending in /p2p/ID, direct or `/p2p/RELAY/p2p-circuit/p2p/ID`."""
    match = _COORDINATOR.match(address)
    if not match:
        raise InputError(where, f"expected a TCP multiaddr ending in /p2p/<peer id>, such as "
                         f"/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..., got {address!r}")
    relay, peer = (match.group(2), match.group(4)) if match.group(4) else (None, match.group(2))
    for peer_id in filter(None, (peer, relay)):
        try:
            check_peer_id(peer_id)
        except ValueError as error:
            raise InputError(where, f"{error} (got {peer_id!r})") from None
    return peer, relay


def check_name(name: str, where: str = "name") -> str:
    if not _NAME.match(name) or name in (".", ".."):
        raise InputError(where, f"expected letters, digits, '_', '.' or '-', got {name!r}")
    return name




def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _backoff() -> Iterator[float]:
    yield from BACKOFF
    yield from itertools.repeat(BACKOFF[-1])


def _refused(error: MeshError) -> bool:
    """Whether the coordinator itself answered with a refusal (not: it could not be reached)."""
    text = str(error)
    return "RemoteError" in text and not any(away in text for away in _AWAY)


def _brief(error: Exception) -> str:
    """A mesh error in one short line: what failed, and the innermost cause (the daemon
    chains causes with " <- ")."""
    text = str(error)
    parts = text.split(" <- ")
    if len(parts) > 1:
        text = f"{parts[0].split(': ', 1)[0]}: {parts[-1]}"
    return text if len(text) <= 300 else text[:297] + "..."


def _steps(checkpoints: Path) -> list[int]:
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in checkpoints.iterdir()
                  if p.name.startswith("step-") and p.name[5:].isdigit())


def _accelerators() -> dict[str, Any] | None:
    """This machine's GPUs as the join message describes them, from nvidia-smi (no torch
    import in the agent); None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        gpus = [line.rsplit(",", 1) for line in out.splitlines() if line.strip()]
        return {"type": gpus[0][0].strip(), "count": len(gpus),
                "memory_gb": round(float(gpus[0][1]) / 1024, 1)} if gpus else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


class _Stopped(Exception):
    """The attempt was stopped (revoked, superseded, shut down) while it was being set up."""


class _Torn(Exception):
    """A checkpoint changed (pruned) while it was being read."""


@dataclass(eq=False)
class _Message:
    seq: int
    body: dict[str, Any]
    note: str | None      # said once the coordinator took it
    timeout: float


@dataclass(eq=False)
class _Attempt:
    offer: Offer
    root: Path            # the island's copy of the run
    folder: Path          # attempts/<token>
    carry_on: bool = False  # restarted agent: go on from this island's own files
    calibrate: bool = False   # a speed measurement, not training: no lease, no artifacts
    process: subprocess.Popen[str] | None = None
    stopped: bool = False
    pushed: set[int] = field(default_factory=set)   # checkpoint steps pushed or skipped
    log_sizes: dict[str, int] = field(default_factory=dict)  # log parts pushed, by size
    outbox: deque[_Message] = field(default_factory=deque)
    retry_at: float = 0.0
    refusals: int = 0
    result: dict[str, Any] | None = None
    input_error: dict[str, Any] | None = None
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_LINES))

    @property
    def token(self) -> str:
        return self.offer.token

    @property
    def expert(self) -> int:
        return self.offer.expert

    @property
    def layout(self) -> RunLayout:
        return RunLayout(str(self.root))


class IslandAgent:
    """One island: joins the coordinator at `coordinator` (a multiaddr ending in /p2p/ID)
    as `name`, keeps everything under `storage`, and reports each event as one line
    through `say`. `run()` blocks; `stop()` ends it."""

    def __init__(self, coordinator: str, name: str, storage: str | Path,
                 key: str | Path | None = None, listen: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
                 relays: Sequence[str] = (), roster: Sequence[str] = (),
                 cpus: int | None = None, give_up_after: float | None = None,
                 network_key: str | Path | None = None,
                 say: Callable[[str], None] = print) -> None:
        self.name = check_name(name)
        self.coordinator_address = coordinator
        self.coordinator, coordinator_relay = coordinator_peers(coordinator)
        self.storage = Path(storage).expanduser().absolute()
        self.key = Path(key).expanduser().absolute() if key else self.storage / "island.key"
        host = listen[0].split("/")[1:3] if listen else ["ip4", "0.0.0.0"]
        # Every peer this island talks to must be on its roster: the coordinator, the relay
        # its address goes through, the island's own relays.
        peers = [self.coordinator, coordinator_relay, *(a.rsplit("/p2p/", 1)[-1] for a in relays),
                 *roster]
        self.mesh: dict[str, Any] = {
            "key": str(self.key), "listen": list(listen),
            "roster": list(dict.fromkeys(p for p in peers if p)), "relays": list(relays),
            "bulk": {"listen": f"/{host[0]}/{host[1]}/tcp/0"}}
        if network_key:
            self.mesh["network_key"] = str(Path(network_key).expanduser().absolute())
        parse_config({"run": f"island-{self.name}", "mesh": self.mesh}, "island mesh")
        self.cpus = cpus or os.cpu_count() or 1
        self.give_up_after = give_up_after
        self.store_url = f"file://{self.storage}/blobs"
        self.store = FsspecBlobStore(self.store_url)
        self.peer_id = ""
        self.run_name: str | None = None
        self.heartbeat_seconds = 5.0
        self._say = say
        self._say_lock = threading.Lock()
        self._lock = threading.Lock()
        self._attempts: dict[str, _Attempt] = {}
        # Leases of a previous run of this agent (attempts/*/offer.json), reported in the
        # heartbeats until the coordinator's answer says whether they carry on.
        self._dormant: dict[str, tuple[str, Offer]] = {}
        self._calibrations: set[str] = set()   # calibration tokens taken (once each)
        self._seq = itertools.count()
        self._joined = False
        self._lost_since = time.monotonic()
        self._stopping = threading.Event()
        self._kick = threading.Event()          # wakes the link loop: stop, or link lost
        self._outbox_ready = threading.Event()  # wakes the sender
        self._daemon: DaemonProcess | None = None
        self._client: MeshClient | None = None

    # The agent's life

    def run(self) -> int:
        """Serve the coordinator until `stop()` (0), or until it stayed unreachable for
        `give_up_after` seconds (1)."""
        self.storage.mkdir(parents=True, exist_ok=True)
        self._load_dormant()
        try:
            self._start_daemon()
            self.say(f"peer {self.peer_id}")
            self._lost_since = time.monotonic()  # give_up_after counts from here
            threading.Thread(target=self._send_loop, name="island-sender", daemon=True).start()
            return self._link_loop()
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask `run` to return (safe from a signal handler): children are killed on the way."""
        self._stopping.set()
        self._kick.set()
        self._outbox_ready.set()

    def say(self, line: str) -> None:
        with self._say_lock:
            self._say(line)

    def tokens(self) -> list[str]:
        """The leases this island works under (a calibration is none)."""
        with self._lock:
            return [t for t, a in self._attempts.items() if not a.calibrate] \
                + list(self._dormant)

    def _folder(self, token: str) -> Path:
        return self.storage / "attempts" / re.sub(r"[^A-Za-z0-9_.-]", "_", token)

    def _load_dormant(self) -> None:
        for path in sorted((self.storage / "attempts").glob("*/offer.json")):
            try:
                saved = json.loads(path.read_text())
                run, offer = check_name(str(saved["run"]), str(path)), Offer.parse(
                    saved["offer"])
            except (OSError, ValueError, KeyError, TypeError, InputError) as error:
                self.say(f"{path.parent.name}: an attempt this island cannot read ({error})")
                continue
            self._dormant[offer.token] = (run, offer)
        if self._dormant:
            self.say(f"{len(self._dormant)} earlier attempts to carry on if their leases hold")

    def _forget(self, token: str) -> None:
        """The lease is over: a restart must not carry it on."""
        with contextlib.suppress(OSError):
            (self._folder(token) / "offer.json").unlink()

    def _shutdown(self) -> None:
        self._stopping.set()
        with self._lock:
            attempts = list(self._attempts.values())
            self._attempts.clear()
            for attempt in attempts:
                attempt.stopped = True
        for attempt in attempts:
            kill(attempt.process)
        if self._client is not None:
            self._client.close()
        if self._daemon is not None:
            self._daemon.stop()

    # The mesh daemon

    def _start_daemon(self) -> None:
        (self.storage / "blobs").mkdir(exist_ok=True)
        try:
            self._daemon = start_daemon(self.storage, f"island-{self.name}", self.mesh,
                                        self.store_url)
        except DaemonStartError as error:
            raise InputError("mesh daemon", str(error)) from None
        self._client = MeshClient(self._daemon.socket)
        self.peer_id = self._client.peer_id

    def _restart_daemon(self) -> None:
        self.say("the mesh daemon is gone; starting a new one")
        if self._client is not None:
            self._client.close()
        if self._daemon is not None:
            kill(self._daemon.process)
        self._start_daemon()

    @property
    def client(self) -> MeshClient:
        assert self._client is not None, "run() starts the daemon first"
        return self._client

    # The link to the coordinator

    def _request(self, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        data = self.client.request(self.coordinator, COORD_PROTOCOL, encode(body), timeout)
        try:
            return decode(data, f"the coordinator's answer to {body['op']}")
        except InputError as error:
            raise MeshError(str(error)) from None

    def _link_loop(self) -> int:
        delays = _backoff()
        while not self._stopping.is_set():
            try:
                if not self._joined:
                    self._join()
                reply = self._request({"op": "heartbeat", "island": self.name,
                                       "tokens": self.tokens()}, CALL_TIMEOUT)
            except MeshError as error:
                if self._stopping.is_set():
                    break
                if isinstance(error, MeshDaemonGone):
                    self._restart_daemon()
                self._link_lost()
                away = time.monotonic() - self._lost_since
                if self.give_up_after is not None and away > self.give_up_after:
                    self.say(f"coordinator unreachable for {away:.0f} s ({_brief(error)}); "
                             "giving up")
                    return 1
                # Also after a refused heartbeat: a coordinator that takes the join but not
                # the heartbeat must not be asked again in a tight loop.
                delay = next(delays)
                self.say(f"coordinator unreachable ({_brief(error)}); retrying in {delay:g} s")
                self._stopping.wait(delay)
                continue
            delays = _backoff()
            self._answer_heartbeat(reply)
            self._kick.wait(self.heartbeat_seconds)
            self._kick.clear()
        return 0

    def _join(self) -> None:
        self.client.dial(self.coordinator_address, timeout=DIAL_TIMEOUT)
        reply = self._request({"op": "join", "island": self.name, "capacity": {
            "cpus": self.cpus, "accelerators": _accelerators()}}, CALL_TIMEOUT)
        try:
            run = check_name(str(reply["run"]), "the coordinator's run")
            heartbeat = float(reply["heartbeat_seconds"])
        except (KeyError, TypeError, ValueError, InputError) as error:
            raise MeshError(f"join: unexpected answer {reply!r} ({error})") from None
        self.run_name, self.heartbeat_seconds = run, max(0.1, heartbeat)
        with self._lock:
            self._joined = True
        self.say(f"joined run {run} as {self.name} "
                 f"(coordinator {reply.get('coordinator') or self.coordinator})")
        self._outbox_ready.set()  # the queue goes out after the join, in order

    def _link_lost(self) -> None:
        """Hold the outboxes and have the link loop join again (it says what failed)."""
        with self._lock:
            was, self._joined = self._joined, False
            if was:
                self._lost_since = time.monotonic()
        if was:
            self._kick.set()

    def _answer_heartbeat(self, reply: dict[str, Any]) -> None:
        for token in reply.get("revoked") or []:
            self._stop_attempt(str(token), "revoked")
        self._wake_dormant({str(t) for t in reply.get("revoked") or []})
        for data in reply.get("offers") or []:
            try:
                offer = Offer.parse(data)
            except (InputError, KeyError, TypeError, ValueError) as error:
                self.say(f"an offer this island cannot read: {error}")
                continue
            self._take(offer)
        if reply.get("calibrate"):
            self._calibrate(reply["calibrate"])

    def _calibrate(self, data: Any) -> None:
        """Time the training step of the coordinator's probe spec here, as Ray's
        calibration does on an island, and answer with `speed`."""
        try:
            offer = Offer.parse(data)
        except (InputError, KeyError, TypeError, ValueError) as error:
            self.say(f"a calibration request this island cannot read: {error}")
            return
        with self._lock:
            if offer.token in self._calibrations or self.run_name is None:
                return
            self._calibrations.add(offer.token)
            attempt = _Attempt(offer, self.storage / "runs" / self.run_name,
                               self._folder(offer.token), carry_on=True, calibrate=True)
            self._attempts[offer.token] = attempt
        self.say("measuring this island's speed")
        threading.Thread(target=self._run_attempt, args=(attempt,), name="calibrate",
                         daemon=True).start()
    def _wake_dormant(self, revoked: set[str]) -> None:
        """After the coordinator's first answer: each earlier lease it did not revoke goes
        on from this island's own files; the others are dropped."""
        with self._lock:
            dormant, self._dormant = self._dormant, {}
            run = self.run_name
        for token, (attempt_run, offer) in dormant.items():
            if token in revoked or attempt_run != run:
                self._forget(token)
                self.say(f"expert {offer.expert}: the lease of attempt {offer.attempt} from "
                         "before the restart is not held any more")
                continue
            attempt = _Attempt(offer, self.storage / "runs" / attempt_run,
                               self._folder(token), carry_on=True)
            with self._lock:
                self._attempts[token] = attempt
            self.say(f"expert {offer.expert}: carrying on attempt {offer.attempt} after a "
                     "restart")
            threading.Thread(target=self._run_attempt, args=(attempt,),
                             name=f"expert-{offer.expert}", daemon=True).start()

    def _take(self, offer: Offer) -> None:
        with self._lock:
            if offer.token in self._attempts or self.run_name is None:
                return
            run = self.run_name
        try:
            self._request({"op": "claim", "island": self.name, "token": offer.token},
                          CALL_TIMEOUT)
        except MeshError as error:
            self.say(f"expert {offer.expert}: claim not taken ({_brief(error)})")
            if not _refused(error):
                self._link_lost()
            return
        # A newer lease on an expert: an older attempt here must not write beside it.
        with self._lock:
            older = [a.token for a in self._attempts.values() if a.expert == offer.expert]
        for token in older:
            self._stop_attempt(token, "replaced by a newer offer")
        folder = self._folder(offer.token)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "offer.json").write_text(json.dumps({"run": run, "offer": offer.to_dict()}))
        attempt = _Attempt(offer, self.storage / "runs" / run, folder)
        with self._lock:
            self._attempts[offer.token] = attempt
        self.say(f"claimed expert {offer.expert} (attempt {offer.attempt})")
        threading.Thread(target=self._run_attempt, args=(attempt,),
                         name=f"expert-{offer.expert}", daemon=True).start()

    def _stop_attempt(self, token: str, why: str) -> None:
        """Kill the attempt's subprocess at once and forget it: nothing more goes out for it."""
        with self._lock:
            attempt = self._attempts.pop(token, None)
            if attempt is None:
                return
            attempt.stopped = True
            attempt.outbox.clear()
            process = attempt.process
        kill(process)
        self._forget(token)
        self.say(f"expert {attempt.expert}: {why}; attempt {attempt.offer.attempt} stopped")

    # The outboxes

    def _queue(self, attempt: _Attempt, body: dict[str, Any], note: str | None = None,
               timeout: float = ARTIFACT_TIMEOUT) -> None:
        message = _Message(next(self._seq), {**body, "island": self.name,
                                             "token": attempt.token}, note, timeout)
        with self._lock:
            if attempt.stopped:
                return
            if body["op"] == "progress":
                rows = [m for m in attempt.outbox if m.body["op"] == "progress"]
                if len(rows) >= PROGRESS_KEPT:  # unreachable for long: the oldest rows go
                    attempt.outbox.remove(rows[0])
            attempt.outbox.append(message)
        self._outbox_ready.set()

    def _next_message(self) -> tuple[_Attempt, _Message] | None:
        """The oldest message at the head of an outbox that may go now."""
        now = time.monotonic()
        with self._lock:
            if not self._joined:
                return None
            ready = [(a.outbox[0].seq, a) for a in self._attempts.values()
                     if a.outbox and a.retry_at <= now]
            if not ready:
                return None
            attempt = min(ready, key=lambda item: item[0])[1]
            return attempt, attempt.outbox[0]

    def _send_loop(self) -> None:
        while not self._stopping.is_set():
            self._outbox_ready.clear()
            picked = self._next_message()
            if picked is None:
                self._outbox_ready.wait(POLL_SECONDS)
                continue
            attempt, message = picked
            try:
                self._request(message.body, message.timeout)
            except MeshError as error:
                self._send_failed(attempt, message, error)
                continue
            except Exception as error:  # a message that cannot be sent must not end the sender
                self.say(f"expert {attempt.expert}: dropped {message.body['op']} ({error})")
            with self._lock:
                if attempt.outbox and attempt.outbox[0] is message:
                    attempt.outbox.popleft()
                attempt.refusals = 0
                if message.body["op"] in ("done", "failed", "speed"):
                    self._attempts.pop(attempt.token, None)
                    self._forget(attempt.token)
            if message.note and not attempt.stopped:
                self.say(message.note)

    def _send_failed(self, attempt: _Attempt, message: _Message, error: MeshError) -> None:
        op = message.body["op"]
        if SUPERSEDED in str(error):
            self._stop_attempt(attempt.token, "superseded")
        elif PENDING in str(error) and _refused(error):  # kept at the head, sent again soon
            with self._lock:
                attempt.retry_at = time.monotonic() + PENDING_RETRY
        elif not _refused(error):
            self._link_lost()   # kept at the head: sent again after the next join
        elif op == "progress":       # best effort: a refused row is dropped
            with self._lock:
                if attempt.outbox and attempt.outbox[0] is message:
                    attempt.outbox.popleft()
        else:
            with self._lock:
                attempt.refusals += 1
                delay = BACKOFF[min(attempt.refusals, len(BACKOFF)) - 1]
                attempt.retry_at = time.monotonic() + delay
            self.say(f"expert {attempt.expert}: the coordinator refused {op} ({_brief(error)}); "
                     f"again in {delay:g} s")

    # One attempt

    def _run_attempt(self, attempt: _Attempt) -> None:
        """Inputs, the subprocess, its checkpoints, its end. Lives as long as the subprocess
        (which dies with this thread)."""
        try:
            self._place_inputs(attempt)
            started = self._start_training(attempt)
            if started is None:
                return
            self._watch(attempt, *started)
        except _Stopped:
            return
        except Exception as error:  # unfetchable inputs, a full disk: the coordinator decides
            kill(attempt.process)
            if attempt.calibrate:
                self._queue(attempt, {"op": "speed", "result": None,
                                      "error": f"{type(error).__name__}: {error}"})
                return
            self._queue(attempt, {"op": "failed", "error": f"{type(error).__name__}: {error}",
                                  "input_error": None},
                        f"expert {attempt.expert}: failed ({error})")

    def _place_inputs(self, attempt: _Attempt) -> None:
        """The offer's inputs at their paths; whatever else this island holds of the expert
        goes, so training starts from what the coordinator says. Carrying on after a
        restart, the expert's folder stays as training left it (newer than the offer)."""
        inputs = {attempt.root / path: ref for path, ref in attempt.offer.inputs.items()}
        expert = Path(attempt.layout.expert(attempt.expert))
        offered = {int(p.parent.name[5:]) for p in inputs
                   if p.parent.parent.name == "checkpoints" and p.parent.name[5:].isdigit()}
        if attempt.carry_on:
            inputs = {p: ref for p, ref in inputs.items() if not p.is_relative_to(expert)}
        elif expert.is_dir():
            for path in sorted(expert.rglob("*"), reverse=True):
                if path.is_dir() and not path.is_symlink():
                    with contextlib.suppress(OSError):
                        path.rmdir()  # only when empty
                elif path not in inputs:
                    path.unlink()
        fetched = 0
        for path, ref in inputs.items():
            if path.is_file() and _sha256(path) == ref.sha256:
                continue  # an earlier attempt here fetched it
            self._fetch(attempt, ref.root, ref.sha256, path)
            fetched += 1
        attempt.pushed.update(offered)  # the coordinator has these
        self.say(f"expert {attempt.expert}: {len(inputs)} inputs in place ({fetched} fetched)")

    def _fetch(self, attempt: _Attempt, root: str, sha256: str, dest: Path) -> None:
        delays = _backoff()
        for tries in range(1, FETCH_TRIES + 1):
            if attempt.stopped or self._stopping.is_set():
                raise _Stopped
            try:
                self.client.fetch_blob(root, dest, [self.coordinator], timeout=FETCH_TIMEOUT)
                break
            except UnknownBlobError:
                raise
            except (MeshError, BlobFetchError, OSError) as error:
                if tries == FETCH_TRIES:
                    raise RuntimeError(f"could not fetch {dest.relative_to(attempt.root)}: "
                                       f"{error}") from None
                time.sleep(next(delays))
        if _sha256(dest) != sha256:
            dest.unlink()
            raise RuntimeError(f"{dest.relative_to(attempt.root)}: the coordinator's blob "
                               f"{root} does not have the sha256 its offer gives")

    def _start_training(self, attempt: _Attempt) -> tuple[subprocess.Popen[str],
                                                          list[threading.Thread]] | None:
        attempt.folder.mkdir(parents=True, exist_ok=True)
        spec = attempt.folder / "spec.json"
        spec.write_text(json.dumps(attempt.offer.spec))
        with self._lock:  # a stop now either sees the process or prevents it
            if attempt.stopped:
                return None
            process = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.mesh.island_train", "--spec", str(spec),
                 "--root", str(attempt.root), *(["--calibrate"] if attempt.calibrate else [])],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True, preexec_fn=die_with_parent)
            attempt.process = process
        readers = [threading.Thread(target=self._read_results, args=(attempt, process.stdout),
                                    daemon=True),
                   threading.Thread(target=_keep_stderr, daemon=True, args=(
                       process.stderr, attempt.folder / "stderr.log", attempt.stderr_tail))]
        for reader in readers:
            reader.start()
        self.say(f"expert {attempt.expert}: training (pid {process.pid})")
        return process, readers

    def _read_results(self, attempt: _Attempt, stream: IO[str]) -> None:
        for line in stream:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            if "progress" in message:
                self._queue(attempt, {"op": "progress", "row": message["progress"]},
                            timeout=PROGRESS_TIMEOUT)
            elif "result" in message or "throughput" in message:
                attempt.result = message.get("result") or message.get("throughput")
            elif "input_error" in message:
                attempt.input_error = message["input_error"]

    def _watch(self, attempt: _Attempt, process: subprocess.Popen[str],
               readers: list[threading.Thread]) -> None:
        while process.poll() is None:
            if attempt.stopped:
                return
            if not attempt.calibrate:
                self._push_checkpoints(attempt)
            time.sleep(POLL_SECONDS)
        for reader in readers:
            reader.join(timeout=30)
        if attempt.stopped:
            return
        if not attempt.calibrate:
            self._push_checkpoints(attempt)
        self._finish(attempt, process.returncode)

    def _finish(self, attempt: _Attempt, returncode: int) -> None:
        expert = attempt.expert
        if attempt.calibrate:
            error = None if returncode == 0 and attempt.result else (
                f"exit code {returncode}: " + " | ".join(list(attempt.stderr_tail)[-5:]))
            speed = (attempt.result or {}).get("samples_per_s")
            self._queue(attempt, {"op": "speed", "result": None if error else attempt.result,
                                  "error": error},
                        f"speed measured: {speed:.1f} samples/s" if speed else
                        f"speed measurement failed ({error})")
            return
        if returncode == 0 and attempt.result is not None:
            step = int(attempt.result.get("steps", 0))
            self._push_snapshots(attempt)
            final = Path(attempt.layout.final(expert))
            # meta.json last, as in a checkpoint
            names = sorted((p.name for p in final.iterdir() if p.is_file()),
                           key=lambda name: (name == "meta.json", name)) if final.is_dir() else []
            self._queue(attempt, {"op": "artifact", "kind": "final", "step": step,
                                  "files": dict(self._put(attempt, final / n) for n in names)},
                        f"expert {expert}: final weights pushed")
            self._push_files(attempt, step)
            loss = attempt.result.get("final_loss")
            self._queue(attempt, {"op": "done", "result": attempt.result},
                        f"expert {expert}: done at step {step}, loss "
                        + (f"{loss:.4f}" if isinstance(loss, float) else str(loss)))
            return
        self._push_files(attempt, None)
        if attempt.input_error is not None:
            error = attempt.input_error
            self._queue(attempt, {"op": "failed", "error": f"{error.get('where')}: "
                                  f"{error.get('problem')}", "input_error": error},
                        f"expert {expert}: failed on its input ({error.get('problem')})")
            return
        tail = "\n".join(attempt.stderr_tail)
        self._queue(attempt, {"op": "failed", "input_error": None,
                              "error": f"island_train exited with code {returncode}"
                                       + (f":\n{tail}" if tail else "")},
                    f"expert {expert}: crashed (exit code {returncode})")

    def _put(self, attempt: _Attempt, path: Path) -> tuple[str, dict[str, Any]]:
        """A file of the expert into this island's blob store: (its run path, its FileRef)."""
        relative = check_path(path.relative_to(attempt.root).as_posix(), "artifact",
                              Path(attempt.layout.expert(attempt.expert))
                              .relative_to(attempt.root).as_posix())
        manifest = self.store.put(path)
        return relative, {"root": manifest.root, "sha256": manifest.sha256,
                          "size": manifest.size}

    def _push_snapshots(self, attempt: _Attempt) -> None:
        """The expert's permanent snapshots (`experts.snapshot_at`), each folder meta.json
        last: the result lists them, so they are on the coordinator before `done`."""
        snapshots = Path(attempt.layout.snapshots(attempt.expert))
        for step in _steps(snapshots):
            folder = Path(attempt.layout.snapshot(attempt.expert, step))
            if not (folder / "meta.json").is_file():
                continue  # incomplete: the result does not list it
            names = sorted((p.name for p in folder.iterdir() if p.is_file()),
                           key=lambda name: (name == "meta.json", name))
            self._queue(attempt, {"op": "artifact", "kind": "snapshot", "step": step,
                                  "files": dict(self._put(attempt, folder / n)
                                                for n in names)},
                        f"expert {attempt.expert}: snapshot step {step} pushed")

    def _push_checkpoints(self, attempt: _Attempt) -> None:
        """Each new step folder whose meta.json (its commit marker) exists, meta.json last,
        then the expert's metrics and log: what the coordinator needs to resume elsewhere."""
        checkpoints = Path(attempt.layout.checkpoints(attempt.expert))
        for step in _steps(checkpoints):
            if step in attempt.pushed:
                continue
            folder = Path(attempt.layout.checkpoint(attempt.expert, step))
            if not (folder / "meta.json").is_file():
                continue  # still being written
            attempt.pushed.add(step)
            try:
                meta = json.loads((folder / "meta.json").read_text())
                files = {}
                for name, sha256 in meta["files"].items():
                    path, ref = self._put(attempt, folder / name)
                    if ref["sha256"] != sha256:
                        raise _Torn
                    files[path] = ref
                path, ref = self._put(attempt, folder / "meta.json")
                files[path] = ref
            except (OSError, ValueError, KeyError, TypeError, _Torn):
                continue  # pruned while read: a newer one follows
            self._queue(attempt, {"op": "artifact", "kind": "checkpoint", "step": step,
                                  "files": files},
                        f"expert {attempt.expert}: checkpoint step {step} pushed")
            self._push_files(attempt, step)

    def _push_files(self, attempt: _Attempt, step: int | None) -> None:
        """The metrics, and the log parts that grew since the last push (a closed part is
        pushed once)."""
        layout = attempt.layout
        logs = Path(layout.expert_log(attempt.expert))
        try:
            parts = [p for p in sorted(logs.iterdir()) if p.is_file()
                     and attempt.log_sizes.get(p.name) != p.stat().st_size]
        except OSError:  # no log yet
            parts = []
        files = {}
        for file in (Path(layout.metrics(attempt.expert)), *parts):
            with contextlib.suppress(OSError):
                if file.is_file():
                    size = file.stat().st_size
                    path, ref = self._put(attempt, file)
                    files[path] = ref
                    if file.parent == logs:
                        attempt.log_sizes[file.name] = size
        if files:
            self._queue(attempt, {"op": "artifact", "kind": "files", "step": step,
                                  "files": files})








def _keep_stderr(stream: IO[str] | None, path: Path, tail: deque[str]) -> None:
    """The subprocess's stderr into its log file, its last lines kept for a crash report."""
    if stream is None:
        return
    with path.open("a") as log:
        for line in stream:
            log.write(line)
            log.flush()
            tail.append(line.rstrip("\n"))
