"""The Launcher over the mesh: the driver is the coordinator of island agents that share no
Ray cluster and no storage with it (`islands.launcher: mesh`).

The driver starts its own mesh daemon and answers the agents' requests
(`coordination.py`). `start` turns an attempt into an offer to its island, with the
attempt's inputs (shards, the checkpoint to resume from) published as blobs; the island
claims it under a lease whose token fences everything it sends back. Checkpoints and final
weights are fetched from the island as blobs, checked against their sha256 and written into
the run directory exactly where the Ray path's workers write them, so resume, the router,
eval, `status` and `logs` read a mesh run like any other. An island whose connection drops
(killed) or that stays silent past `mesh.lease_seconds` (hung) is absent: the controller
cancels its attempts, which revokes their tokens, and offers the experts again.

The live leases are kept in `mesh/leases.json`. A coordinator resumed after its driver died
reads them: an island that kept training meanwhile reports its token in its heartbeat, and
`carried_over` hands that attempt to the controller, which leaves it on its island; `start`
then re-establishes the lease under the same token instead of offering the expert anew, so
the island's buffered checkpoints and results are taken and nothing is trained twice.
Any other lease of the dead coordinator is revoked at the island's next heartbeat.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from orchestrator.control.launcher import Attempt, Ended, IslandLost
from orchestrator.mesh.blob_store import FsspecBlobStore
from orchestrator.mesh.client import IncomingRequest, MeshClient, MeshError
from orchestrator.mesh.coordination import (
    COORD_PROTOCOL,
    PENDING,
    SUPERSEDED,
    FileRef,
    Offer,
    check_path,
    decode,
    encode,
    expert_of,
    token_of,
)
from orchestrator.mesh.daemon_process import DaemonProcess, DaemonStartError, start_daemon
from orchestrator.state.config import IslandSpec, RunConfig
from runstore import storage
from runstore.errors import InputError
from runstore.fence import check_epoch
from runstore.layout import RunLayout
from worker.train import ExpertSpec, shard_urls

ARTIFACT_SECONDS = 600.0
CALIBRATION_SECONDS = 600.0   # as on Ray: a short timed run of the real training step
PEERS_SECONDS = 0.25   # how often the daemon's connected peers are read
# How long `carried_over` waits for joined islands to report the tokens an earlier
# coordinator gave them, in heartbeats (at least 2 s).
REPORT_HEARTBEATS = 4


class Refused(Exception):
    """A request the coordinator answers with an error (told to the island)."""


@dataclass(eq=False)
class MeshAttempt:
    expert: int
    island: str
    token: str
    offer: Offer
    claimed_by: str | None = None   # the island's peer ID once claimed
    ended: bool = False
    carried_over: bool = False      # an earlier lease re-established, not a new one


@dataclass
class JoinedIsland:
    name: str
    peer: str
    capacity: dict[str, Any]
    last_seen: float = field(default_factory=time.monotonic)


class MeshLauncher:
    def __init__(self, config: RunConfig, layout: RunLayout,
                 console: Console | None = None) -> None:
        self.config = config
        self.layout = layout
        self.console = console or Console(stderr=True)
        self.pool = {spec.name: spec for spec in config.islands.specs()}
        self.blobs = FsspecBlobStore(storage.join(layout.root, "mesh", "blobs"))
        self.lock = threading.RLock()
        self.islands: dict[str, JoinedIsland] = {}
        self.attempts: dict[str, MeshAttempt] = {}   # token -> attempt, every one started
        self.current: dict[int, str] = {}            # expert -> the token of its live lease
        self.rows: dict[int, dict[str, Any]] = {}
        self.ended: queue.Queue[Ended] = queue.Queue()
        self.connected: set[str] = set()
        self.inputs: dict[str, FileRef] = {}         # immutable inputs published, by path
        # Leases an earlier coordinator of this run gave out (mesh/leases.json), by expert:
        # (token, island), until `carried_over` and `start` re-establish or drop them.
        self.orphans: dict[int, tuple[str, str]] = {}
        self.reported: dict[str, str] = {}           # orphan token -> the peer that holds it
        self.untold: dict[str, str] = {}             # cancelled token -> its island, until told
        # Speed measurements asked of islands (island -> the request, an Offer of the probe
        # expert under a "calibrate." token), and their results or errors as they arrive.
        self.calibrations: dict[str, Offer] = {}
        self.calibrated: dict[str, dict[str, Any] | str] = {}
        self.daemon: DaemonProcess | None = None
        self.client: MeshClient | None = None
        self.folder: str | None = None
        self.stopping = threading.Event()
        self.workers = ThreadPoolExecutor(4, thread_name_prefix="coord")
        # Per expert: held while an artifact is written into the run, and by a revocation,
        # so no write under a token lands after it was revoked. Heartbeats never wait on it.
        self.publishing: dict[int, threading.RLock] = {}

    # ------------------------------------------------------------------ life

    @property
    def leases_url(self) -> str:
        return storage.join(self.layout.root, "mesh", "leases.json")

    def _load_leases(self) -> None:
        try:
            saved = storage.read_json(self.leases_url).get("leases", {})
        except (FileNotFoundError, ValueError, AttributeError):
            return
        for expert, lease in dict(saved).items():
            with contextlib.suppress(KeyError, TypeError, ValueError):
                token, island = str(lease["token"]), str(lease["island"])
                if expert_of(token) == int(expert) and island in self.pool:
                    self.orphans[int(expert)] = (token, island)

    def _save_leases(self) -> None:
        """The live leases and those still to re-establish, for a coordinator resumed after
        this one dies (under the lock)."""
        leases = {str(k): {"token": t, "island": i} for k, (t, i) in self.orphans.items()}
        for token in self.current.values():
            attempt = self.attempts[token]
            leases[str(attempt.expert)] = {"token": token, "island": attempt.island}
        storage.write_json(self.leases_url, {"leases": leases})

    def open(self) -> None:
        self._load_leases()
        self.folder = tempfile.mkdtemp(prefix="islands-coord-")
        try:
            self.daemon = start_daemon(Path(self.folder), self.config.run,
                                       self.config.mesh.model_dump(mode="json"), self.blobs.url)
        except DaemonStartError as error:
            self.close()
            raise RuntimeError(f"the coordinator's mesh daemon: {error}") from None
        ready = self.daemon.ready
        self.client = MeshClient(self.daemon.socket)
        self.client.serve(COORD_PROTOCOL)
        addresses = [a for a in ready["addresses"] if "/p2p/" in a] or [
            f"{a}/p2p/{ready['peer_id']}" for a in ready["addresses"]]
        self.console.print(f"coordinator {ready['peer_id']} listening on "
                           + ", ".join(addresses + ready.get("relay_addresses", [])))
        # Behind a NAT, its own address reaches only its own network: the relay's too.
        for address in [addresses[0], *ready.get("relay_addresses", [])[:1]]:
            self.console.print("islands join with: islands island join --coordinator "
                               f"{address} --name NAME --storage DIR")
        threading.Thread(target=self._serve, name="coord-serve", daemon=True).start()
        threading.Thread(target=self._watch_peers, name="coord-peers", daemon=True).start()

    def close(self) -> None:
        # Cancelled leases (`islands cancel`, a failed run) are told to their islands at
        # their next heartbeat: wait for that, so their training stops with the run.
        deadline = time.monotonic() + max(2.0, 4 * self.config.mesh.heartbeat_seconds)
        while time.monotonic() < deadline and self.client is not None:
            with self.lock:
                peers = {island.peer for island in self.islands.values()
                         if island.name in self.untold.values()}
                if not peers & self.connected:
                    break
            time.sleep(0.1)
        self.stopping.set()
        with self.lock:
            for token in list(self.current.values()):
                self.attempts[token].ended = True
            self.current.clear()
        if self.client is not None:
            self.client.close()
        if self.daemon is not None:
            self.daemon.stop()
        self.workers.shutdown(wait=False, cancel_futures=True)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    # ------------------------------------------------------------------ Launcher

    def island_speeds(self, config: RunConfig, layout: RunLayout,
                      probe: Callable[[str], ExpertSpec]) -> dict[str, float]:
        """Wait for the pool's islands to join (up to `mesh.join_seconds`, at least one);
        then the speeds the pool gives, or, when any is missing, each joined island's
        measured samples per second (kept in calibration.json, as on Ray)."""
        deadline = time.monotonic() + self.config.mesh.join_seconds
        shown: set[str] = set()
        while time.monotonic() < deadline:
            with self.lock:
                joined = set(self.islands)
            for name in joined - shown:
                self.console.print(f"island {name} joined ({self.islands[name].peer})")
            shown |= joined
            if joined >= set(self.pool):
                break
            time.sleep(0.2)
        if not shown:
            raise RuntimeError(f"no island joined in {self.config.mesh.join_seconds:g} s; "
                               f"expected {sorted(self.pool)}")
        if all(spec.speed is not None for spec in self.pool.values()):
            return {name: float(spec.speed) for name, spec in self.pool.items()}  # type: ignore[arg-type]
        measured = self._calibrate(layout, probe, shown)
        # Data parallelism inside the island is taken to scale linearly with its workers;
        # an island that never joined counts as the slowest one measured.
        slowest = min((m["samples_per_s"] for m in measured.values()), default=1.0)
        return {name: measured[name]["samples_per_s"] * spec.data_parallel
                if name in measured else slowest for name, spec in self.pool.items()}

    def _calibrate(self, layout: RunLayout, probe: Callable[[str], ExpertSpec],
                   joined: set[str]) -> dict[str, dict[str, Any]]:
        """Each joined island's measurement: from calibration.json, else asked of it (the
        request rides on its heartbeat's answer) and then recorded there."""
        measured: dict[str, Any] = (storage.read_json(layout.calibration)
                                    if storage.exists(layout.calibration) else {})
        asked = sorted(joined - set(measured))
        for name in asked:
            spec = probe(name)
            inputs = {path: self._input(path) for path in
                      [self._relative(url) for url in shard_urls(spec, self.layout)]}
            described = asdict(spec)
            if spec.init_from:
                described["init_from"] = self._relative(spec.init_from)
            token = f"calibrate.{name}.{secrets.token_hex(8)}"
            with self.lock:
                self.calibrations[name] = Offer(token, spec.expert, 0, described, inputs)
        if asked:
            self.console.print(f"measuring the speed of islands {', '.join(asked)}")
        deadline = time.monotonic() + CALIBRATION_SECONDS
        while time.monotonic() < deadline:
            with self.lock:
                if set(asked) <= set(self.calibrated):
                    break
            time.sleep(0.2)
        with self.lock:
            results, self.calibrations = dict(self.calibrated), {}
        for name in asked:
            result = results.get(name)
            if result is None:
                raise InputError(f"islands.pool[{name}]", "calibration did not finish in "
                                 f"{CALIBRATION_SECONDS:.0f}s: the island is gone or far "
                                 "slower than expected; give it a speed")
            if isinstance(result, str):
                raise RuntimeError(f"calibration on island {name} failed: {result}")
            measured[name] = {**result, "measured": round(time.time(), 3)}
        if asked:
            storage.write_json(layout.calibration, measured)
        return {name: measured[name] for name in joined if name in measured}

    def present_islands(self, islands: list[IslandSpec]) -> set[str]:
        now = time.monotonic()
        with self.lock:
            return {name for name, island in self.islands.items()
                    if island.peer in self.connected
                    and now - island.last_seen <= self.config.mesh.lease_seconds}

    def carried_over(self, experts: list[int]) -> dict[int, str]:
        """The earlier coordinator's leases on these experts whose island, joined again,
        reports it still holds them (waiting a few heartbeats for the reports)."""
        wait = max(2.0, REPORT_HEARTBEATS * self.config.mesh.heartbeat_seconds)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self.lock:
                awaited = [token for expert, (token, island) in self.orphans.items()
                           if expert in experts and island in self.islands
                           and token not in self.reported]
            if not awaited:
                break
            time.sleep(0.1)
        with self.lock:
            kept = {k: lease for k, lease in self.orphans.items()
                    if k in experts and lease[0] in self.reported}
            dropped = sorted(set(self.orphans) - set(kept))
            self.orphans = kept
            self._save_leases()
        for expert in dropped:
            self.console.print(f"expert {expert}: the earlier coordinator's lease is not "
                               "held any more; it starts again")
        return {expert: island for expert, (_, island) in kept.items()}

    def start(self, spec: ExpertSpec, island: IslandSpec) -> MeshAttempt:
        with self.lock:
            orphan = self.orphans.pop(spec.expert, None)
            # Only if the island reported the token: it still trains under it.
            carried = orphan is not None and orphan[1] == island.name \
                and orphan[0] in self.reported
        described = asdict(spec)
        if spec.init_from:
            described["init_from"] = self._relative(spec.init_from)
        if carried:   # the island trains it still: the same token, nothing to send it
            assert orphan is not None
            token, inputs = orphan[0], {}
        else:
            token, inputs = token_of(spec.expert, spec.attempt, secrets.token_hex(8)), \
                self._inputs(spec)
        attempt = MeshAttempt(spec.expert, island.name, token,
                              Offer(token, spec.expert, spec.attempt, described, inputs),
                              carried_over=carried)
        with self.lock:
            if carried:
                attempt.claimed_by = self.reported.get(token)
            self.attempts[token] = attempt
            self.current[spec.expert] = token
            self._save_leases()
        if carried:
            self.console.print(f"expert {spec.expert}: lease {token} re-established with "
                               f"island {island.name}")
        return attempt

    def poll(self, timeout: float) -> list[Ended]:
        try:
            ended = [self.ended.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                ended.append(self.ended.get_nowait())
            except queue.Empty:
                return ended

    def cancel(self, attempt: Attempt) -> None:
        if not isinstance(attempt, MeshAttempt):
            raise TypeError(f"not an attempt on the mesh: {attempt!r}")
        with self.lock:
            if attempt.claimed_by is not None and not attempt.ended:
                self.untold[attempt.token] = attempt.island
        self._end(attempt, error=RuntimeError(
            f"attempt cancelled: its lease on island {attempt.island} was revoked"))

    def progress_rows(self) -> dict[int, dict[str, Any]] | None:
        with self.lock:
            return dict(self.rows)

    # ------------------------------------------------------------------ inputs

    def _relative(self, url: str) -> str:
        root = self.layout.root.rstrip("/") + "/"
        if not url.startswith(root):
            raise InputError(url, f"an island can only be given files of the run ({root})")
        return url[len(root):]

    def _publish(self, path: str) -> FileRef:
        manifest = self.blobs.put(storage.join(self.layout.root, path))
        return FileRef(manifest.root, manifest.sha256, manifest.size)

    def _input(self, path: str) -> FileRef:
        """An input that never changes (a shard, the seed's weights): published once."""
        if path not in self.inputs:
            self.inputs[path] = self._publish(path)
        return self.inputs[path]

    def _inputs(self, spec: ExpertSpec) -> dict[str, FileRef]:
        """What the island needs at its paths: the shards (published once), the weights to
        branch from, and the expert's newest complete checkpoint with its metrics."""
        inputs: dict[str, FileRef] = {}
        fixed = [self._relative(url) for url in shard_urls(spec, self.layout)]
        if spec.init_from:
            fixed.append(self._relative(spec.init_from))
        for path in fixed:
            inputs[path] = self._input(path)
        expert = self._relative(self.layout.expert(spec.expert))
        checkpoints = self.layout.checkpoints(spec.expert)
        for step in reversed(storage.listdir(checkpoints)):
            folder = storage.join(checkpoints, step)
            if storage.exists(storage.join(folder, "meta.json")):
                for name in storage.listdir(folder):
                    path = f"{expert}/checkpoints/{step}/{name}"
                    inputs[path] = self._publish(path)
                break
        # Not the log: each attempt writes parts of its own (runstore/log_parts.py).
        if storage.exists(self.layout.metrics(spec.expert)):
            inputs[f"{expert}/metrics.parquet"] = self._publish(f"{expert}/metrics.parquet")
        return inputs

    # ------------------------------------------------------------------ serving

    def _watch_peers(self) -> None:
        """The connected peers, every PEERS_SECONDS: a killed island's connection drops at
        once, long before its lease would lapse. The leases of an island gone (its
        connection dropped, or silent past `mesh.lease_seconds`) end here and then, so the
        controller hears within a poll and offers the experts again."""
        while not self.stopping.is_set():
            with contextlib.suppress(MeshError):
                assert self.client is not None
                self.check_islands(set(self.client.peers()))
            self.stopping.wait(PEERS_SECONDS)

    def check_islands(self, peers: set[str]) -> None:
        """`peers` are connected now: end the attempts of every island gone. Each lapsed
        lease is kept, neither live nor revoked, until its expert starts again: on another
        island it is revoked then (and what the island sends under it is refused), back
        on the same island it is re-established (and its late work taken)."""
        with self.lock:
            self.connected = peers
            gone = {name for name, island in self.islands.items()
                    if island.peer not in peers
                    or time.monotonic() - island.last_seen > self.config.mesh.lease_seconds}
            lost = [self.attempts[t] for t in self.current.values()
                    if self.attempts[t].island in gone]
            for attempt in lost:
                self.orphans[attempt.expert] = (attempt.token, attempt.island)
                self.reported.pop(attempt.token, None)  # it must report it once back
        for attempt in lost:
            self._end(attempt, error=IslandLost(attempt.island))

    def _serve(self) -> None:
        assert self.client is not None
        while not self.stopping.is_set():
            try:
                request = self.client.next_request(timeout=0.5)
            except MeshError:
                return   # the daemon is gone; the driver's close follows
            if request is None:
                continue
            # Artifacts and results fetch blobs (seconds to minutes): a pool of their own,
            # so heartbeats are answered at once and no island looks silent meanwhile.
            try:
                op = decode(request.payload, "request").get("op")
            except InputError:
                op = None   # answered inline, with the error
            if op in ("artifact", "done"):
                self.workers.submit(self._answer, request)
            else:
                self._answer(request)

    def _answer(self, request: IncomingRequest) -> None:
        assert self.client is not None
        try:
            message = decode(request.payload, f"request from {request.peer}")
            handler = HANDLERS.get(str(message.get("op")))
            if handler is None:
                raise Refused(f"unknown operation {message.get('op')!r}")
            answer, error = handler(self, request.peer, message), None
        except (Refused, InputError) as refused:
            answer, error = {}, str(refused)
        except Exception as bug:  # never leave an island waiting without an answer
            answer, error = {}, f"coordinator error: {type(bug).__name__}: {bug}"
        with contextlib.suppress(MeshError):
            self.client.respond(request, encode(answer), error=error)

    def _island(self, peer: str, message: dict[str, Any]) -> JoinedIsland:
        name = str(message.get("island"))
        with self.lock:
            island = self.islands.get(name)
            if island is None or island.peer != peer:
                raise Refused(f"peer {peer} has not joined as island {name}: join first")
            island.last_seen = time.monotonic()
            return island

    def _attempt(self, island: JoinedIsland, message: dict[str, Any]) -> MeshAttempt:
        """The attempt a message's token names, if it is the live lease of that island."""
        token = str(message.get("token"))
        with self.lock:
            attempt = self.attempts.get(token)
            if (token, island.name) in self.orphans.values():
                # A lease of an earlier coordinator, or one lapsed in a partition, that its
                # island still works under (it sends under it): undecided until the expert
                # starts again, so put off, not refused.
                self.reported[token] = island.peer
                raise Refused(f"{PENDING}: the lease {token} is being re-established")
            if attempt is None or attempt.island != island.name:
                raise Refused(f"token {token} was never offered to island {island.name}")
            if attempt.ended or self.current.get(attempt.expert) != token:
                raise Refused(f"{SUPERSEDED}: the lease {token} of expert {attempt.expert} "
                              "was revoked or replaced")
            if attempt.claimed_by not in (None, island.peer):
                raise Refused(f"token {token} is held by another peer")
            return attempt

    def on_join(self, peer: str, message: dict[str, Any]) -> dict[str, Any]:
        name = str(message.get("island"))
        spec = self.pool.get(name)
        if spec is None:
            raise Refused(f"no island {name!r} in this run (islands.pool: {sorted(self.pool)})")
        if spec.peer is not None and spec.peer != peer:
            raise Refused(f"island {name} is bound to peer {spec.peer}, not {peer}")
        capacity = dict(message.get("capacity") or {})
        if short := _short_of(spec, capacity):
            raise Refused(f"island {name}: islands.pool declares {short}")
        with self.lock:
            other = self.islands.get(name)
            if other is not None and other.peer != peer and other.peer in self.connected \
                    and time.monotonic() - other.last_seen <= self.config.mesh.lease_seconds:
                raise Refused(f"island {name} is already joined by peer {other.peer}")
            self.islands[name] = JoinedIsland(name, peer, capacity)
            self.connected.add(peer)
        return {"run": self.config.run, "heartbeat_seconds": self.config.mesh.heartbeat_seconds,
                "lease_seconds": self.config.mesh.lease_seconds}

    def on_heartbeat(self, peer: str, message: dict[str, Any]) -> dict[str, Any]:
        island = self._island(peer, message)
        held = {str(t) for t in message.get("tokens", [])}
        with self.lock:
            # An earlier coordinator's lease this island still trains under: kept (not
            # revoked) while `carried_over` and `start` decide about it.
            pending = {t for t, name in self.orphans.values()
                       if name == island.name and t in held}
            for token in pending:
                self.reported[token] = peer
            live = {t for t in self.current.values() if self.attempts[t].island == island.name}
            for token in live & held:
                if self.attempts[token].claimed_by is None:  # a carried-over lease
                    self.attempts[token].claimed_by = peer
            offers = [self.attempts[t].offer.to_dict() for t in sorted(live)
                      if self.attempts[t].claimed_by is None]
            revoked = sorted(held - live - pending)
            calibration = self.calibrations.get(island.name)
            if island.name in self.calibrated:
                calibration = None
            for token in [t for t, name in self.untold.items()
                          if name == island.name and (t in revoked or t not in held)]:
                del self.untold[token]
            # A lease the island claimed but no longer works under: it restarted.
            dropped = [self.attempts[t] for t in live
                       if self.attempts[t].claimed_by == peer and t not in held]
        for attempt in dropped:   # restarted without it: the island's loss, not a crash
            self.console.print(f"island {island.name} no longer works on expert "
                               f"{attempt.expert} (it restarted)")
            self._end(attempt, error=IslandLost(island.name))
        answer: dict[str, Any] = {"offers": offers, "revoked": revoked}
        if calibration is not None:
            answer["calibrate"] = calibration.to_dict()
        return answer

    def on_speed(self, peer: str, message: dict[str, Any]) -> dict[str, Any]:
        """An island's measured speed (the probe expert's training step, timed there)."""
        island = self._island(peer, message)
        with self.lock:
            asked = self.calibrations.get(island.name)
            if asked is None or asked.token != message.get("token"):
                raise Refused(f"no speed measurement of island {island.name} is asked for "
                              f"under {message.get('token')!r}")
            result, error = message.get("result"), message.get("error")
            if error is not None:
                self.calibrated[island.name] = str(error)
                return {}
            try:
                speed = float(dict(result)["samples_per_s"])  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError):
                raise Refused(f"a speed must be {{samples_per_s, ...}}, got {result!r}") from None
            if not speed > 0:
                raise Refused(f"samples_per_s must be positive, got {speed}")
            self.calibrated[island.name] = dict(result)  # type: ignore[arg-type]
        self.console.print(f"island {island.name}: {speed:.1f} samples/s")
        return {}

    def on_claim(self, peer: str, message: dict[str, Any]) -> dict[str, Any]:
        island = self._island(peer, message)
        attempt = self._attempt(island, message)
        with self.lock:
            attempt.claimed_by = peer
        self.console.print(f"expert {attempt.expert}: claimed by island {island.name}")
        return {}

    def on_progress(self, peer: str, message: dict[str, Any]) -> dict[str, Any]:
        attempt = self._attempt(self._island(peer, message), message)
        row = message.get("row")
        if isinstance(row, dict) and row.get("expert") == attempt.expert:
            with self.lock:   # a carried-over attempt is recorded under this driver's number
                self.rows[attempt.expert] = {**row, "attempt": attempt.offer.attempt}
        return {}

    def on_artifact(self, peer: str, message: dict[str, Any]) -> dict[str, Any]:
        island = self._island(peer, message)
        attempt = self._attempt(island, message)
        inside = self._relative(self.layout.expert(attempt.expert))
        files = {check_path(str(p), "artifact", inside): FileRef.parse(r, f"artifact {p}")
                 for p, r in dict(message.get("files", {})).items()}
        staging = tempfile.mkdtemp(prefix="islands-artifact-")
        try:
            fetched = {path: self._fetch(peer, ref, Path(staging, str(i)))
                       for i, (path, ref) in enumerate(sorted(files.items()))}
            # A revocation cannot land between the check and the writes.
            with self._publishing(attempt.expert):
                self._attempt(island, message)
                # The coordinator writes for the island: fenced by this driver's lease.
                check_epoch(self.layout, attempt.offer.spec.get("epoch"),
                            f"artifact of expert {attempt.expert}")
                # meta.json last: it marks a checkpoint or final folder complete.
                for path in sorted(fetched, key=lambda p: p.endswith("/meta.json")):
                    written = storage.put_file(fetched[path],
                                               storage.join(self.layout.root, path))
                    if written != files[path].sha256:   # the staged file changed
                        raise Refused(f"{path} changed between its check and its write")
                if message.get("kind") == "checkpoint":
                    self._prune(attempt.expert)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {}

    def _publishing(self, expert: int) -> threading.RLock:
        with self.lock:
            return self.publishing.setdefault(expert, threading.RLock())

    def _fetch(self, peer: str, ref: FileRef, dest: Path) -> Path:
        """The blob into a staging file, checked against the sha256 and size announced
        (in blocks: a checkpoint of gigabytes is never held in memory)."""
        assert self.client is not None
        self.client.fetch_blob(ref.root, dest, [peer], timeout=ARTIFACT_SECONDS)
        digest = hashlib.sha256()
        with dest.open("rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        if dest.stat().st_size != ref.size or digest.hexdigest() != ref.sha256:
            raise Refused(f"blob {ref.root} does not match the sha256 and size announced")
        return dest

    def _prune(self, expert: int) -> None:
        checkpoints = self.layout.checkpoints(expert)
        complete = [s for s in storage.listdir(checkpoints)
                    if storage.exists(storage.join(checkpoints, s, "meta.json"))]
        for step in complete[:-self.config.experts.keep_checkpoints]:
            storage.remove(storage.join(checkpoints, step))

    def on_done(self, peer: str, message: dict[str, Any]) -> dict[str, Any]:
        island = self._island(peer, message)
        attempt = self._attempt(island, message)
        result = dict(message.get("result") or {})
        artifacts = dict(result.get("artifacts") or {})
        inside = self._relative(self.layout.expert(attempt.expert))
        for path, sha in artifacts.items():
            url = storage.join(self.layout.root, check_path(str(path), "result", inside))
            if not storage.exists(url) or storage.sha256_file(url) != sha:
                raise Refused(f"result artifact {path} was not pushed, or differs from its "
                              "sha256: push the final files before done")
        self._end(attempt, result=result)
        return {}

    def on_failed(self, peer: str, message: dict[str, Any]) -> dict[str, Any]:
        island = self._island(peer, message)
        attempt = self._attempt(island, message)
        bad = message.get("input_error")
        error: BaseException = (InputError(str(bad.get("where")), str(bad.get("problem")))
                                if isinstance(bad, dict) else
                                RuntimeError(f"island {island.name}: {message.get('error')}"))
        self._end(attempt, error=error)
        return {}

    def _end(self, attempt: MeshAttempt, result: dict[str, Any] | None = None,
             error: BaseException | None = None) -> None:
        with self._publishing(attempt.expert), self.lock:   # after a write in flight
            if attempt.ended:
                return
            attempt.ended = True
            if self.current.get(attempt.expert) == attempt.token:
                del self.current[attempt.expert]
                if not self.stopping.is_set():  # a driver stopping keeps them for its resume
                    self._save_leases()
        self.ended.put(Ended(attempt, result=result, error=error))


def _short_of(spec: IslandSpec, capacity: dict[str, Any]) -> str | None:
    """What the pool declares of an island that its agent does not announce, or None."""
    cpus = capacity.get("cpus")
    if spec.cpus is not None and isinstance(cpus, int) and cpus < spec.cpus:
        return f"{spec.cpus} CPUs, but the agent offers {cpus} (--cpus)"
    if spec.accelerators is not None:
        have = capacity.get("accelerators") or {}
        count = have.get("count", 0) if isinstance(have, dict) else 0
        if not isinstance(count, int) or count < spec.accelerators.count:
            return (f"{spec.accelerators.count} x {spec.accelerators.type}, but the agent "
                    f"finds {count or 'no'} accelerators (nvidia-smi)")
    return None


HANDLERS: dict[str, Callable[[MeshLauncher, str, dict[str, Any]], dict[str, Any]]] = {
    "join": MeshLauncher.on_join,
    "heartbeat": MeshLauncher.on_heartbeat,
    "speed": MeshLauncher.on_speed,
    "claim": MeshLauncher.on_claim,
    "progress": MeshLauncher.on_progress,
    "artifact": MeshLauncher.on_artifact,
    "done": MeshLauncher.on_done,
    "failed": MeshLauncher.on_failed,
}
