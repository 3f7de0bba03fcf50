"""The synchronous client of a mesh daemon (`daemon.py`): plain threads and a Unix socket,
no trio and no libp2p in the caller's process, so training code can use the mesh.

One reader thread takes every frame from the daemon: replies go to the call waiting on
their id (calls may come from many threads at once), requests from peers go to the queue
`next_request` reads, broadcast messages to the queue of their topic that `next_message`
reads. When the daemon goes away every waiting and later call raises
MeshDaemonGone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.mesh.blob_fetch import BlobFetchError, FetchResult, fetch_blob
from orchestrator.mesh.blob_manifest import BlobManifest
from orchestrator.mesh.bulk_client import BulkPeer, BulkReadError, BulkRefused, BulkUnreachable
from orchestrator.mesh.framing import FrameError, Header, encode, recv_frame

logger = logging.getLogger(__name__)
# Extra time a call waits for the daemon beyond the network timeout the daemon enforces.
_DAEMON_MARGIN = 10.0
# A peer whose bulk channel could not be reached is read over libp2p for this long before
# its bulk channel is tried again: each try can wait out a connect timeout per address (a
# NAT drops the packets), which every blob of a relayed peer would pay otherwise.
BULK_RETRY_SECONDS = 300.0


class MeshError(RuntimeError):
    """A mesh call failed: the peer refused, did not answer in time, or could not be reached."""


class MeshDaemonGone(MeshError):
    """The local mesh daemon died or closed its socket."""

    def __init__(self, socket_path: str, why: str) -> None:
        super().__init__(
            f"the mesh daemon at {socket_path} is gone ({why}); restart it with `python -m "
            f"orchestrator.mesh.daemon --config FILE --socket {socket_path} --store URL` "
            "and connect a new MeshClient")
        self.socket_path = socket_path


@dataclass(frozen=True)
class IncomingRequest:
    rid: int
    peer: str
    protocol: str
    payload: bytes


@dataclass(frozen=True)
class GossipMessage:
    topic: str
    source: str  # the peer that published (and signed) it
    seqno: int
    payload: bytes


class _Call:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.frame: tuple[Header, bytes] | None = None


class MeshClient:
    def __init__(self, socket_path: str | Path, connect_timeout: float = 30.0) -> None:
        self.socket_path = str(socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(self.socket_path)
            hello = recv_frame(sock)
        except (OSError, FrameError) as error:
            sock.close()
            raise MeshDaemonGone(self.socket_path, f"cannot connect: {error}") from None
        if hello is None or hello[0].get("op") != "hello":
            sock.close()
            raise MeshDaemonGone(self.socket_path, "it closed the connection at once")
        sock.settimeout(None)
        self.peer_id: str = hello[0]["peer_id"]
        self.addresses: list[str] = list(hello[0]["addresses"])
        # /p2p-circuit addresses through the relays holding a reservation for this peer.
        self.relay_addresses: list[str] = list(hello[0].get("relay_addresses", []))
        self._sock = sock
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._incoming: queue.Queue[IncomingRequest | None] = queue.Queue()
        # topic -> its messages; unbounded here, the daemon's queue is the bounded one.
        self._messages: dict[str, queue.Queue[GossipMessage | None]] = {}
        self._gone: MeshDaemonGone | None = None
        self._closed = False
        self._no_bulk: dict[str, tuple[float, str]] = {}  # peer -> (retry after, why)
        threading.Thread(target=self._read, name="mesh-client", daemon=True).start()

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The reader thread

    def _read(self) -> None:
        why = "its socket closed"
        try:
            while (frame := recv_frame(self._sock)) is not None:
                header, payload = frame[0], bytes(frame[1])
                frame = (header, payload)
                if header.get("op") == "incoming":
                    self._incoming.put(IncomingRequest(header["rid"], header["peer"],
                                                       header["protocol"], payload))
                    continue
                if header.get("op") == "message":
                    self._topic_queue(header["topic"]).put(GossipMessage(
                        header["topic"], header["source"], header["seqno"], payload))
                    continue
                with self._lock:
                    call = self._calls.get(header.get("id"))
                if call is not None:
                    call.frame = frame
                    call.done.set()
        except (OSError, FrameError) as error:
            why = f"{type(error).__name__}: {error}"
        with self._lock:
            self._gone = MeshDaemonGone(self.socket_path, "closed by this client"
                                        if self._closed else why)
            calls = list(self._calls.values())
            topics = list(self._messages.values())
        for call in calls:
            call.done.set()
        self._incoming.put(None)
        for messages in topics:
            messages.put(None)

    def _topic_queue(self, topic: str) -> queue.Queue[GossipMessage | None]:
        with self._lock:
            return self._messages.setdefault(topic, queue.Queue())

    def _call(self, header: Header, payload: bytes = b"",
              timeout: float = 30.0) -> tuple[Header, bytes]:
        call = _Call()
        with self._lock:
            if self._gone is not None:
                raise self._gone
            call_id = next(self._ids)
            self._calls[call_id] = call
        try:
            try:
                with self._send_lock:
                    self._sock.sendall(encode({**header, "id": call_id}, payload))
            except OSError:
                pass  # the reader thread sees the same failure and marks the daemon gone
            if not call.done.wait(timeout + _DAEMON_MARGIN):
                raise MeshError(f"the mesh daemon at {self.socket_path} did not answer "
                                f"{header.get('op')} in {timeout + _DAEMON_MARGIN:g} s")
            if call.frame is None:
                raise self._gone or MeshDaemonGone(self.socket_path, "no reply")
            return call.frame
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    def _checked(self, header: Header, payload: bytes = b"", timeout: float = 30.0,
                 what: str = "") -> tuple[Header, bytes]:
        reply, data = self._call(header, payload, timeout)
        if "error" in reply:
            raise MeshError(f"{what or header.get('op')}: {reply['error']}")
        return reply, data

    # The API

    def dial(self, address: str, timeout: float = 30.0) -> str:
        """Connect to the peer at a multiaddr that ends in /p2p/<peer id>; its peer ID."""
        reply, _ = self._checked({"op": "dial", "address": address, "timeout": timeout},
                                 timeout=timeout, what=f"dial {address}")
        return reply["peer_id"]

    def peers(self) -> list[str]:
        return list(self._checked({"op": "peers"})[0]["peers"])

    def request(self, peer_id: str, protocol: str, payload: bytes,
                timeout: float = 30.0) -> bytes:
        """Send `payload` to `peer_id`'s client serving `protocol` and return its response
        (the acknowledgement). Retried once by the daemon on a dropped stream; any failure
        raises MeshError."""
        header = {"op": "request", "peer": peer_id, "protocol": protocol, "timeout": timeout}
        return self._checked(header, payload, timeout,
                             f"request to peer {peer_id} on {protocol}")[1]

    def serve(self, protocol: str) -> None:
        """Take the requests peers send on `protocol` (read them with next_request)."""
        self._checked({"op": "serve", "protocol": protocol})

    def next_request(self, timeout: float | None = None) -> IncomingRequest | None:
        """The next request from a peer, or None after `timeout` seconds."""
        if self._gone is not None:
            raise self._gone
        try:
            item = self._incoming.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is None:
            self._incoming.put(None)  # every later caller sees the end too
            raise self._gone or MeshDaemonGone(self.socket_path, "its socket closed")
        return item

    def respond(self, request: IncomingRequest, payload: bytes = b"",
                error: str | None = None) -> None:
        """Answer `request` with `payload`, or refuse it with `error`."""
        header: dict[str, Any] = {"op": "respond", "rid": request.rid}
        if error is not None:
            header["error"] = error
        self._checked(header, payload, what=f"respond to {request.peer} on {request.protocol}")

    def fetch_blob(self, root: str, dest: str | Path, peers: Sequence[str],
                   timeout: float = 60.0, bulk: bool = True, **options: Any) -> FetchResult:
        """blob_fetch.fetch_blob with one source per peer (`PeerChunkSource`); `bulk`:
        take the bytes over each peer's bulk channel where it can."""
        sources = [PeerChunkSource(self, peer, timeout, bulk) for peer in peers]
        try:
            return fetch_blob(root, dest, sources, read_timeout=timeout, **options)
        except BlobFetchError as error:
            if self._gone is not None:
                raise self._gone from error
            raise
        finally:
            for source in sources:
                source.close()

    def bulk_given_up(self, peer_id: str) -> str | None:
        """Why blob bytes from `peer_id` go over libp2p for now (its bulk channel was given
        up less than BULK_RETRY_SECONDS ago), or None."""
        with self._lock:
            until, why = self._no_bulk.get(peer_id, (0.0, ""))
        return why if time.monotonic() < until else None

    def give_up_bulk(self, peer_id: str, why: str) -> None:
        with self._lock:
            self._no_bulk[peer_id] = (time.monotonic() + BULK_RETRY_SECONDS, why)

    def publish(self, topic: str, payload: bytes) -> bool:
        """Broadcast `payload` to the peers subscribed to `topic`, best effort: False when
        the daemon refused it for going over its publish rate (counted in stats())."""
        return bool(self._checked({"op": "publish", "topic": topic}, payload,
                                  what=f"publish on {topic}")[0]["sent"])

    def subscribe(self, topic: str) -> None:
        """Receive the messages peers publish on `topic` (read them with next_message)."""
        self._topic_queue(topic)
        self._checked({"op": "subscribe", "topic": topic}, what=f"subscribe to {topic}")

    def next_message(self, topic: str, timeout: float | None = None) -> GossipMessage | None:
        """The next message on a subscribed `topic`, or None after `timeout` seconds."""
        messages = self._topic_queue(topic)
        if self._gone is not None and messages.empty():
            raise self._gone
        try:
            item = messages.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is None:
            messages.put(None)
            raise self._gone or MeshDaemonGone(self.socket_path, "its socket closed")
        return item

    def topic_peers(self, topic: str) -> list[str]:
        """The peers this daemon knows to be subscribed to `topic`."""
        return list(self._checked({"op": "topic_peers", "topic": topic})[0]["peers"])

    def stats(self) -> dict[str, int]:
        """The daemon's broadcast counters: published, received, delivered, and one per
        reason a message was dropped or rejected (each also logged by the daemon)."""
        return dict(self._checked({"op": "stats"})[0]["stats"])

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class PeerChunkSource:
    """A ChunkSource that is a peer on the mesh. Manifests and tickets go through the local
    daemon over libp2p; chunk bytes over the peer's bulk channel (`bulk_server.py`), read
    by this process itself, when the peer offers one and this process can reach it, else
    through the daemon over libp2p streams. `transport` says which carried the last chunk."""

    def __init__(self, client: MeshClient, peer_id: str, timeout: float = 60.0,
                 bulk: bool = True) -> None:
        self.client = client
        self.peer_id = peer_id
        self.timeout = timeout
        self.name = f"peer:{peer_id}"
        self.fallback_reason: str | None = None  # why bulk was given up for this peer
        if bulk and (given_up := client.bulk_given_up(peer_id)) is not None:
            bulk, self.fallback_reason = False, given_up
        self.use_bulk = bulk
        self.transport = "bulk" if bulk else "libp2p"
        self._bulk: BulkPeer | None = None
        self._lock = threading.Lock()
        self._ticket_lock = threading.Lock()

    def manifest(self, root: str) -> BlobManifest | None:
        reply, data = self.client._checked(
            {"op": "manifest", "peer": self.peer_id, "root": root, "timeout": self.timeout},
            timeout=self.timeout, what=f"blob manifest {root} from peer {self.peer_id}")
        if reply.get("unknown"):
            return None
        return BlobManifest.from_json(data.decode(), where=self.name, root=root)

    def read(self, root: str, offset: int, length: int) -> bytes | bytearray:
        bulk = self._bulk_peer() if self.use_bulk else None
        if bulk is not None:
            try:
                data = bulk.read(root, offset, length)
                self.transport = "bulk"
                return data
            except BulkUnreachable as error:
                self._give_up_bulk(str(error))
            except BulkRefused as error:
                raise MeshError(f"blob read {root}@{offset} from peer {self.peer_id}: "
                                f"{error}") from None
            except BulkReadError:
                # The peer may have restarted (its tickets are gone): a new ticket next time.
                with self._lock:
                    if self._bulk is bulk:
                        self._bulk = None
                bulk.close()
                raise
        header = {"op": "read", "peer": self.peer_id, "root": root, "offset": offset,
                  "length": length, "timeout": self.timeout}
        data = self.client._checked(header, timeout=self.timeout,
                                    what=f"blob read {root}@{offset} from peer {self.peer_id}")[1]
        self.transport = "libp2p"
        return data

    def close(self) -> None:
        with self._lock:
            bulk, self._bulk = self._bulk, None
        if bulk is not None:
            bulk.close()

    def _bulk_peer(self) -> BulkPeer | None:
        with self._ticket_lock:   # one ticket for the reads of every thread
            with self._lock:
                if self._bulk is not None or not self.use_bulk:
                    return self._bulk
            return self._new_bulk_peer()

    def _new_bulk_peer(self) -> BulkPeer | None:
        try:
            reply, _ = self.client._checked(
                {"op": "bulk_ticket", "peer": self.peer_id, "timeout": self.timeout},
                timeout=self.timeout, what=f"bulk ticket from peer {self.peer_id}")
        except MeshError as error:
            if "offers no bulk channel" not in str(error):
                raise  # the peer is unreachable right now: a failed read, retried later
            self._give_up_bulk(str(error))
            return None
        bulk = BulkPeer(reply["ticket"], list(reply.get("hosts", [])), io_seconds=self.timeout)
        with self._lock:
            if self._bulk is None:
                self._bulk = bulk
            return self._bulk

    def _give_up_bulk(self, why: str) -> None:
        with self._lock:
            if not self.use_bulk:
                return   # another thread's read said so already
            self.use_bulk, self._bulk = False, None
            self.fallback_reason = why
        self.client.give_up_bulk(self.peer_id, why)
        logger.warning("peer %s: blob bytes go over libp2p streams: %s", self.peer_id, why)
