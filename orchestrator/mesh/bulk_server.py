"""The bulk channel's server: blob ranges over TLS on a plain TCP port, for peers holding a
ticket.

py-libp2p moves bytes through Noise and Yamux in Python, at several CPU seconds per GB on
each side. A blob is many GB, so its bytes take this side path instead, and libp2p carries
only what it is good at: identity, the roster, and the ticket.

1. A roster peer asks for a ticket over `/islands/blob/1` (op "ticket"). The reply carries
   a random 256-bit ticket bound to that peer ID, the pinned TLS certificate's fingerprint
   and this server's port and announced addresses. It travels inside the Noise channel,
   which has already proved who the peer is.
2. The peer opens TLS 1.3 to this port, checks the pin, and sends the ticket. Each
   connection is admitted only with an unexpired ticket whose peer is still on the roster.
3. The peer then sends read requests, the same frames as on `/islands/blob/1` (op "read"),
   one at a time on each connection, and gets back each range as one frame. The roster is
   checked again on every request.

Blocking sockets in threads: OpenSSL and the socket calls release the GIL, so the daemon's
trio loop keeps running while a range is sent.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import ssl
import threading
import time
from typing import Any

from libp2p.peer.id import ID

from orchestrator.mesh.blob_manifest import is_root
from orchestrator.mesh.blob_store import BlobStore
from orchestrator.mesh.bulk_tls import server_context
from orchestrator.mesh.framing import FrameError, encode, encode_header, recv_frame
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
        self.context, self.fingerprint = server_context()
        host, port = _host_port(listen)
        family = socket.AF_INET6 if listen.startswith("/ip6/") else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=MAX_CONNECTIONS)
        self.port: int = self.sock.getsockname()[1]
        self._tickets: dict[str, tuple[ID, float]] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._closed = False
        threading.Thread(target=self._accept, name="bulk-accept", daemon=True).start()

    def issue(self, peer: ID) -> dict[str, Any]:
        """A ticket for `peer` (already admitted by the roster), with how to reach us."""
        ticket = secrets.token_hex(32)
        now = time.monotonic()
        with self._lock:
            # Forget expired tickets here, so the table stays small without a sweeper.
            self._tickets = {t: v for t, v in self._tickets.items() if v[1] > now}
            self._tickets[ticket] = (peer, now + self.ticket_seconds)
        return {"ticket": ticket, "fingerprint": self.fingerprint, "port": self.port,
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
            with self.context.wrap_socket(conn, server_side=True) as tls:
                peer = self._admit(tls)
                if peer is not None:
                    tls.settimeout(IDLE_SECONDS)
                    self._requests(tls, peer)
        except (OSError, FrameError, ssl.SSLError) as error:
            logger.info("bulk connection ended: %s: %s", type(error).__name__, error)
        finally:
            conn.close()
            self._slots.release()

    def _admit(self, tls: ssl.SSLSocket) -> ID | None:
        frame = recv_frame(tls)
        ticket = frame[0].get("ticket") if frame else None
        with self._lock:
            entry = self._tickets.get(ticket) if isinstance(ticket, str) else None
        if entry is None or entry[1] <= time.monotonic():
            tls.sendall(encode({"error": "unknown or expired bulk ticket"}))
            return None
        if not self.gate.admits(entry[0], "bulk channel"):
            tls.sendall(encode({"error": "peer is not on the roster"}))
            return None
        tls.sendall(encode({"ok": True}))
        return entry[0]

    def _requests(self, tls: ssl.SSLSocket, peer: ID) -> None:
        while (frame := recv_frame(tls)) is not None:
            if not self.gate.admits(peer, "bulk read"):
                tls.sendall(encode({"error": "peer is not on the roster"}))
                return
            error, data = self._read(frame[0])
            if error is not None:
                tls.sendall(encode({"error": error}))
                continue
            tls.sendall(encode_header({"ok": True}, len(data)))
            tls.sendall(data)

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
