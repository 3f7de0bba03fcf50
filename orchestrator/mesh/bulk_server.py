"""The bulk channel's server: blob ranges over sealed TCP connections (`bulk_channel.py`)
for peers holding a ticket.

py-libp2p moves bytes through Noise and Yamux in Python, at several CPU seconds per GB on
each side. A blob is many GB, so its bytes take this side path instead, and libp2p carries
only what it is good at: identity, the roster, and the ticket.

1. A roster peer asks for a ticket over `/islands/blob/1` (op "ticket"). The reply carries
   a ticket id and a 256-bit secret bound to that peer ID, and this server's port and
   announced addresses. It travels inside the Noise channel, which has already proved who
   the peer is.
2. The peer opens a TCP connection to this port and runs the handshake with the ticket;
   a connection is admitted only with an unexpired ticket whose peer is still on the roster,
   and only a holder of the secret gets past the sealed hello.
3. The peer then sends read requests, the same frames as on `/islands/blob/1` (op "read"),
   one at a time on each connection, and gets back each range as one frame. The roster is
   checked again on every request.

Blocking sockets in threads: AES-GCM in OpenSSL and the socket calls release the GIL, so the
daemon's trio loop keeps running while a range is sent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any

from libp2p.peer.id import ID

from orchestrator.mesh.blob_manifest import is_root
from orchestrator.mesh.blob_store import BlobStore
from orchestrator.mesh.bulk_channel import (
    ADMITTED,
    OFF_ROSTER,
    SECRET_BYTES,
    TICKET_ID_BYTES,
    UNKNOWN_TICKET,
    SealedSocket,
    kernel_timeouts,
    server_handshake,
)
from orchestrator.mesh.framing import FrameError
from orchestrator.mesh.roster import RosterGate

logger = logging.getLogger(__name__)
TICKET_SECONDS = 600.0
HANDSHAKE_SECONDS = 10.0   # TCP accept to an admitted ticket
IDLE_SECONDS = 120.0       # a connection with no request for this long is closed
MAX_CONNECTIONS = 64


def _host_port(address: str) -> tuple[str, int]:
    """'/ip4/H/tcp/P' (a checked multiaddr) -> (H, P)."""
    parts = address.strip("/").split("/")
    return parts[1], int(parts[3])


class BulkServer:
    def __init__(self, store: BlobStore, gate: RosterGate, listen: str,
                 announce: tuple[str, ...] = (), ticket_seconds: float = TICKET_SECONDS) -> None:
        self.store = store
        self.gate = gate
        self.announce = [f"{h}:{p}" for h, p in map(_host_port, announce)]
        self.ticket_seconds = ticket_seconds
        host, port = _host_port(listen)
        family = socket.AF_INET6 if listen.startswith("/ip6/") else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=MAX_CONNECTIONS)
        self.port: int = self.sock.getsockname()[1]
        self._tickets: dict[bytes, tuple[bytes, ID, float]] = {}  # id -> secret, peer, end
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._closed = False
        threading.Thread(target=self._accept, name="bulk-accept", daemon=True).start()

    def issue(self, peer: ID) -> dict[str, Any]:
        """A ticket for `peer` (already admitted by the roster), with how to reach us."""
        ticket_id, secret = os.urandom(TICKET_ID_BYTES), os.urandom(SECRET_BYTES)
        now = time.monotonic()
        with self._lock:
            # Forget expired tickets here, so the table stays small without a sweeper.
            self._tickets = {t: v for t, v in self._tickets.items() if v[2] > now}
            self._tickets[ticket_id] = (secret, peer, now + self.ticket_seconds)
        return {"ticket_id": ticket_id.hex(), "secret": secret.hex(), "port": self.port,
                "announce": self.announce, "expires_in": self.ticket_seconds}

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                conn.close()  # over MAX_CONNECTIONS: the fetcher falls back or retries
                continue
            threading.Thread(target=self._serve, args=(conn,), name="bulk-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(HANDSHAKE_SECONDS)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            opened = server_handshake(conn, self._admit)
            if opened is not None:
                kernel_timeouts(conn, IDLE_SECONDS)
                self._requests(*opened)
        except (OSError, FrameError) as error:
            logger.info("bulk connection ended: %s: %s", type(error).__name__, error)
        finally:
            conn.close()
            self._slots.release()

    def _admit(self, ticket_id: bytes) -> tuple[int, bytes, ID | None]:
        with self._lock:
            entry = self._tickets.get(ticket_id)
        if entry is None or entry[2] <= time.monotonic():
            return UNKNOWN_TICKET, b"", None
        if not self.gate.admits(entry[1], "bulk channel"):
            return OFF_ROSTER, b"", None
        return ADMITTED, entry[0], entry[1]

    def _requests(self, channel: SealedSocket, peer: ID) -> None:
        while (frame := channel.receive_frame()) is not None:
            if not self.gate.admits(peer, "bulk read"):
                channel.send_frame({"error": "peer is not on the roster"})
                return
            error, data = self._read(frame[0])
            channel.send_frame({"error": error} if error else {"ok": True}, data)

    def _read(self, header: dict[str, Any]) -> tuple[str | None, bytes]:
        root = header.get("root")
        if header.get("op") != "read" or not is_root(root):
            return f"bulk requests are reads of a blob root, got {str(header)[:200]}", b""
        try:
            manifest = self.store.manifest(root)
            if manifest is None:
                return f"unknown blob {root}", b""
            if refusal := manifest.range_refusal(header.get("offset"), header.get("length")):
                return refusal, b""
            return None, self.store.read(root, header["offset"], header["length"])
        except Exception as error:  # our own store failed: the peer hears why, we go on
            return f"read of {root}: {type(error).__name__}: {error}", b""
